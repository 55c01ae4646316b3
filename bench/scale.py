"""The seed's scale (issue 14): the pipeline's library functions, stage by stage, on a model of tiiuae/falcon-11B's
shape (60 layers, hidden 4096, 32 query / 8 key-value heads, feed-forward 16384, vocabulary 65024, parallel
attention with one input norm; 11.1B parameters, 22 GB in bf16) with random weights. The weights' values do not
matter for speed and memory, so no hub is needed: the model is built on the accelerator and saved as a local folder.

    python bench/scale.py                   full size on CUDA, within --deadline seconds (one H200: see docs/scale.md)
    python bench/scale.py --tiny            the same layout at width 64 and 8 layers, on CPU in seconds (the test)
    --out DIR        where scale.json and scale.md go (default bench/scale; bench/scale-tiny with --tiny)
    --work DIR       the model folders, deleted at the end (default: a new temp folder; the full run needs ~55 GB)
    --deadline S     stop by itself S seconds after the process started (default 280; imports included) and
                     still write what it measured
    --texts N --length L --batch-size B     similarity: N texts of L tokens, B texts per forward pass
    --eval-texts N --eval-batch-size B      perplexity: N texts of L tokens, one window of L each
    --heal-steps N                          optimizer steps of the heal step (0 skips it)

Steps, each with wall time, tokens/s, achieved TFLOP/s, MFU against the device's dense bf16 peak (known devices
only), peak device memory: build (meta device, then materialised on the accelerator in bf16: no CPU copy), save,
layer similarity and a bare forward over the same batches, a direct batched forward over the evaluation windows,
choose-range for the seed's block (31 of 60 layers, keeping the final layer), the mergekit slice beside a plain copy
of the same bytes, lm-eval perplexity of base and pruned, and a few heal steps (layerprune.heal). Results are written
after every step, so a run killed from outside still leaves what it measured.

Imports: torch, transformers, accelerate, safetensors, tokenizers, psutil and peft (usually there with torch), plus
from requirements.txt: mergekit, lm-eval (lm_eval), datasets, pydantic, PyYAML, numpy, tqdm, and dvclive for the
heal step. No DVC, no hub access.
"""
import argparse
import gc
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, machine, markdown_table, now  # first: offline switches
import psutil
import torch
from transformers import AutoModelForCausalLM, FalconConfig

from layerprune.files import check_free_space, significant, write_json, write_jsonl
from layerprune.forward import pad_token_id, tokenize
from layerprune.layers import decoder_layers
from layerprune.models import count_parameters, num_layers as layers_in
from layerprune.perplexity import evaluate_perplexity
from layerprune.ranges import check_ranges, kept_ranges, passthrough_config
from layerprune.similarity import layer_distances
from layerprune.slicing import slice_model
from layerprune.strategies import Block, Problem, pick_similarity
from layerprune.tiny_models import word_tokenizer
from measure import bare_forward, body_flops, direct_loglikelihood

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by a part of
# torch.cuda.get_device_name(); the longest matching part wins ("H100 PCIe" before "H100"). Unknown: no MFU.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312, "L40S": 362, "B200": 2250}

# The shape of tiiuae/falcon-11B's config.json; LAYOUT has the rest of it, with our tokenizer's EOS id (1, not 11).
FALCON_11B = dict(num_hidden_layers=60, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                  ffn_hidden_size=16384, vocab_size=65024)
TINY = dict(num_hidden_layers=8, hidden_size=64, num_attention_heads=8, num_kv_heads=2, ffn_hidden_size=256,
            vocab_size=512)
LAYOUT = dict(new_decoder_architecture=True, parallel_attn=True, num_ln_in_parallel_attn=1, bias=False, alibi=False,
              tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500042.0, activation="gelu",
              bos_token_id=1, eos_token_id=1)
SEED_BLOCK = 31  # the seed's PruneMe block on 60 layers; --tiny drops the same share of its layers


@dataclass
class Sizes:
    texts: int
    length: int
    batch_size: int
    eval_texts: int
    eval_batch_size: int
    heal_steps: int


FULL_SIZES = Sizes(texts=128, length=1024, batch_size=8, eval_texts=32, eval_batch_size=8, heal_steps=4)
TINY_SIZES = Sizes(texts=16, length=32, batch_size=4, eval_texts=4, eval_batch_size=2, heal_steps=2)


# ---- the model and its text ----


def random_texts(count: int, length: int, vocab_size: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=generator)
    return [" ".join(f"w{i}" for i in row) for row in ids.tolist()]


def build_model(shape: dict, device: str):
    """Random bf16 weights made where they will run: built on the meta device (no memory), given storage on
    `device`, then initialised there; init_weights also recomputes the rotary buffers that to_empty leaves blank."""
    config = FalconConfig(**shape, **LAYOUT)
    config.architectures = ["FalconForCausalLM"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval()


# ---- measuring ----


class Deadline(BaseException):
    """Raised by SIGALRM; a BaseException, so no library's `except Exception` swallows it."""


def _alarm(signum, frame):
    raise Deadline()


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    known = [part for part in BF16_PEAK_TFLOPS if part in name]
    return BF16_PEAK_TFLOPS[max(known, key=len)] if known else None


def device_memory() -> int:
    """Peak bytes allocated by torch since the last reset, summed over the GPUs; 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Run:
    """The steps measured so far, written to out/scale.json and out/scale.md after each one."""

    def __init__(self, out: Path, header: dict, peak: float | None):
        self.out, self.header, self.peak = out, header, peak
        self.steps: list[dict] = []
        self.skipped: list[str] = []

    def step(self, name: str, fn) -> None:
        """Run fn() -> {"tokens", "flops", "timed_seconds", ...}; record wall time, rates and peak device memory.
        tokens/s and MFU use timed_seconds (the part that processes tokens) when fn gives it, else the wall time."""
        reset_memory()
        start = time.perf_counter()
        extra = fn() or {}
        synchronize()
        wall = time.perf_counter() - start
        peak = device_memory()
        seconds = extra.pop("timed_seconds", wall)
        tokens, flops = extra.pop("tokens", None), extra.pop("flops", None)
        row = significant({
            "step": name,
            "seconds": wall,
            "tokens": tokens,
            "tokens_per_second": tokens / seconds if tokens else None,
            "tflops": flops / seconds / 1e12 if flops else None,
            "mfu": flops / seconds / (self.peak * 1e12) if flops and self.peak else None,
            "peak_memory_gb": peak / 1e9 if torch.cuda.is_available() else None,
            **extra,
        })
        self.steps.append(row)
        self.write(finished=False)
        print(f"scale: {name} done in {wall:.1f} s", file=sys.stderr)

    def write(self, finished: bool) -> None:
        data = {**self.header, "finished": finished, "skipped": self.skipped, "steps": self.steps}
        write_json(self.out / "scale.json", data)
        (self.out / "scale.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    columns = ["step", "wall s", "tokens", "tokens/s", "TFLOP/s", "MFU", "peak device GB", "notes"]
    rows = []
    for row in data["steps"]:
        mfu = row.get("mfu")
        cells = [row["step"], row.get("seconds"), row.get("tokens"), row.get("tokens_per_second"), row.get("tflops"),
                 None if mfu is None else f"{mfu:.1%}", row.get("peak_memory_gb"), row.get("notes") or row.get("error")]
        rows.append([_cell(c) for c in cells])
    status = "finished" if data["finished"] else "stopped early"
    skipped = f"; skipped: {', '.join(data['skipped'])}" if data["skipped"] else ""
    return (f"Measured {data['date']} by `{data['command']}` on {data['device']}; {data['machine']}.\n\n"
            f"Model: {data['model']}. Settings: {json.dumps(data['settings'])}.\n\n"
            + markdown_table(columns, rows, right=columns[1:-1]) + f"\n{status}{skipped}.\n")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # four significant digits already (significant); no exponent, thousands split
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def forward_flops(model, lengths: list[int], layers: int | None = None, head: bool = False) -> float:
    """FLOPs of a forward pass over texts of these lengths (measure.body_flops: weights and causal attention), for
    `layers` of the model's identical decoder layers (default: all), plus the lm_head when `head`."""
    total = len(decoder_layers(model))
    flops = body_flops(model, lengths) * (total if layers is None else layers) / total
    if head:
        flops += 2 * model.get_output_embeddings().weight.numel() * sum(lengths)
    return flops


# ---- the steps ----


class Steps:
    """The pipeline's library functions in pipeline order on one model; each method is one measured step and
    returns what Run.step records."""

    def __init__(self, shape: dict, sizes: Sizes, device: str, work: Path):
        self.shape, self.sizes, self.device, self.work = shape, sizes, device, work
        self.num_layers = shape["num_hidden_layers"]
        self.block_size = round(SEED_BLOCK / 60 * self.num_layers)
        self.base_dir, self.pruned_dir = work / "base", work / "pruned"
        self.texts = random_texts(sizes.texts, sizes.length, shape["vocab_size"], seed=1)
        self.eval_texts = random_texts(sizes.eval_texts, sizes.length, shape["vocab_size"], seed=2)
        self.eval_path = work / "eval.jsonl"
        write_jsonl(self.eval_path, [{"id": f"eval-{i}", "text": t} for i, t in enumerate(self.eval_texts)])
        self.tokenizer = word_tokenizer(shape["vocab_size"])

    def all(self) -> list[tuple[str, callable]]:
        steps = [("build", self.build), ("save", self.save), ("similarity", self.similarity),
                 ("direct forward", self.direct_forward), ("choose-range", self.choose_range), ("slice", self.slice),
                 ("perplexity base", lambda: self.perplexity(self.base_dir)),
                 ("perplexity pruned", lambda: self.perplexity(self.pruned_dir))]
        return steps + ([("heal", self.heal)] if self.sizes.heal_steps else [])

    def build(self) -> dict:
        self.model = build_model(self.shape, self.device)
        parameters = sum(p.numel() for p in self.model.parameters())
        return {"parameters": parameters, "notes": f"{parameters / 1e9:.3g}B parameters on {self.device}"}

    def save(self) -> dict:
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        check_free_space(self.work, size)
        start = time.perf_counter()
        self.model.save_pretrained(self.base_dir, max_shard_size="5GB")  # shards as large as the hub's Falcon-11B's
        self.tokenizer.save_pretrained(self.base_dir)
        seconds = time.perf_counter() - start
        written = safetensors_bytes(self.base_dir)
        return {"gb_per_second": written / seconds / 1e9,
                "notes": f"{written / 1e9:.3g} GB of safetensors at {written / seconds / 1e9:.3g} GB/s"}

    def similarity(self) -> dict:
        model, sizes = self.model, self.sizes
        pad_id = pad_token_id(self.tokenizer)
        ids, _ = tokenize(self.tokenizer, self.texts, sizes.length)
        lengths = list(map(len, ids))
        # The first batch pays one-time set-up (kernel selection, lazy buffers): keep it out of the timings.
        layer_distances(model, ids[: sizes.batch_size], batch_size=sizes.batch_size, pad_id=pad_id, progress=False)
        synchronize()
        start = time.perf_counter()
        self.distances = layer_distances(model, ids, batch_size=sizes.batch_size, pad_id=pad_id, progress=False)
        synchronize()
        seconds = time.perf_counter() - start
        peak = device_memory()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        start = time.perf_counter()
        with torch.device(self.device):  # measure.py's references build their inputs with the default device
            bare_forward(model, ids, sizes.batch_size, pad_id)
        synchronize()
        bare = time.perf_counter() - start
        memory = f"; peak ÷ model size {peak / model_bytes:.2f}" if peak else ""
        return {"tokens": sum(lengths), "flops": forward_flops(model, lengths), "timed_seconds": seconds,
                "vs_bare_forward": bare / seconds,
                "notes": f"{len(ids)} texts × {sizes.length} tokens, batch {sizes.batch_size}; "
                         f"tokens/s ÷ bare forward (no hooks, same batches) {bare / seconds:.2f}{memory}"}

    def direct_forward(self) -> dict:
        model, length, batch = self.model, self.sizes.length, self.sizes.eval_batch_size
        start = time.perf_counter()
        with torch.device(self.device):
            tokens, _ = direct_loglikelihood(model, self.tokenizer, self.eval_texts, length, batch)
        synchronize()
        self.direct_tokens_per_second = tokens / (time.perf_counter() - start)
        # The last step with the model in memory: keep what later FLOP counts need, and free it (mergekit, lm-eval
        # and the heal load their own copies)
        per_layer = forward_flops(model, [length], layers=1)
        head = forward_flops(model, [length], layers=0, head=True)
        self.window_flops = lambda layers: per_layer * layers + head
        del self.model
        return {"tokens": tokens, "flops": forward_flops(model, [length] * len(self.eval_texts), head=True),
                "notes": f"the floor under lm-eval: its rolling windows, one batched forward with logits, "
                         f"batch {batch}"}

    def choose_range(self) -> dict:
        scores, layers = self.distances.scores("angular_last"), self.num_layers
        pick = pick_similarity(Problem(layers, self.block_size, 0, 1, "angular_last", scores, make_search=None))
        block = Block(pick.dropped[0], self.block_size)
        ranges = kept_ranges(layers, block)
        check_ranges(ranges, layers, keep_first=0, keep_last=1)
        # The seed's shape, [0, start] + [start + block, layers]: the final layer is kept (the seed's [55, 59] lost it)
        expected = [(0, block.start), (block.stop, layers)] if block.start else [(block.stop, layers)]
        assert ranges == expected and block.stop < layers, ranges
        self.block, self.ranges = block, ranges
        shown = " + ".join(f"[{a},{b}]" for a, b in ranges)
        return {"ranges": shown, "start": block.start, "distance": float(scores[block.size, block.start]),
                "notes": f"angular_last, block of {block.size} keeping the final layer: {shown}"}

    def slice(self) -> dict:
        dropped = range(self.block.start, self.block.stop)
        check_free_space(self.work, 2 * 2 * count_parameters(self.base_dir, drop_layers=dropped))  # slice + copy
        start = time.perf_counter()
        slice_model(passthrough_config(str(self.base_dir), self.ranges, "bfloat16"), self.pruned_dir, progress=False)
        sliced = time.perf_counter() - start
        written = safetensors_bytes(self.pruned_dir)
        # The I/O floor: the same bytes, read and written as plain files on the same disk
        copy = self.work / "copy"
        copy.mkdir()
        start = time.perf_counter()
        for file in sorted(self.pruned_dir.glob("*.safetensors")):
            shutil.copyfile(file, copy / file.name)
        copied = time.perf_counter() - start
        shutil.rmtree(copy)
        return {"gb_per_second": written / sliced / 1e9, "copy_gb_per_second": written / copied / 1e9,
                "vs_copy": copied / sliced,
                "notes": f"{written / 1e9:.3g} GB written at {written / sliced / 1e9:.3g} GB/s; plain copy "
                         f"{written / copied / 1e9:.3g} GB/s; slice ÷ copy speed {copied / sliced:.2f}"}

    def perplexity(self, model_dir: Path) -> dict:
        result = evaluate_perplexity(model_dir, self.eval_path, max_length=self.sizes.length, device=self.device,
                                     batch_size=self.sizes.eval_batch_size, work_dir=self.work / model_dir.name)
        tokens, seconds = result["num_tokens"], result["seconds"]
        vs_direct = tokens / seconds / self.direct_tokens_per_second
        return {"tokens": tokens, "timed_seconds": seconds, "word_perplexity": result["word_perplexity"],
                "flops": self.window_flops(layers_in(model_dir)) * len(self.eval_texts), "vs_direct_forward": vs_direct,
                "notes": f"lm-eval scoring {seconds:.1f} s of the wall time (rest: loading); "
                         f"tokens/s ÷ direct forward {vs_direct:.2f}"}

    def heal(self) -> dict:
        from layerprune.heal import heal_model
        from layerprune.params import HealLoss, HealParams

        steps, batch, length = self.sizes.heal_steps, self.sizes.eval_batch_size, self.sizes.length
        params = HealParams(tokens=steps * batch * length, repeat=True, seq_len=length, batch_size=batch,
                            learning_rate=1e-5, loss=HealLoss(lm=1.0), validation_texts=batch, eval_every=steps,
                            save_every=steps)
        # The base folder is done with (the lm loss needs no teacher): its 22 GB at full size make room for the
        # Trainer's last checkpoint (fp32 master weights and Adam moments) and the healed bf16 copy.
        shutil.rmtree(self.base_dir)
        kept = count_parameters(self.pruned_dir)
        check_free_space(self.work, kept * (4 + 2) + 8 * kept // 4)  # fp32 + bf16 copies, Adam for up to 1/4
        result = heal_model(params, pruned_dir=self.pruned_dir, base_dir=self.base_dir, device=self.device,
                            dropped=list(range(self.block.start, self.block.stop)), held_out_ids=set(),
                            articles=[{"id": f"train-{i}", "text": t} for i, t in enumerate(self.texts)],
                            checkpoints=self.work / "checkpoints", log_dir=self.work / "heal_logs",
                            out_dir=self.work / "healed", fingerprint_inputs=[self.pruned_dir / "config.json"])
        # forward 2N, backward through the activations 2N, weight gradients 2 × trainable (one multiply-add each)
        forward = self.window_flops(self.num_layers - self.block.size) * result.tokens / length
        flops = 2 * forward + 2 * result.trainable_parameters * result.tokens
        return {"tokens": result.tokens, "timed_seconds": result.train_seconds, "flops": flops,
                "trainable_parameters": result.trainable_parameters,
                "notes": f"{result.steps} steps of {batch} × {length} tokens, the layers around the cut "
                         f"({result.trainable_parameters / 1e6:.3g}M weights) train; Trainer time "
                         f"{result.train_seconds:.1f} s (evaluations included) of the wall time; "
                         "FLOPs 4N + 2 × trainable"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--deadline", type=float, default=280)
    for field, value in vars(FULL_SIZES).items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, help=f"default {value} (full size)")
    args = parser.parse_args(argv)
    defaults = TINY_SIZES if args.tiny else FULL_SIZES
    sizes = Sizes(**{k: v if (v := getattr(args, k)) is not None else d for k, d in vars(defaults).items()})
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/scale.py needs a CUDA device; --tiny runs on CPU")
    out = args.out or REPO / "bench" / ("scale-tiny" if args.tiny else "scale")
    work = args.work or Path(tempfile.mkdtemp(prefix="layerprune-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shape = TINY if args.tiny else FALCON_11B
    steps = Steps(shape, sizes, device, work)
    peak = peak_tflops(device)
    run = Run(out, {
        "date": now(),
        "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "machine": machine(),
        "peak_bf16_tflops": peak,
        "model": f"Falcon-11B layout, random bf16 weights, {json.dumps(shape)}",
        "settings": {**vars(sizes), "block": steps.block_size, "deadline_s": args.deadline},
    }, peak)

    todo = steps.all()
    signal.signal(signal.SIGALRM, _alarm)
    try:
        # The deadline counts from the process's start, imports included: it is the wall time a GPU lease sees.
        # The alarm repeats every second: one that lands in a finalizer (__del__) is printed and ignored by Python.
        left = args.deadline - (time.time() - psutil.Process().create_time())
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), 1.0)
        for name, step in todo:
            try:
                run.step(name, step)
            except Exception as err:  # noqa: BLE001 - a GPU run is precious: record the failure, go on where possible
                run.steps.append({"step": name, "error": f"{type(err).__name__}: {err}".splitlines()[0]})
                print(f"scale: {name} failed: {err!r}", file=sys.stderr)
    except Deadline:
        recorded = {row["step"] for row in run.steps}  # the alarm may come after a step was recorded
        run.skipped = [name for name, _ in todo if name not in recorded]
        print(f"scale: deadline of {args.deadline:.0f} s reached; skipped {', '.join(run.skipped)}", file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    run.header["seconds"] = round(time.time() - psutil.Process().create_time(), 1)
    run.write(finished=not run.skipped)
    shutil.rmtree(work, ignore_errors=True)
    print((out / "scale.md").read_text())
    if any("error" in row for row in run.steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
