"""Benchmark of issue 12 (choose the block by what it costs): its goals as ratios measured side by side in one run.

    python bench/frontier.py [--workspace DIR] [--heldout-texts N] [--flop-texts N]

Reads a workspace where `dvc repro frontier` has run (models/base, data/, metrics/frontier.json, params.yaml) and
writes bench/results-frontier.md:
- the `loss` strategy's block at the largest frontier n against the best contiguous block, found by brute force on
  the held-out texts (mean next-token loss of each block removed in memory; the pipeline never sees these texts);
- for every frontier n, min(loss, iterative) against min(similarity metrics, deepest) in held-out bits per byte;
- prefix sharing: decoder-layer FLOPs (counted) and wall time of the `loss` search against a naive loop that runs
  the whole pruned model per candidate, same texts, interleaved; and the FLOPs at Falcon-11B's geometry (60 layers,
  the seed's n=30) on a tiny model of that layout, where the count is the same for any width;
- the frontier stage's own time against its budget, and against its floor (the search and lm-eval's scoring, timed
  by the stage itself).
"""
import argparse
import os
from pathlib import Path

from common import OTHER_PATHS, REPO, machine, now, num, paths, ratio_table, row, write_table  # first: offline switches

from layerprune.files import read_csv, read_json, read_jsonl
from layerprune.forward import pad_token_id, tokenize
from layerprune.models import ModelInfo, load_model
from layerprune.params import load_params
from layerprune.search import LossSearch, loss_search
from layerprune.similarity import METRICS, Distances
from layerprune.strategies import Block, Problem, layers_label, loss_by_start, pick_loss, pick_similarity
from layerprune.tiny_models import tiny_falcon11b
from measure import interleave, ratio, timed

FRONTIER_BUDGET_S = 240


def texts(path: Path) -> list[str]:
    return [r["text"] for r in read_jsonl(path)]


def best_block(search, n: int, prune) -> tuple[Block, dict[int, float]]:
    """The `loss` strategy's block of n on this search's texts, and the loss without every allowed block (memoised:
    the strategy scored them all already)."""
    problem = Problem(search.num_layers, n, prune.keep_first, prune.keep_last, None, None, make_search=lambda: search)
    return Block(pick_loss(problem).dropped[0], n), loss_by_start(problem)


def heldout_rows(model, tokenizer, params, p, heldout_texts) -> list[dict]:
    """The blocks `loss` and `angular_last` choose at the largest frontier n (as choose-range would), against the
    best block by held-out loss."""
    n, prune = max(params.frontier.layers), params.prune
    search = loss_search(model, tokenizer, texts(p.calibration), prune, params.similarity)
    picks = {"loss": best_block(search, n, prune)[0]}
    distances = Distances.from_rows(read_csv(p.distances), num_samples=0, num_tokens=0)
    problem = Problem(search.num_layers, n, prune.keep_first, prune.keep_last, "angular_last",
                      distances.scores("angular_last"), make_search=lambda: search)
    picks["angular_last"] = Block(pick_similarity(problem).dropped[0], n)
    ids, _ = tokenize(tokenizer, texts(p.eval_texts)[:heldout_texts], params.eval.max_length)
    heldout = LossSearch(model, ids, params.similarity.batch_size, pad_id=pad_token_id(tokenizer))
    best, losses = best_block(heldout, n, prune)
    return [row(f"`{strategy}` block at n = {n}: held-out loss ÷ best block's", losses[pick.start] / losses[best.start],
                "≤ 1.02" if strategy == "loss" else "", f"{layers_label(pick)}: {losses[pick.start]:.3f}",
                f"{layers_label(best)}: {losses[best.start]:.3f}",
                f"mean next-token loss (nats) on {len(ids)} held-out texts, each of the {len(losses)} blocks removed "
                "in memory") for strategy, pick in picks.items()]


def frontier_rows(frontier) -> list[dict]:
    rows = []
    for n, bpb in frontier["bits_per_byte"].items():
        ours = min(bpb["loss"], bpb["iterative"])
        theirs = min(bpb[s] for s in (*METRICS, "deepest"))
        rows.append(row(f"frontier at n = {n}: min(loss, iterative) ÷ min(similarity metrics, deepest)",
                        ours / theirs, "≤ 1", num(ours), num(theirs),
                        f"held-out bits per byte (lm-eval), {OTHER_PATHS['frontier_metrics']}; "
                        f"{frontier['models_evaluated']} models evaluated for all n"))
    return rows


def prefix_rows(model, tokenizer, params, p, flop_texts) -> list[dict]:
    n, prune = max(params.frontier.layers), params.prune
    calibration = texts(p.calibration)
    fewer = prune.model_copy(update={"search_texts": flop_texts})
    fresh = lambda: loss_search(model, tokenizer, calibration, fewer, params.similarity, progress=False)
    counts = {}

    def shared(r):
        search = fresh()
        seconds = timed(best_block, search, n, prune)
        counts["shared"] = search.flops
        return seconds

    def naive(r):
        search = fresh()
        starts = range(prune.keep_first, search.num_layers - prune.keep_last - n + 1)
        seconds = timed(lambda: [search.full_loss(Block(start, n)) for start in starts])
        counts["naive"] = search.flops
        return seconds

    fresh().full_loss(())  # warm-up: one-time kernel set-up stays out of the timings
    times = interleave({"shared": shared, "naive": naive}, 2)
    rows = [
        row(f"prefix sharing, n = {n}: decoder-layer FLOPs of the `loss` search ÷ naive loop", counts["shared"] /
            counts["naive"], "≤ 0.55", f"{counts['shared'] / 1e9:,.0f} GFLOP", f"{counts['naive'] / 1e9:,.0f} GFLOP",
            f"counted: 2 × layer weights × tokens per layer run; {flop_texts} calibration texts"),
        row(f"prefix sharing, n = {n}: wall time of the `loss` search ÷ naive loop", ratio(times["shared"], times["naive"]),
            "", f"{min(times['shared']):.1f} s", f"{min(times['naive']):.1f} s",
            "same texts, 2 interleaved rounds; the head over the 262k vocabulary runs once per candidate in both"),
    ]
    falcon = tiny_falcon11b(num_layers=60)
    ids = [list(range(2, 34))]
    shared_search, naive_search = LossSearch(falcon, ids, 1, progress=False), LossSearch(falcon, ids, 1, progress=False)
    best_block(shared_search, 30, argparse.Namespace(keep_first=0, keep_last=1))
    for start in range(0, 30):
        naive_search.full_loss(Block(start, 30))
    rows.append(row("prefix sharing at Falcon-11B's geometry (60 layers, n = 30): FLOPs ÷ naive loop",
                    shared_search.flops / naive_search.flops, "≤ 0.55", f"{shared_search.flops / 1e6:,.0f} MFLOP",
                    f"{naive_search.flops / 1e6:,.0f} MFLOP", "counted on a tiny model of Falcon-11B's layout; "
                    "every layer has the same size, so the ratio holds at any width"))
    return rows


PARTS = ("heldout", "frontier", "prefix")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=REPO, help="where `dvc repro frontier` ran (default: here)")
    parser.add_argument("--heldout-texts", type=int, default=32, help="held-out texts of the brute-force search")
    parser.add_argument("--flop-texts", type=int, default=2, help="calibration texts of the timed searches")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to measure (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results-frontier.md")
    args = parser.parse_args(argv)
    workspace = args.workspace.resolve()
    os.chdir(workspace)  # models/base.json names the model folder relative to the workspace
    p = paths(workspace)
    params = load_params(p.params)
    header = (f"Measured {now()} by `python bench/frontier.py "
              f"--parts {' '.join(args.parts)}` on {params.model.id}, lang={params.lang}, "
              f"frontier.layers={params.frontier.layers}, prune.search_texts={params.prune.search_texts}.\n\n"
              f"Machine: {machine()}.")
    rows = []
    if "frontier" in args.parts:
        frontier = read_json(p.frontier_metrics)
        timing = read_json(p.frontier_timing)
        seconds, floor = timing["seconds"], timing["search_seconds"] + timing["lm_eval_seconds"]
        rows += frontier_rows(frontier)
        rows.append(row("frontier stage time ÷ budget", seconds / FRONTIER_BUDGET_S, "≤ 1",
                        f"{seconds:.0f} s", f"{FRONTIER_BUDGET_S} s", f"{OTHER_PATHS['frontier_timing']} `seconds`: "
                        f"model load, searches and {frontier['models_evaluated']} lm-eval runs, on that run's machine"))
        # The floor is the measuring itself: the candidates' forward passes and lm-eval's scoring of each model;
        # what is above it is loading, set-up and the base model's calibration loss.
        rows.append(row("frontier stage time ÷ its floor", seconds / floor, "≤ 1.3", f"{seconds:.0f} s",
                        f"{floor:.0f} s", f"the same run's `search_seconds` ({timing['search_seconds']:.0f} s) + "
                        f"`lm_eval_seconds` ({timing['lm_eval_seconds']:.0f} s)"))
    if {"heldout", "prefix"} & set(args.parts):
        model, tokenizer = load_model(ModelInfo.load(p.base_info).model_dir(), "cpu")
        if "heldout" in args.parts:
            rows += heldout_rows(model, tokenizer, params, p, args.heldout_texts)
        if "prefix" in args.parts:
            rows += prefix_rows(model, tokenizer, params, p, args.flop_texts)
    write_table(args.out, ratio_table(rows, header))


if __name__ == "__main__":
    main()
