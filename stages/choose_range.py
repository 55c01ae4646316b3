"""Stage `choose-range`: pick the layers to drop with prune.strategy (strategies.STRATEGIES) and write the mergekit
passthrough config that drops them.

`similarity` and `deepest` read the distances only; `loss` and `iterative` load the model and score pruned models
on the first prune.search_texts calibration texts (never the held-out ones), writing every candidate's loss."""
import math

from layerprune.files import atomic_write_text, read_csv, read_jsonl, write_csv
from layerprune.models import ModelInfo, count_parameters, load_model
from layerprune.plots import similarity_heatmap
from layerprune.ranges import check_ranges, kept_ranges, passthrough_config
from layerprune.search import loss_search, search_workload
from layerprune.similarity import Distances
from layerprune.stage import run_stage
from layerprune.strategies import Choice, Problem, block_size, get_strategy, layers_label, runs

LOSS_COLUMNS = ("step", "start", "dropped", "loss")


def calibration_search(params, info, calibration):
    """The calibration-loss search of the loss-based strategies (loads the model): prune.search_texts texts."""
    model, tokenizer = load_model(info.model_dir(), params.model.device,
                                  workload=search_workload(params.similarity, info.num_layers))
    return loss_search(model, tokenizer, [row["text"] for row in read_jsonl(calibration)], params.prune,
                       params.similarity)


def main(params, model_info, distances, calibration, merge_config, metrics, heatmap, curve, block_losses):
    prune, metric = params.prune, params.similarity.metric
    info = ModelInfo.load(model_info)
    num_layers = info.num_layers
    size = block_size(num_layers, prune.layers, prune.fraction)
    scores = Distances.from_rows(read_csv(distances), num_samples=0, num_tokens=0).scores(metric)
    chosen = get_strategy(prune.strategy)
    pick = chosen.pick(Problem(num_layers, size, prune.keep_first, prune.keep_last, metric, scores,
                               make_search=lambda: calibration_search(params, info, calibration)))
    dropped = pick.dropped
    ranges = kept_ranges(num_layers, dropped)
    check_ranges(ranges, num_layers, prune.keep_first, prune.keep_last)

    # mergekit reads the base model by local path, or by hub id pinned to the commit the model stage resolved
    base = info.local_dir or f"{info.id}@{info.revision}"
    atomic_write_text(merge_config, passthrough_config(base, ranges, params.slice.dtype).to_yaml() + "\n")
    block = len(runs(dropped)) == 1  # a block also has a start and a distance, whichever strategy chose it
    model_dir = info.model_dir()
    Choice(
        strategy=prune.strategy, metric=metric, n=size, dropped=dropped, dropped_layers=layers_label(dropped),
        start=dropped[0] if block else None,
        distance=round(float(scores[size, dropped[0]]), 6) if block else None,
        score_name=chosen.score_name.format(metric=metric), score=round(pick.score, 6),
        kept_ranges=" + ".join(f"[{a},{b}]" for a, b in ranges),
        layers_before=num_layers, layers_kept=num_layers - size,
        parameters_before=count_parameters(model_dir),
        parameters_after=count_parameters(model_dir, drop_layers=dropped),
    ).save(metrics)
    write_csv(curve, [{"start": start, "distance": float(value)}
                      for start, value in enumerate(scores[size]) if not math.isnan(value)])
    if pick.candidates:
        write_csv(block_losses, pick.candidates)
    else:  # similarity and deepest score no pruned model: the header alone (DVC wants the output)
        atomic_write_text(block_losses, ",".join(LOSS_COLUMNS) + "\n")
    title = f"{info.id} · {params.lang} · {prune.strategy}: drop {size} layers"
    similarity_heatmap(scores, dropped, metric, title, heatmap)


if __name__ == "__main__":
    run_stage(main, "model_info", "distances", "calibration", "merge_config", "metrics", "heatmap", "curve",
              "block_losses", description=__doc__)
