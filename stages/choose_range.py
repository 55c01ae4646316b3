"""Stage `choose-range`: pick the block of layers to drop and write the mergekit passthrough config for it."""
import math

import yaml

from layerprune.choose import block_size, check_ranges, choose_block, kept_ranges, passthrough_config
from layerprune.files import atomic_write_text, read_csv, write_csv, write_json
from layerprune.models import ModelInfo, count_parameters
from layerprune.plots import similarity_heatmap
from layerprune.similarity import Distances
from layerprune.stage import run_stage


def main(params, model_info, distances, merge_config, metrics, heatmap, curve):
    prune, metric = params.prune, params.similarity.metric
    info = ModelInfo.load(model_info)
    num_layers = info.num_layers
    size = block_size(num_layers, prune.layers, prune.fraction)
    scores = Distances.from_rows(read_csv(distances), num_samples=0, num_tokens=0).scores(metric)
    block = choose_block(scores, num_layers, size, prune.strategy, prune.keep_first, prune.keep_last)
    ranges = kept_ranges(num_layers, block)
    check_ranges(ranges, num_layers, prune.keep_first, prune.keep_last)

    # mergekit reads the base model by local path, or by hub id pinned to the commit the model stage resolved
    base = info.local_dir or f"{info.id}@{info.revision}"
    atomic_write_text(merge_config, yaml.safe_dump(passthrough_config(base, ranges, params.slice.dtype), sort_keys=False))
    model_dir = info.model_dir()
    write_json(metrics, {
        "strategy": prune.strategy,
        "metric": metric,
        "start": block.start,
        "n": block.size,
        "dropped_layers": f"{block.start}..{block.stop - 1}",
        "distance": round(float(scores[block.size, block.start]), 6),
        "kept_ranges": " + ".join(f"[{a},{b}]" for a, b in ranges),
        "layers_before": num_layers,
        "layers_kept": num_layers - block.size,
        "parameters_before": count_parameters(model_dir),
        "parameters_after": count_parameters(model_dir, drop_layers=range(block.start, block.stop)),
    })
    write_csv(curve, [{"start": start, "distance": float(value)}
                      for start, value in enumerate(scores[block.size]) if not math.isnan(value)])
    title = f"{info.id} · {params.lang} · {metric}: drop {block.size} layers"
    similarity_heatmap(scores, block, metric, title, heatmap)


if __name__ == "__main__":
    run_stage(main, "model_info", "distances", "merge_config", "metrics", "heatmap", "curve", description=__doc__)
