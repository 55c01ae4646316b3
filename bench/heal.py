"""Benchmark of the heal stage (issue 11): its goals as ratios measured side by side in one run.

    python bench/heal.py [--pipeline DIR]    DIR holds a finished pipeline's models/, data/ and metrics/ (default:
                                             this repo); takes ~20 min on 2 idle cores

- the heal stage exactly as dvc.yaml runs it (torchrun, params.yaml's heal section): wall time vs the 5-minute goal;
- held-out bits per byte (lm-eval, the perplexity stage's task) of base, pruned and healed: gap closed =
  (pruned - healed) / (pruned - base), goal >= 0.65;
- the control: the unpruned base trained with the same recipe, budget and text, on the same layers (those around
  where the cut is), so a reader sees how much of the gain is adaptation to the text rather than healing the cut;
- Trainer overhead: heal tokens/s over a bare forward + backward + step loop on the same weights, batches and loss;
- the curve of gap closed on the validation slice against tokens seen, from the stage's DVCLive log, as a PNG.
Writes bench/results-heal.md and plots/heal_gap_closed.png.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from layerprune.heal import (  # noqa: E402
    Blocks, HealTrainer, heal_model, matched_states, training_arguments, training_data,
)
from layerprune.models import ModelInfo  # noqa: E402
from layerprune.params import load_params  # noqa: E402
from layerprune.perplexity import evaluate_perplexity  # noqa: E402
from layerprune.texts import read_jsonl  # noqa: E402
from measure import interleave, machine, ratio, timed  # noqa: E402

OVERHEAD_STEPS, OVERHEAD_ROUNDS = 4, 2


def run_stage(pipeline: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the heal stage, launched as dvc.yaml launches it, writing into `out`.

    CPU seconds say what the wall time would be on idle cores (CPU seconds / cores) when neighbours share them."""
    params = load_params(REPO / "params.yaml")
    args = {"model-info": pipeline / "models/base.json", "pruned-dir": pipeline / "models/pruned",
            "choice": pipeline / "metrics/choice.json", "corpus": pipeline / "data/corpus.jsonl",
            "eval-texts": pipeline / "data/eval.jsonl", "checkpoints": out / "checkpoints", "curves": out / "curves",
            "healed-dir": out / "healed", "metrics": out / "heal.json"}
    command = ["torchrun", "--standalone", "--nproc_per_node", str(params.heal.processes), str(REPO / "stages/heal.py"),
               "--params", str(REPO / "params.yaml"), *[x for k, v in args.items() for x in (f"--{k}", str(v))]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    # run in the pipeline's folder: models/base.json names the base model's folder relative to it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(subprocess.run, command, cwd=pipeline, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def bits_per_byte(model_dir, pipeline: Path, work: Path) -> float:
    e = load_params(REPO / "params.yaml").eval
    return evaluate_perplexity(model_dir, pipeline / "data/eval.jsonl", max_length=e.max_length,
                               batch_size=e.batch_size, work_dir=work)["bits_per_byte"]


def validation_blocks(heal, tokenizer, pipeline: Path) -> torch.Tensor:
    """The stage's validation slice, packed as the stage packs it."""
    held_out = {row["id"] for row in read_jsonl(pipeline / "data/eval.jsonl")}
    return training_data(heal, tokenizer, read_jsonl(pipeline / "data/corpus.jsonl"), held_out).validation


@torch.no_grad()
def mean_loss(model_dir, blocks: torch.Tensor, batch_size: int) -> float:
    """Next-token loss per token on equal-length blocks: what the Trainer reports as eval_loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = blocks.split(batch_size)
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def overhead(heal, pipeline: Path, work: Path) -> dict:
    """Tokens/s of HealTrainer.train() and of a bare loop on the same trainable weights, batches and loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.heal import cut_layers, select_trainable

    pruned = pipeline / "models/pruned"
    dropped = json.loads((pipeline / "metrics/choice.json").read_text())["dropped"]
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    num_layers = model.config.get_text_config().num_hidden_layers
    model = select_trainable(model, heal, cut_layers(dropped, num_layers, heal.cut_layers))
    teacher = None
    if heal.loss.kl or heal.loss.hidden:
        teacher = AutoModelForCausalLM.from_pretrained(
            pipeline / ModelInfo.load(pipeline / "models/base.json").model_dir(), dtype=torch.float32).eval()
    held_out = {row["id"] for row in read_jsonl(pipeline / "data/eval.jsonl")}
    train = training_data(heal, AutoTokenizer.from_pretrained(pruned), read_jsonl(pipeline / "data/corpus.jsonl"),
                          held_out).train
    batches = train[: OVERHEAD_STEPS * heal.batch_size]  # both sides take the same OVERHEAD_STEPS steps
    args = training_arguments(heal, OVERHEAD_STEPS, work / "overhead", "cpu")
    args.eval_strategy, args.save_strategy, args.eval_on_start, args.disable_tqdm = "no", "no", False, True
    trainer = HealTrainer(model=model, args=args, train_dataset=Blocks(batches), heal=heal, teacher=teacher,
                          matched=matched_states(dropped, num_layers, heal.cut_layers))

    def bare(_):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=heal.learning_rate,
                                      weight_decay=0.0)
        start = time.perf_counter()
        model.train()
        for batch in batches.split(heal.batch_size):
            trainer.compute_loss(model, {"input_ids": batch}).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return time.perf_counter() - start

    runs = interleave({"trainer": lambda _: timed(trainer.train), "bare": bare}, OVERHEAD_ROUNDS)
    tokens = batches.numel()
    return {"ratio": ratio(runs["bare"], runs["trainer"]), "trainer": tokens / min(runs["trainer"]),
            "bare": tokens / min(runs["bare"]), "tokens": tokens}


def curve_png(curve: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t for t, _ in curve], [100 * g for _, g in curve], marker="o")
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("gap closed, % (validation slice)")
    ax.set_title("Healing: (pruned - healed) / (pruned - base)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=REPO, help="folder with models/, data/ and metrics/")
    pipeline = parser.parse_args().pipeline.resolve()
    params = load_params(REPO / "params.yaml")
    heal = params.heal
    started, at_start = time.perf_counter(), machine()
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        work = Path(tmp)
        stage_seconds, stage_cpu = run_stage(pipeline, work / "stage")
        metrics = json.loads((work / "stage/heal.json").read_text())
        timing = json.loads((pipeline / "logs/heal.timing.json").read_text())  # the stage ran in the pipeline's folder
        base_dir = pipeline / ModelInfo.load(pipeline / "models/base.json").model_dir()

        # The control: the base model, trained with the same recipe on the layers around where the cut is.
        dropped = json.loads((pipeline / "metrics/choice.json").read_text())["dropped"]
        heal_model(heal, pruned_dir=base_dir, base_dir=base_dir, dropped=dropped,
                   articles=read_jsonl(pipeline / "data/corpus.jsonl"),
                   held_out_ids={r["id"] for r in read_jsonl(pipeline / "data/eval.jsonl")},
                   checkpoints=work / "control/checkpoints", log_dir=work / "control/curves",
                   out_dir=work / "control/healed", device="cpu", fingerprint_inputs=[])

        bpb = {name: bits_per_byte(folder, pipeline, work / f"eval-{name}") for name, folder in {
            "base": base_dir, "pruned": pipeline / "models/pruned", "healed": work / "stage/healed",
            "control": work / "control/healed"}.items()}
        closed = (bpb["pruned"] - bpb["healed"]) / (bpb["pruned"] - bpb["base"])

        from transformers import AutoTokenizer

        blocks = validation_blocks(heal, AutoTokenizer.from_pretrained(pipeline / "models/pruned"), pipeline)
        base_val = mean_loss(base_dir, blocks, heal.batch_size)
        eval_rows = (work / "stage/curves/plots/metrics/eval/loss.tsv").read_text().splitlines()[1:]
        tokens_per_step = metrics["tokens"] // metrics["steps"]
        losses = [(int(step) * tokens_per_step, float(loss)) for step, loss in (r.split("\t") for r in eval_rows)]
        pruned_val = losses[0][1]
        curve = [(tokens, (pruned_val - loss) / (pruned_val - base_val)) for tokens, loss in losses]
        curve_png(curve, REPO / "plots/heal_gap_closed.png")

        cost = overhead(heal, pipeline, work)

    recipe = (f"loss {heal.loss.model_dump(exclude_defaults=True)}, head_every {heal.head_every}, trainable "
              f"{heal.trainable} ({heal.cut_layers} per side), lr {heal.learning_rate:g} {heal.schedule}, "
              f"{metrics['steps']} steps × {heal.batch_size} × {heal.seq_len} tokens")
    cores = len(os.sched_getaffinity(0))
    rows = [
        (f"heal stage CPU time ÷ ({cores} cores × 5 minutes): its wall time on idle cores ÷ 5 minutes",
         stage_cpu / cores / 300, "≤ 1", f"{stage_cpu:.0f} CPU s; wall {stage_seconds:.0f} s on the shared machine "
         f"({timing['tokens_per_second']:.1f} tokens/s in training)", recipe),
        ("held-out gap closed, bits per byte: (pruned − healed) ÷ (pruned − base)", closed, "≥ 0.65",
         f"base {bpb['base']:.4f}, pruned {bpb['pruned']:.4f}, healed {bpb['healed']:.4f}",
         f"lm-eval, {params.eval.max_length}-token windows, data/eval.jsonl"),
        ("control: base's held-out change ÷ the pruned model's gain", (bpb["base"] - bpb["control"])
         / (bpb["pruned"] - bpb["healed"]), "",
         f"base {bpb['base']:.4f} → {bpb['control']:.4f} bits/byte after the same training",
         "the share of the gain that is adaptation to the text, not the cut healing"),
        ("Trainer tokens/s ÷ bare loop tokens/s", cost["ratio"], "≥ 0.85",
         f"{cost['trainer']:.1f} vs {cost['bare']:.1f} tokens/s",
         f"{OVERHEAD_STEPS} steps of the same batches, loss and weights, {OVERHEAD_ROUNDS} interleaved rounds"),
    ]
    curve_text = ", ".join(f"{t:,} tokens: {100 * g:.0f}%" for t, g in curve)
    table = "\n".join(f"| {what} | **{value:.3g}** | {goal} | {detail} | {how} |"
                      for what, value, goal, detail, how in rows)
    text = f"""Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python bench/heal.py` \
({time.perf_counter() - started:.0f} s) on {pipeline.name}'s models and texts.

Machine: {at_start}; {", ".join(f"{x:.1f}" for x in os.getloadavg())} at the end.

| measurement | ratio | goal | numbers | how |
|---|---:|---|---|---|
{table}

Gap closed on the validation slice ({heal.validation_texts} articles, neither trained on nor held out; base
{base_val:.4f}, pruned {pruned_val:.4f} nats/token) by tokens seen: {curve_text}. Plot: plots/heal_gap_closed.png.
"""
    (REPO / "bench/results-heal.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
