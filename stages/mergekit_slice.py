"""Stage `mergekit-slice`: cut the chosen layers out of the base model with mergekit."""
import time
from pathlib import Path

from layerprune.files import check_free_space
from layerprune.slicing import load_merge_config, slice_model
from layerprune.stage import run_stage, write_timing
from layerprune.strategies import Choice


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def main(params, merge_config, choice, pruned_dir):
    pruned_dir = Path(pruned_dir)
    parameters_after = Choice.load(choice).parameters_after
    check_free_space(pruned_dir.parent, parameters_after * DTYPE_BYTES[params.slice.dtype], "the pruned model")
    started = time.perf_counter()
    slice_model(load_merge_config(merge_config), pruned_dir)
    write_timing(pruned_dir, seconds=time.perf_counter() - started)  # bench/scale.py: the slice's GB/s


if __name__ == "__main__":
    run_stage(main, "merge_config", "choice", "pruned_dir", description=__doc__)
