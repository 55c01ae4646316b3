"""Benchmark harness (issue 8): how long an analyse-prune-evaluate round takes, and how little reruns when one thing
changes, as ratios measured side by side in one run, with the absolute numbers and the machine they came from.

    python bench/run.py              the embedded default (params.yaml: Gemma 3 270M), default sizes (~15 min, 2 cores)
    python bench/run.py --quick      the same model, fewer texts; DVC part at tests/pipeline_repo.SMALL sizes
    python bench/run.py --smoke      a tiny random Llama, no DVC part, under a minute (tests/test_bench.py)
    --update-docs                    also put the table between <!-- bench:start --> and <!-- bench:end --> in
                                     docs/benchmarks.md
    --threads N                      torch threads (the smoke test uses 1: see --help)

Writes the table to bench/results.md (results-quick.md, results-smoke.md for the other modes) and prints it.
"""
import argparse
import os
import random
import runpy
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (  # first: offline switches
    REPO, load_average, machine, now, num, paths, ratio_table, row, write_table,
)
import torch

from layerprune.files import write_jsonl
from layerprune.cost import forward_flops
from layerprune.forward import pad_token_id, tokenize
from layerprune.layers import decoder_layers
from layerprune.models import ModelInfo, export_bundled, load_model
from layerprune.params import load_params
from layerprune.perplexity import evaluate_perplexity
from layerprune.ranges import kept_ranges, passthrough_config
from layerprune.similarity import layer_distances
from layerprune.strategies import Block
from layerprune.texts import fetch_bundled, split_samples
from measure import (
    bare_forward, direct_loglikelihood, in_child, interleave, matmul_flops_per_second, pruneme_pass,
    ratio, similarity_peak_rss, timed, timed_slice,
)

MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")
DOCS_PAGE = "docs/benchmarks.md"  # the page whose table --update-docs rewrites


@dataclass
class Sizes:
    texts: int  # calibration texts in the timed similarity comparisons
    memory_texts: tuple[int, int]  # the two sample counts of the peak-memory runs: memory must not grow with them
    eval_texts: int  # held-out texts in the perplexity comparison
    rounds: int  # interleaved rounds per comparison
    dvc: dict | None  # params overrides for the DVC part (None: skip it)
    max_length: int = 32  # similarity; real modes take these four from params.yaml
    batch_size: int = 4
    eval_max_length: int = 32
    eval_batch_size: int = 2


def pipeline_repo() -> dict:
    """The names of tests/pipeline_repo.py: PipelineRepo, the throwaway copy of the pipeline that the end-to-end tests
    run (the DVC part of the full and quick modes runs in one), and its SMALL sizes. tests/ is not a package, so the
    file is run by path."""
    return runpy.run_path(str(REPO / "tests/pipeline_repo.py"))


def sizes_for(mode: str, params) -> Sizes:
    if mode == "smoke":
        return Sizes(texts=16, memory_texts=(8, 32), eval_texts=4, rounds=3, dvc=None)
    quick = mode == "quick"
    return Sizes(
        texts=16 if quick else 32, memory_texts=(16, 64) if quick else (32, 128), eval_texts=4 if quick else 8,
        rounds=3 if quick else 5, dvc=pipeline_repo()["SMALL"] if quick else {},
        max_length=params.similarity.max_length, batch_size=params.similarity.batch_size,
        eval_max_length=params.eval.max_length, eval_batch_size=params.eval.batch_size,
    )


# ---- what is measured on ----


def tiny_model(work: Path, num_texts: int) -> tuple[str, str, list[str]]:
    """A tiny random Llama with a word-level tokenizer (word w<i> is token id i), and random texts."""
    from layerprune.tiny_models import VOCAB, tiny_llama, word_tokenizer

    model_dir = work / "tiny"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer(VOCAB).save_pretrained(model_dir)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(rng.randrange(8, 60))) for _ in range(num_texts)]
    return str(model_dir), "tiny random Llama (6 layers, hidden 32)", texts


def embedded_default(params, work: Path, num_texts: int) -> tuple[str, str, list[str]]:
    """The pipeline's model (models/base when the model stage has exported it, else a fresh export) and texts
    sampled as the sample stage samples them."""
    info = paths().base_info
    if info.exists() and ModelInfo.load(info).id == params.model.id:
        model_dir = str(REPO / ModelInfo.load(info).model_dir())
    else:
        model_dir = str(work / "base")
        export_bundled(params.model.id, Path(model_dir))
    s = params.sample
    _, articles = fetch_bundled(params.lang)
    split = split_samples(articles, num_texts, 1, s.min_chars, s.max_chars, s.seed)
    return model_dir, f"{params.model.id}, lang={params.lang}", [a["text"] for a in split.calibration]


# ---- the comparisons; each returns table rows ----


def similarity_rows(model, tokenizer, texts, sizes: Sizes) -> list[dict]:
    pad_id = pad_token_id(tokenizer)
    ids, _ = tokenize(tokenizer, texts[: sizes.texts], sizes.max_length)
    tokens, num_layers, bs = sum(map(len, ids)), len(decoder_layers(model)), sizes.batch_size
    # The first forward pass pays one-time setup (kernel selection, lazy buffers): keep it out of every timing.
    layer_distances(model, ids[:bs], batch_size=bs, pad_id=pad_id, progress=False)
    run_ours = lambda r: timed(layer_distances, model, ids, batch_size=bs, pad_id=pad_id, progress=False)
    runs = interleave({"ours": run_ours, "bare": lambda r: timed(bare_forward, model, ids, bs, pad_id),
                       "matmul": lambda r: matmul_flops_per_second()}, sizes.rounds)
    # PruneMe's pass costs the same for every n (the forward pass dominates) and is slow: time the smallest and
    # the largest n, one per round, against layer_distances in two rounds of their own.
    ns = [1, num_layers - 1]
    pruneme = interleave({"ours": run_ours, "pass": lambda r: timed(pruneme_pass, model, ids, ns[r], bs, pad_id)}, 2)
    sweep = [t * (num_layers - 1) for t in pruneme["pass"]]
    ours, bare, matmul = min(runs["ours"]), min(runs["bare"]), max(runs["matmul"])
    flops = forward_flops(model, list(map(len, ids)))
    how = f"{len(ids)} texts, {tokens} tokens (≤ {sizes.max_length} each), batch {bs}"
    return [
        row("similarity: `layer_distances` tokens/s ÷ bare body forward (no hooks, no lm_head), same batches",
            ratio(runs["bare"], runs["ours"]), "≥ 0.8", f"{tokens / ours:,.0f} tok/s", f"{tokens / bare:,.0f} tok/s",
            how),
        row(f"similarity: PruneMe-style sweep n = 1..{num_layers - 1} time ÷ `layer_distances` time (speed-up)",
            ratio(sweep, pruneme["ours"]), "> 1", f"{num(min(pruneme['ours']))} s",
            f"{num(min(sweep))} s", f"full model with logits and `output_hidden_states`, one pass per n "
            f"in dataset order; timed n = {ns[0]} and {ns[1]} (2 rounds), × {num_layers - 1} passes (extrapolated)"),
        row("similarity: achieved FLOP/s of `layer_distances` ÷ fp32 matmul FLOP/s",
            ratio([flops / t for t in runs["ours"]], runs["matmul"]), "", f"{flops / ours / 1e9:.1f} GFLOP/s",
            f"{matmul / 1e9:.1f} GFLOP/s",
            f"{flops / tokens / 1e6:.3g} MFLOP/token (2 × layer params + causal attention); 2048² matmul, best of 3"),
    ]


def memory_rows(model, model_dir, tokenizer, texts, sizes: Sizes) -> list[dict]:
    pad_id = pad_token_id(tokenizer)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for count in sizes.memory_texts:
        ids, _ = tokenize(tokenizer, texts[:count], sizes.max_length)
        peak = in_child(similarity_peak_rss, model_dir, ids, sizes.batch_size, pad_id)
        rows.append(row(f"similarity: peak anonymous RSS above the loaded model ÷ model size in memory, {count} texts",
                        peak / model_bytes, "flat in texts", f"{num(peak / 2**20)} MiB",
                        f"{num(model_bytes / 2**20)} MiB", f"{sum(map(len, ids))} tokens; fresh process, polled every ms"))
    return rows


def eval_rows(model, model_dir, tokenizer, texts, sizes: Sizes, work: Path) -> list[dict]:
    path = work / "eval.jsonl"
    texts = texts[: sizes.eval_texts]
    write_jsonl(path, [{"text": t} for t in texts])
    length, bs = sizes.eval_max_length, sizes.eval_batch_size

    def lm_eval(r):
        out = evaluate_perplexity(Path(model_dir), path, max_length=length, batch_size=bs, device="cpu",
                                  work_dir=work / "lm_eval")
        return out["num_tokens"] / out["seconds"]

    def direct(r):
        start = time.perf_counter()
        tokens, _ = direct_loglikelihood(model, tokenizer, texts, length, bs)
        return tokens / (time.perf_counter() - start)

    direct(0)  # warm-up, as in similarity_rows; lm-eval's own set-up is part of what it costs and stays in
    runs = interleave({"lm_eval": lm_eval, "direct": direct}, sizes.rounds)
    return [row("evaluation: lm-eval perplexity tokens/s ÷ direct batched forward, same rolling windows",
                ratio(runs["lm_eval"], runs["direct"]), "", f"{max(runs['lm_eval']):,.0f} tok/s",
                f"{max(runs['direct']):,.0f} tok/s",
                f"{len(texts)} texts, windows of {length}, batch {bs}; lm-eval's time is its `simple_evaluate` "
                f"(task set-up included, model load not), as the pipeline reports it")]


def slicing_rows(model_dir, num_layers: int, dtype: str, layers: int, sizes: Sizes, work: Path) -> list[dict]:
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    block = Block(num_layers - 1 - layers, layers)  # the deepest block that keeps the final layer
    config = passthrough_config(str(Path(model_dir).resolve()), kept_ranges(num_layers, block), dtype)

    def mergekit(r):
        result = in_child(timed_slice, config, str(work / "slice"))
        shutil.rmtree(work / "slice")
        return result

    def copy(r):  # the I/O floor: read and write the same bytes
        (work / "copy").mkdir()
        seconds = sum(timed(shutil.copyfile, f, work / "copy" / f.name) for f in weights)
        shutil.rmtree(work / "copy")
        return seconds

    runs = interleave({"mergekit": mergekit, "copy": copy}, sizes.rounds)
    seconds = [s for s, _ in runs["mergekit"]]
    peak = max(p for _, p in runs["mergekit"])
    how = f"drop {layers} of {num_layers} layers to {dtype}; {num(size / 2**20)} MiB of safetensors"
    return [
        row("slicing: mergekit slice time ÷ copying the safetensors", ratio(seconds, runs["copy"]), "",
            f"{num(min(seconds))} s", f"{num(min(runs['copy']))} s", how),
        row("slicing: mergekit peak anonymous RSS ÷ safetensors size", peak / size, "", f"{num(peak / 2**20)} MiB",
            f"{num(size / 2**20)} MiB", "fresh process, imports excluded"),
    ]


def dvc_rows(overrides: dict, layers: int, lang: str, work: Path) -> list[dict]:
    """Whole-pipeline wall times in a throwaway git repo. Sequential by nature (each run builds on the last), so
    these ratios are not interleaved: read them as 'how much of a full round a change costs'."""
    PipelineRepo = pipeline_repo()["PipelineRepo"]
    repo = PipelineRepo.create(work / "pipeline", overrides)
    other = "de" if lang != "de" else "fr"
    steps = [
        ("full `dvc repro`", ["repro"]),
        (f"`dvc exp run -S prune.layers={layers + 1}`", ["exp", "run", "-S", f"prune.layers={layers + 1}"]),
        (f"`dvc exp run -S lang={other}`", ["exp", "run", "-S", f"lang={other}"]),
        ("no-op `dvc repro`", ["repro"]),
    ]
    rows, full, stages = [], None, None
    for name, args in steps:
        start = time.perf_counter()
        ran = len(PipelineRepo.stages_run(repo.dvc(*args)))
        seconds = time.perf_counter() - start
        full, stages = full or seconds, stages or ran  # the first run, a full repro, runs every stage
        sizes = f"; sizes {overrides}" if overrides and not rows else ""
        rows.append(row(f"reruns: {name} ÷ full `dvc repro`", seconds / full, "", f"{seconds:.1f} s",
                        f"{full:.1f} s", f"{ran} of {stages} stages ran{sizes}"))
    return rows


# ---- output ----


def replace_block(text: str, block: str) -> str:
    """text with everything between the bench markers replaced by block; nothing outside them changes."""
    start, end = MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{DOCS_PAGE} needs exactly one {start} followed by one {end}")
    head, rest = text.split(start)
    return head + start + "\n" + block + end + rest.split(end)[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    parser.add_argument("--out", type=Path, help="markdown file for the table (default: bench/results[-mode].md)")
    parser.add_argument("--update-docs", action="store_true", help=f"also put the table into {DOCS_PAGE}")
    parser.add_argument("--threads", type=int, help="torch threads, here and in every child process (default: "
                        "torch's choice); 1 keeps tiny models fast on a machine busy with other work")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the measurement children and DVC's stages
        torch.set_num_threads(args.threads)
    args.mode = args.mode or "full"
    out = args.out or REPO / "bench" / f"results{'' if args.mode == 'full' else '-' + args.mode}.md"

    began, host = time.perf_counter(), machine()
    params = load_params(paths().params)
    sizes = sizes_for(args.mode, params)
    with tempfile.TemporaryDirectory(prefix="layerprune-bench-") as tmp:
        work = Path(tmp)
        num_texts = max(sizes.texts, *sizes.memory_texts, sizes.eval_texts)
        model_dir, name, texts = (tiny_model(work, num_texts) if args.mode == "smoke"
                                  else embedded_default(params, work, num_texts))
        model, tokenizer = load_model(model_dir, "cpu")
        num_layers = len(decoder_layers(model))
        layers = 2 if args.mode == "smoke" else params.prune.layers
        sections = [
            ("similarity", lambda: similarity_rows(model, tokenizer, texts, sizes)),
            ("memory", lambda: memory_rows(model, model_dir, tokenizer, texts, sizes)),
            ("evaluation", lambda: eval_rows(model, model_dir, tokenizer, texts, sizes, work)),
            ("slicing", lambda: slicing_rows(model_dir, num_layers, params.slice.dtype, layers, sizes, work)),
        ]
        if sizes.dvc is not None:
            sections.append(("reruns", lambda: dvc_rows(sizes.dvc, params.prune.layers, params.lang, work)))
        rows = []
        for section, run_section in sections:
            start = time.perf_counter()
            rows += run_section()
            print(f"bench: {section} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    header = (
        f"Measured {now()} by `python bench/run.py"
        f"{'' if args.mode == 'full' else ' --' + args.mode}` ({args.mode} mode, {time.perf_counter() - began:.0f} s) "
        f"on {name}, {num_layers} layers.\n\nMachine: {host}; {load_average()} at the end.\n\n"
        f"Ratios are the median of per-round ratios over {sizes.rounds} interleaved rounds (A, B, A, B), unless the "
        f"row says otherwise. Absolute times are the best round of each side (a busy machine only ever adds time), "
        f"so their quotient can differ from the ratio when the load changed between rounds."
    )
    text = ratio_table(rows, header)
    write_table(out, text)
    if args.update_docs:
        page = REPO / DOCS_PAGE
        page.write_text(replace_block(page.read_text(), text))


if __name__ == "__main__":
    main()
