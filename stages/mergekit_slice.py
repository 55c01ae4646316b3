"""Stage `mergekit-slice`: cut the chosen block out of the base model with mergekit, and write its model card."""
import json
import shutil
from pathlib import Path

import yaml

from layerprune.card import render_card
from layerprune.errors import UserError
from layerprune.slicing import slice_model
from layerprune.stage import run_stage


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_free_space(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1:  # 10% headroom for the tokenizer and metadata
        raise UserError(f"the pruned model needs ~{needed / 1e9:.1f} GB in {folder}, but only {free / 1e9:.1f} GB is free")


def main(params, model_info, merge_config, choice, corpus_metrics, sample_metrics, heatmap, pruned_dir):
    pruned_dir = Path(pruned_dir)
    parameters_after = json.loads(Path(choice).read_text())["parameters_after"]
    check_free_space(pruned_dir.parent, parameters_after * DTYPE_BYTES[params.slice.dtype])
    card = render_card(lang=params.lang, model_info=model_info, choice=choice, corpus_metrics=corpus_metrics,
                       sample_metrics=sample_metrics, merge_config=merge_config)
    # The card and its picture go into the same atomic folder as the weights: a kill never leaves a model without them
    slice_model(yaml.safe_load(Path(merge_config).read_text()), pruned_dir, extra_files={
        "README.md": card.encode(), "similarity_heatmap.png": Path(heatmap).read_bytes(),
    })

if __name__ == "__main__":
    run_stage(main, "model_info", "merge_config", "choice", "corpus_metrics", "sample_metrics", "heatmap",
              "pruned_dir", description=__doc__)
