"""Stage `frontier`: for each n in frontier.layers and each strategy of the registry (the similarity strategy once
per metric), the held-out perplexity of the base model with the chosen layers removed in memory, scored by lm-eval
as the perplexity stages score a folder; and, per n, how well each similarity metric ranks blocks by calibration
loss. Off the main path: nothing downstream reads it."""
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from layerprune.files import read_csv, read_json, read_jsonl, significant, write_csv, write_json
from layerprune.frontier import check_sizes, columns, frontier_rows, per_column, rank_correlations
from layerprune.models import ModelInfo, load_model
from layerprune.perplexity import eval_workload, evaluate_perplexity
from layerprune.search import loss_search, search_workload, without_layers
from layerprune.similarity import METRICS, Distances
from layerprune.stage import run_stage, write_timing
from layerprune.strategies import STRATEGIES, Problem, layers_label, loss_by_start


def main(params, model_info, distances, calibration, eval_texts, base_metrics, plot, metrics):
    prune, sizes = params.prune, params.frontier.layers
    started = time.perf_counter()
    info = ModelInfo.load(model_info)
    check_sizes(sizes, info.num_layers, prune.keep_first, prune.keep_last)
    table = Distances.from_rows(read_csv(distances), num_samples=0, num_tokens=0)
    scores = {metric: table.scores(metric) for metric in METRICS}
    workloads = (search_workload(params.similarity, info.num_layers),
                 eval_workload(params.eval.batch_size, params.eval.max_length))
    model, tokenizer = load_model(info.model_dir(), params.model.device, workload=workloads)
    search = loss_search(model, tokenizer, [row["text"] for row in read_jsonl(calibration)], prune, params.similarity)

    def problem(n, metric):
        return Problem(info.num_layers, n, prune.keep_first, prune.keep_last, metric, scores.get(metric),
                       make_search=lambda: search)

    # The search memoises every layer set it scored: strategies, sizes and the rank correlations share its work
    searched = time.perf_counter()
    picks = {(column, n): tuple(STRATEGIES[name].pick(problem(n, metric)).dropped)
             for n in sizes for column, (name, metric) in columns().items()}
    costs = {n: loss_by_start(problem(n, None)) for n in sizes}  # every block of n: how each metric ranks them
    search_seconds = time.perf_counter() - searched

    measured = {}
    distinct = list(dict.fromkeys(picks.values()))  # strategies that agree are evaluated once
    with tempfile.TemporaryDirectory() as work:
        for dropped in tqdm(distinct, desc="held-out perplexity", unit="model"):
            with without_layers(model, dropped):
                measured[dropped] = evaluate_perplexity(
                    model, Path(eval_texts), max_length=params.eval.max_length, batch_size=params.eval.batch_size,
                    device=params.model.device, work_dir=Path(work), tokenizer=tokenizer)

    base = read_json(base_metrics)
    # git-tracked: four significant digits, so a rerun of the same state rewrites them unchanged
    write_csv(plot, significant(frontier_rows(picks, {d: m["bits_per_byte"] for d, m in measured.items()},
                                              base["bits_per_byte"])))
    write_json(metrics, significant({
        "spearman_vs_calibration_loss": {str(n): rank_correlations(scores, costs[n], n) for n in sizes},
        "dropped_layers": per_column(picks, layers_label),
        "bits_per_byte": per_column(picks, lambda dropped: measured[dropped]["bits_per_byte"]),
        "word_perplexity": per_column(picks, lambda dropped: measured[dropped]["word_perplexity"]),
        "calibration_loss": per_column(picks, lambda dropped: search.losses[frozenset(dropped)]),
        "base": {"bits_per_byte": base["bits_per_byte"], "word_perplexity": base["word_perplexity"],
                 "calibration_loss": search.full_loss(())},
        "models_evaluated": len(distinct),
        "search_texts": prune.search_texts,
    }))
    # CPU time of all threads beside the wall time: on a shared machine, wall seconds say more about the neighbours.
    # The search and lm-eval's scoring are the work itself (docs/benchmarks.md): the rest is loading and set-up.
    write_timing(metrics, seconds=time.perf_counter() - started, cpu_seconds=time.process_time(),
                 search_seconds=search_seconds, lm_eval_seconds=sum(m["seconds"] for m in measured.values()))


if __name__ == "__main__":
    run_stage(main, "model_info", "distances", "calibration", "eval_texts", "base_metrics", "plot", "metrics",
              description=__doc__)
