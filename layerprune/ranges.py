"""The mergekit layer ranges that keep every layer not dropped, checked, and the passthrough config that stacks them.

mergekit layer ranges are half-open, so the layers kept around a block are [0, start) and [start+size, L): the seed
wrote [55, 59] for "55 to the end" of a 60-layer model and silently dropped the final layer 59. check_ranges exists
to catch exactly that.
"""
from mergekit.config import MergeConfiguration

from layerprune.errors import UserError
from layerprune.strategies import runs


def kept_ranges(num_layers: int, dropped) -> list[tuple[int, int]]:
    """Half-open mergekit layer_range values, one per run of kept layers, that keep every layer not in `dropped`
    (a Block or any collection of layer indices)."""
    return runs(set(range(num_layers)) - set(dropped))


def check_ranges(ranges, num_layers: int, keep_first: int, keep_last: int) -> None:
    """Validate a (possibly hand-written) list of half-open layer ranges for pruning: in order, disjoint, inside
    the model, and keeping every protected layer."""
    previous_stop = 0
    for a, b in ranges:
        if not 0 <= a < b <= num_layers:
            raise UserError(f"layer range [{a}, {b}] is not a non-empty half-open range within [0, {num_layers}]")
        if a < previous_stop:
            raise UserError(f"layer range [{a}, {b}] overlaps or precedes the one before it; keep layers in order")
        previous_stop = b
    kept = {i for a, b in ranges for i in range(a, b)}
    protected = [*range(min(keep_first, num_layers)), *range(max(num_layers - keep_last, keep_first), num_layers)]
    dropped = [i for i in protected if i not in kept]
    if dropped:
        shown = " + ".join(f"[{a}, {b}]" for a, b in ranges)
        raise UserError(
            f"layer ranges {shown} drop protected layer(s) {', '.join(map(str, dropped))} of {num_layers} "
            f"(prune.keep_first={keep_first}, prune.keep_last={keep_last}); mergekit ranges are half-open: "
            f"[a, {num_layers}] keeps the final layer {num_layers - 1}"
        )


def passthrough_config(base_model: str, ranges, dtype: str) -> MergeConfiguration:
    """The mergekit config that stacks the kept ranges of base_model; `.to_yaml()` is the file mergekit reads."""
    return MergeConfiguration.model_validate({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base_model), "layer_range": [int(a), int(b)]}]} for a, b in ranges],
        "dtype": dtype,
    })
