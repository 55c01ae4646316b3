"""Stage `choose-range`: pick the layers to drop and write the mergekit passthrough config that drops them.

`similarity` and `deepest` read the distances only; `loss` and `iterative` load the model and score pruned models
on the first prune.search_texts calibration texts (never the held-out ones), writing every candidate's loss."""
import math

import yaml

from layerprune.choose import (NEEDS_MODEL, Block, block_size, check_ranges, choose_block, kept_ranges, layers_label,
                               passthrough_config, runs)
from layerprune.files import atomic_write_text, read_csv, write_csv, write_json
from layerprune.models import ModelInfo, count_parameters, load_model
from layerprune.plots import similarity_heatmap
from layerprune.search import best_block, iterative_removal, loss_search
from layerprune.similarity import Distances
from layerprune.stage import run_stage
from layerprune.texts import read_jsonl

LOSS_COLUMNS = ("step", "start", "dropped", "loss")


def search_losses(params, info, calibration, size):
    """(dropped layers, calibration loss, CSV rows of every candidate) for the loss and iterative strategies."""
    prune = params.prune
    model, tokenizer = load_model(info.model_dir(), params.model.device)
    search = loss_search(model, tokenizer, [row["text"] for row in read_jsonl(calibration)],
                         search_texts=prune.search_texts, max_length=params.similarity.max_length,
                         batch_size=params.similarity.batch_size)
    if prune.strategy == "loss":
        block, losses = best_block(search, size, prune.keep_first, prune.keep_last)
        rows = [{"step": 1, "start": start, "dropped": layers_label(Block(start, size)), "loss": loss}
                for start, loss in losses.items()]
        return list(block), losses[block.start], rows
    steps = iterative_removal(search, size, prune.keep_first, prune.keep_last)
    dropped, rows = [], []
    for number, step in enumerate(steps, 1):
        rows += [{"step": number, "start": layer, "dropped": layers_label([*dropped, layer]), "loss": loss}
                 for layer, loss in step.candidates.items()]
        dropped.append(step.layer)
    return sorted(dropped), steps[-1].loss, rows


def main(params, model_info, distances, calibration, merge_config, metrics, heatmap, curve, block_losses):
    prune, metric = params.prune, params.similarity.metric
    info = ModelInfo.load(model_info)
    num_layers = info.num_layers
    size = block_size(num_layers, prune.layers, prune.fraction)
    scores = Distances.from_rows(read_csv(distances), num_samples=0, num_tokens=0).scores(metric)
    if prune.strategy in NEEDS_MODEL:
        dropped, score, rows = search_losses(params, info, calibration, size)
        score_name = "calibration loss"
    else:
        dropped = list(choose_block(scores, num_layers, size, prune.strategy, prune.keep_first, prune.keep_last))
        score_name, score, rows = f"{metric} distance", float(scores[size, dropped[0]]), []
    ranges = kept_ranges(num_layers, dropped)
    check_ranges(ranges, num_layers, prune.keep_first, prune.keep_last)

    # mergekit reads the base model by local path, or by hub id pinned to the commit the model stage resolved
    base = info.local_dir or f"{info.id}@{info.revision}"
    atomic_write_text(merge_config, yaml.safe_dump(passthrough_config(base, ranges, params.slice.dtype), sort_keys=False))
    contiguous = len(runs(dropped)) == 1
    model_dir = info.model_dir()
    write_json(metrics, {
        "strategy": prune.strategy,
        "metric": metric,
        "n": size,
        "dropped": dropped,
        "dropped_layers": layers_label(dropped),
        # a block also has a start, and a distance under the similarity metric (whichever strategy chose it)
        **({"start": dropped[0], "distance": round(float(scores[size, dropped[0]]), 6)} if contiguous else {}),
        "score_name": score_name,
        "score": round(score, 6),
        "kept_ranges": " + ".join(f"[{a},{b}]" for a, b in ranges),
        "layers_before": num_layers,
        "layers_kept": num_layers - size,
        "parameters_before": count_parameters(model_dir),
        "parameters_after": count_parameters(model_dir, drop_layers=dropped),
    })
    write_csv(curve, [{"start": start, "distance": float(value)}
                      for start, value in enumerate(scores[size]) if not math.isnan(value)])
    if rows:
        write_csv(block_losses, rows)
    else:  # similarity and deepest score no pruned model: the header alone (DVC wants the output)
        atomic_write_text(block_losses, ",".join(LOSS_COLUMNS) + "\n")
    title = f"{info.id} · {params.lang} · {prune.strategy}: drop {size} layers"
    similarity_heatmap(scores, dropped, metric, title, heatmap)


if __name__ == "__main__":
    run_stage(main, "model_info", "distances", "calibration", "merge_config", "metrics", "heatmap", "curve",
              "block_losses", description=__doc__)
