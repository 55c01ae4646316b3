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
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (  # first: offline switches
    PIPELINE_PATHS, REPO, load_average, machine, markdown_table, now, num, paths, stage_args, stage_outputs,
    usable_cores, write_table,
)
import torch

from layerprune.files import read_json
from layerprune.heal import HealTrainer, heal_model, student_and_teacher, training_arguments, training_data
from layerprune.models import ModelInfo
from layerprune.params import load_params
from layerprune.perplexity import evaluate_perplexity
from layerprune.strategies import Choice
from measure import interleave, ratio, timed

OVERHEAD_STEPS, OVERHEAD_ROUNDS = 4, 2
GAP_PLOT = "plots/heal_gap_closed.png"  # a bench output, not a stage's


def run_stage(pipeline: Path, out: Path, processes: int) -> tuple[float, float]:
    """Wall and CPU seconds of the heal stage, launched with dvc.yaml's arguments: its inputs from the pipeline's
    folder, its outputs under `out` at the paths dvc.yaml gives them (so paths(out) finds them).

    CPU seconds say what the wall time would be on idle cores (CPU seconds / cores) when neighbours share them."""
    outputs = stage_outputs("heal")
    args = {flag: (out if value in outputs else pipeline) / value for flag, value in stage_args("heal").items()}
    command = ["torchrun", "--standalone", "--nproc_per_node", str(processes), str(REPO / "stages/heal.py"),
               "--params", str(paths().params), *[x for k, v in args.items() for x in (f"--{k}", str(v))]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    # run in the pipeline's folder: models/base.json names the base model's folder relative to it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(subprocess.run, command, cwd=pipeline, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def bits_per_byte(model_dir, eval_texts: Path, e, work: Path) -> float:
    return evaluate_perplexity(model_dir, eval_texts, max_length=e.max_length, batch_size=e.batch_size,
                               work_dir=work)["bits_per_byte"]


def stacked(blocks, count: int | None = None) -> torch.Tensor:
    """The first `count` items of a heal.Blocks dataset as one (count, seq_len) tensor."""
    return torch.stack([blocks[i]["input_ids"] for i in range(len(blocks) if count is None else count)])


@torch.no_grad()
def mean_loss(model_dir, blocks: torch.Tensor, batch_size: int) -> float:
    """Next-token loss per token on equal-length blocks: what the Trainer reports as eval_loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = blocks.split(batch_size)
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def overhead(heal, launch, pruned_dir: Path, base_dir: Path, dropped: list[int], train, work: Path) -> dict:
    """Tokens/s of HealTrainer.train() and of a bare loop on the same trainable weights, batches and loss; the model,
    teacher and trainer set up as layerprune.heal.heal_model sets them up."""
    model, teacher, matched = student_and_teacher(heal, pruned_dir, base_dir, dropped, "cpu")
    count = OVERHEAD_STEPS * heal.batch_size  # both sides take the same OVERHEAD_STEPS steps
    batches = stacked(train, count)
    args = training_arguments(heal, launch, OVERHEAD_STEPS, work / "overhead", "cpu")
    args.eval_strategy, args.save_strategy, args.eval_on_start, args.disable_tqdm = "no", "no", False, True
    trainer = HealTrainer(model=model, args=args, train_dataset=torch.utils.data.Subset(train, range(count)),
                          heal=heal, teacher=teacher, matched=matched)

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
    p = paths(pipeline)
    params = load_params(paths().params)
    heal = params.heal
    started, at_start = time.perf_counter(), machine()
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        work = Path(tmp)
        stage = paths(work / "stage")  # the stage's outputs, at dvc.yaml's paths under work/stage
        stage_seconds, stage_cpu = run_stage(pipeline, work / "stage", params.heal_launch.processes)
        metrics = read_json(stage.heal_metrics)
        timing = read_json(p.heal_timing)  # the stage ran in the pipeline's folder
        base_dir = pipeline / ModelInfo.load(p.base_info).model_dir()
        dropped = Choice.load(p.choice).dropped
        # The control: the base model, trained with the same recipe on the layers around where the cut is.
        heal_model(heal, params.heal_launch, pruned_dir=base_dir, base_dir=base_dir, dropped=dropped,
                   shards=p.heal_corpus, checkpoints=work / "control/checkpoints", log_dir=work / "control/curves",
                   out_dir=work / "control/healed", device="cpu", fingerprint_inputs=[])

        bpb = {name: bits_per_byte(folder, p.eval_texts, params.eval, work / f"eval-{name}") for name, folder in {
            "base": base_dir, "pruned": p.pruned_model, "healed": stage.healed_model,
            "control": work / "control/healed"}.items()}
        closed = (bpb["pruned"] - bpb["healed"]) / (bpb["pruned"] - bpb["base"])

        # The stage's training blocks and validation blocks, read as the stage reads them
        data = training_data(heal, p.heal_corpus)
        base_val = mean_loss(base_dir, stacked(data.validation), heal.batch_size)
        eval_rows = (stage.heal_curves / "plots/metrics/eval/loss.tsv").read_text().splitlines()[1:]
        tokens_per_step = metrics["tokens"] // metrics["steps"]
        losses = [(int(step) * tokens_per_step, float(loss)) for step, loss in (r.split("\t") for r in eval_rows)]
        pruned_val = losses[0][1]
        curve = [(tokens, (pruned_val - loss) / (pruned_val - base_val)) for tokens, loss in losses]
        curve_png(curve, REPO / GAP_PLOT)

        cost = overhead(heal, params.heal_launch, p.pruned_model, base_dir, dropped, data.train, work)

    recipe = (f"loss {heal.loss.model_dump(exclude_defaults=True)}, head_every {heal.head_every}, trainable "
              f"{heal.trainable} ({heal.cut_layers} per side), lr {heal.learning_rate:g} {heal.schedule}, "
              f"{metrics['steps']} steps × {heal.batch_size} × {heal.seq_len} tokens")
    cores = usable_cores()
    rows = [
        (f"heal stage CPU time ÷ ({cores} cores × 5 minutes): its wall time on idle cores ÷ 5 minutes",
         stage_cpu / cores / 300, "≤ 1", f"{stage_cpu:.0f} CPU s; wall {stage_seconds:.0f} s on the shared machine "
         f"({timing['tokens_per_second']:.1f} tokens/s in training)", recipe),
        ("held-out gap closed, bits per byte: (pruned − healed) ÷ (pruned − base)", closed, "≥ 0.65",
         f"base {bpb['base']:.4f}, pruned {bpb['pruned']:.4f}, healed {bpb['healed']:.4f}",
         f"lm-eval, {params.eval.max_length}-token windows, {PIPELINE_PATHS['eval_texts']}"),
        ("control: base's held-out change ÷ the pruned model's gain", (bpb["base"] - bpb["control"])
         / (bpb["pruned"] - bpb["healed"]), "",
         f"base {bpb['base']:.4f} → {bpb['control']:.4f} bits/byte after the same training",
         "the share of the gain that is adaptation to the text, not the cut healing"),
        ("Trainer tokens/s ÷ bare loop tokens/s", cost["ratio"], "≥ 0.85",
         f"{cost['trainer']:.1f} vs {cost['bare']:.1f} tokens/s",
         f"{OVERHEAD_STEPS} steps of the same batches, loss and weights, {OVERHEAD_ROUNDS} interleaved rounds"),
    ]
    curve_text = ", ".join(f"{t:,} tokens: {100 * g:.0f}%" for t, g in curve)
    table = markdown_table(["measurement", "ratio", "goal", "numbers", "how"],
                           [[what, f"**{num(value)}**", goal, detail, how] for what, value, goal, detail, how in rows],
                           right=("ratio",))
    text = f"""Measured {now()} by `python bench/heal.py` ({time.perf_counter() - started:.0f} s) on {pipeline.name}'s \
models and texts.

Machine: {at_start}; {load_average()} at the end.

{table}
Gap closed on the validation shards ({data.validation_texts} texts, neither trained on nor held out; base
{base_val:.4f}, pruned {pruned_val:.4f} nats/token) by tokens seen: {curve_text}. Plot: {GAP_PLOT}.
"""
    write_table(REPO / "bench/results-heal.md", text)


if __name__ == "__main__":
    main()
