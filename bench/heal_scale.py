"""Benchmark of the heal at the seed's scale (issue 22): its goals as ratios measured side by side in one run.

    python bench/heal_scale.py [--keep DIR] [--out FILE]    ~10 min on 2 cores
    python bench/heal_scale.py --smoke --out FILE           a minute: small corpora and model, to check it runs

- The heal corpus at two sizes (1M and 20M tokens of a synthetic JSON-lines folder the bench writes, a 32,000-word
  vocabulary: uint16 shards): peak anonymous memory of the heal-corpus work, its tokens/s per core; then a heal on those
  shards killed after its second checkpoint and restarted: the restart's peak anonymous memory through two more steps,
  and its time from launch to the first step after the resume. Goals: memory at 20M minus at 1M <= 32 MB, restart time
  at 20M / at 1M <= 1.1.
- FSDP against DDP, 2 CPU processes (gloo), every decoder layer trainable, the same model and batches: tokens/s and the
  peak anonymous memory per process (the process tree's peak / 2). Goal: memory FSDP / DDP <= 0.75.
Writes bench/results-heal-scale.md.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, load_average, machine, markdown_table, now, num, usable_cores, write_table  # first
from scale import PeakMemory

VOCAB = 32_000
SEQ_LEN = 256


def write_corpus(folder: Path, tokens: int, seed: int = 0) -> None:
    """JSON-lines files of random words w3..w31999 (one token each with the word tokenizer), ~1M tokens a file."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    written, index = 0, 0
    while written < tokens:
        lines = []
        for _ in range(1000):
            words = rng.randrange(200, 2000)
            lines.append(json.dumps({"id": f"{index}-{len(lines)}",
                                     "text": " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(words))}))
            written += words + 1
            if written >= tokens:
                break
        (folder / f"part-{index:04d}.jsonl").write_text("\n".join(lines) + "\n")
        index += 1


def dropped(layers: int) -> list[int]:
    return [layers // 2, layers // 2 + 1]


def write_models(work: Path, layers: int, hidden: int) -> None:
    """A random-init Llama as the base and the same with two middle layers cut as the pruned model, with the word
    tokenizer; the pruned model is saved as its own folder, as mergekit would write it."""
    from transformers import LlamaConfig

    from layerprune.tiny_models import build, word_tokenizer

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ_LEN)
    base = build(config, seed=0)
    base.save_pretrained(work / "base")
    del base.model.layers[dropped(layers)[0] : dropped(layers)[-1] + 1]
    base.config.num_hidden_layers = layers - 2
    base.save_pretrained(work / "pruned")
    for folder in ("base", "pruned", "tokenizer"):
        word_tokenizer(VOCAB).save_pretrained(work / folder)


# ---- the measured work, each in a process of its own ----


def do_prepare(work: Path, corpus: Path, out: Path, tokens: int) -> None:
    from layerprune.heal_corpus import HeldOut, hub_rows, prepare
    from layerprune.params import HealCorpusParams

    source = HealCorpusParams(source="hub", dataset=str(corpus), tokens=tokens, shard_tokens=1 << 22)
    (work / "eval.jsonl").write_text(json.dumps({"id": "x", "text": "w5 w6"}) + "\n")
    prepare(source, lambda state: hub_rows(source, None, state), tokenizer_dir=work / "tokenizer",
            held_out=HeldOut.read(work / "eval.jsonl", 2000), out_dir=out, source_id={"corpus": str(corpus)},
            progress=False)


def heal_settings(steps: int, trainable: str = "cut", processes: int = 1, fsdp: bool = False):
    from layerprune.params import HealLaunchParams, HealParams

    heal = HealParams(tokens=steps * 4 * SEQ_LEN, seq_len=SEQ_LEN, batch_size=4, learning_rate=1e-4,
                      loss={"lm": 1.0}, head_every=4, trainable=trainable, eval_every=1000)
    return heal, HealLaunchParams(processes=processes, fsdp=fsdp, save_every=1)


def do_heal(work: Path, shards: Path, out: Path, steps: int, trainable: str, fsdp: bool) -> None:
    import torch
    from transformers import AutoConfig

    from layerprune.heal import heal_model

    torch.set_num_threads(1 if "LOCAL_RANK" in os.environ else 2)
    processes = int(os.environ.get("WORLD_SIZE", 1))
    heal, launch = heal_settings(steps, trainable, processes, fsdp)
    layers = AutoConfig.from_pretrained(work / "base").num_hidden_layers
    result = heal_model(heal, launch, pruned_dir=work / "pruned", base_dir=work / "base", dropped=dropped(layers),
                        shards=shards, checkpoints=out / "checkpoints", log_dir=out / "curves",
                        out_dir=out / "healed", device="cpu", fingerprint_inputs=[work / "pruned", shards])
    if result.is_main_process:
        (out / "result.json").write_text(json.dumps(result.timing()))


# glibc keeps freed memory in per-thread arenas and below its mmap threshold, so a process's resident memory shows the
# most it ever freed rather than what it holds (under FSDP, gathered layers freed every step). One arena and mmap for
# every block of 64 KiB or more make RSS follow what is live; --allocator default measures glibc as it comes.
LIVE_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def launch(args: list[str], processes: int = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'bench'}", "TOKENIZERS_PARALLELISM": "true",
           **(LIVE_MEMORY if ALLOCATOR == "live" else {})}
    prefix = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={processes}"]
    return subprocess.Popen(prefix + [__file__, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measured(args: list[str], processes: int = 1, until=None) -> dict:
    """Run to the end (or until `until()` is true, then SIGKILL the tree): wall seconds, peak anonymous memory of the
    process tree, CPU seconds of the children."""
    import psutil

    before = os.times()
    started = time.perf_counter()
    process = launch(args, processes)
    peak = PeakMemory(process.pid, every=0.05)
    peak.start()
    killed = False
    while process.poll() is None:
        if until and until():
            tree = psutil.Process(process.pid)
            for p in [*tree.children(recursive=True), tree]:
                p.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.02)
    wall = time.perf_counter() - started
    memory = peak.stop()
    if process.returncode and not killed:
        raise RuntimeError(process.stderr.read().decode()[-3000:])
    after = os.times()
    return {"started": started, "wall": wall, "peak": memory,
            "cpu": after.children_user + after.children_system - before.children_user - before.children_system}


def corpus_size(work: Path, tokens: int) -> dict:
    corpus, shards, heal = work / f"corpus-{tokens}", work / f"shards-{tokens}", work / f"heal-{tokens}"
    write_corpus(corpus, tokens)
    prepared = measured(["prepare", str(work), str(corpus), str(shards), str(tokens)])
    # a heal of 4 steps, killed once its second checkpoint is complete, then restarted: the restart's memory through
    # steps 3 and 4, and its time from launch to the end of step 3 (its checkpoint, save_every 1)
    done = lambda step: (heal / f"checkpoints/checkpoint-{step}/trainer_state.json").exists()  # noqa: E731
    measured(["heal", str(work), str(shards), str(heal), "4", "cut", "0"], until=lambda: done(2))
    first_step = []

    def watch() -> bool:  # never stops the run: notes when step 3's checkpoint is complete
        if not first_step and done(3):
            first_step.append(time.perf_counter())
        return False

    restarted = measured(["heal", str(work), str(shards), str(heal), "4", "cut", "0"], until=watch)
    restart_seconds = first_step[0] - restarted["started"]
    return {"tokens": tokens, "prepare": prepared, "restart": restarted, "restart_to_first_step": restart_seconds,
            "resumed_from": json.loads((heal / "result.json").read_text())["resumed_from_step"]}


def fsdp_against_ddp(work: Path, shards: Path, steps: int) -> dict:
    """DDP, then FSDP, on 2 processes: the same model (models/ under work), batches and steps."""
    out = {}
    for name, fsdp in (("ddp", "0"), ("fsdp", "1")):
        folder = work / f"parallel-{name}"
        run = measured(["heal", str(work), str(shards), str(folder), str(steps), "all", fsdp], processes=2)
        run["tokens_per_second"] = json.loads((folder / "result.json").read_text())["tokens_per_second"]
        out[name] = run
    return out


# The parallel part trains a wider model (its decoder layers, all trainable, are most of its memory, as in the 5.5B
# model; the frozen embedding and head are most of the corpus part's small one)
SIZES = {"full": dict(small=1_000_000, large=20_000_000, layers=8, hidden=256, parallel_hidden=768, steps=6),
         "smoke": dict(small=20_000, large=40_000, layers=4, hidden=64, parallel_hidden=64, steps=2)}
ALLOCATOR = "live"


def report(small: dict, large: dict, parallel: dict, cores: int, command: str) -> str:
    mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
    prep_rate = lambda r: r["tokens"] / r["prepare"]["wall"] / cores  # noqa: E731
    size = lambda n: f"{n / 1e6:g}M"  # noqa: E731
    large_small = f"{size(large['tokens'])} − {size(small['tokens'])} tokens"
    rows = [
        [f"heal-corpus peak anonymous memory, {large_small}", mb(large["prepare"]["peak"] - small["prepare"]["peak"]),
         "≤ 32 MB", f"{mb(small['prepare']['peak'])} → {mb(large['prepare']['peak'])}"],
        [f"heal restart + 2 steps, peak anonymous memory, {large_small}",
         mb(large["restart"]["peak"] - small["restart"]["peak"]), "≤ 32 MB",
         f"{mb(small['restart']['peak'])} → {mb(large['restart']['peak'])}"],
        [f"heal restart to first step, {size(large['tokens'])} ÷ {size(small['tokens'])} tokens",
         f"**{num(large['restart_to_first_step'] / small['restart_to_first_step'])}**", "≤ 1.1",
         f"{small['restart_to_first_step']:.1f} s → {large['restart_to_first_step']:.1f} s (resumed from step "
         f"{small['resumed_from']} and {large['resumed_from']})"],
        ["heal-corpus tokens/s per core", f"{prep_rate(small):,.0f} / {prep_rate(large):,.0f}", "reported",
         f"{size(small['tokens'])} / {size(large['tokens'])} tokens, {cores} cores, word-level tokenizer"],
        ["FSDP ÷ DDP tokens/s, 2 CPU processes, trainable all",
         f"**{num(parallel['fsdp']['tokens_per_second'] / parallel['ddp']['tokens_per_second'])}**", "reported",
         f"{parallel['fsdp']['tokens_per_second']:.0f} vs {parallel['ddp']['tokens_per_second']:.0f} tokens/s"],
        ["FSDP ÷ DDP peak anonymous memory per process",
         f"**{num(parallel['fsdp']['peak'] / parallel['ddp']['peak'])}**", "≤ 0.75",
         f"{mb(parallel['fsdp']['peak'] / 2)} vs {mb(parallel['ddp']['peak'] / 2)}"],
    ]
    allocator = ("glibc as it comes" if ALLOCATOR == "default" else
                 "glibc with " + " ".join(f"{k}={v}" for k, v in LIVE_MEMORY.items()) + " (resident memory follows "
                 "what is live; `--allocator default` for glibc as it comes)")
    return (f"Measured {now()} by `{command}`.\n\nMachine: {machine()}; {load_average()} at the end. "
            f"Allocator: {allocator}.\n\n"
            + markdown_table(["measurement", "result", "goal", "numbers"], rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder, removed)")
    parser.add_argument("--smoke", action="store_true", help="small corpora and model: checks that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results-heal-scale.md")
    parser.add_argument("--allocator", choices=["live", "default"], default="live")
    args = parser.parse_args()
    global ALLOCATOR
    ALLOCATOR = args.allocator
    size = SIZES["smoke" if args.smoke else "full"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="heal-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        write_models(work, layers=size["layers"], hidden=size["hidden"])
        small, large = corpus_size(work, size["small"]), corpus_size(work, size["large"])
        write_models(work, layers=size["layers"], hidden=size["parallel_hidden"])  # replaces the corpus part's
        parallel = fsdp_against_ddp(work, work / f"shards-{size['small']}", size["steps"])
        data = {"small": small, "large": large, "parallel": parallel}
        args.out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        command = "python bench/heal_scale.py" + (" --smoke" if args.smoke else "") + (
            " --allocator default" if ALLOCATOR == "default" else "")
        write_table(args.out, report(small, large, parallel, usable_cores(), command))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        do_prepare(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "heal":
        do_heal(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
                sys.argv[7] == "1")
    else:
        main()
