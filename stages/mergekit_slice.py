"""Stage `mergekit-slice`: cut the chosen layers out of the base model with mergekit."""
from pathlib import Path

from layerprune.files import check_free_space
from layerprune.slicing import load_merge_config, slice_model
from layerprune.stage import run_stage
from layerprune.strategies import Choice


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def main(params, merge_config, choice, pruned_dir):
    pruned_dir = Path(pruned_dir)
    parameters_after = Choice.load(choice).parameters_after
    check_free_space(pruned_dir.parent, parameters_after * DTYPE_BYTES[params.slice.dtype], "the pruned model")
    slice_model(load_merge_config(merge_config), pruned_dir)


if __name__ == "__main__":
    run_stage(main, "merge_config", "choice", "pruned_dir", description=__doc__)
