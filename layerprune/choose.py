"""Which block of consecutive layers to drop, and the mergekit passthrough config that drops it. Pure: no torch.

Layers are numbered 0..L-1. A block drops layers start..start+size-1; the `loss` and `iterative` strategies
(layerprune.search) may drop layers that are not consecutive, so what is dropped is a set of layers, and a Block is
one. mergekit layer ranges are half-open, so the layers kept around a block are [0, start) and [start+size, L): the
seed wrote [55, 59] for "55 to the end" of a 60-layer model and silently dropped the final layer 59. check_ranges
exists to catch exactly that.
"""
from dataclasses import dataclass

import numpy as np

from layerprune.errors import UserError


@dataclass(frozen=True)
class Block:
    start: int
    size: int

    @property
    def stop(self) -> int:
        """One past the last dropped layer."""
        return self.start + self.size

    def __iter__(self):
        """The dropped layers: a Block is a set of layers like any other."""
        return iter(range(self.start, self.stop))


STRATEGIES = ("similarity", "deepest", "loss", "iterative")
NEEDS_MODEL = ("loss", "iterative")  # these score pruned models in memory; the others read the distances only


def block_size(num_layers: int, layers: int | None, fraction: float | None) -> int:
    if (layers is None) == (fraction is None):
        raise UserError("set exactly one of prune.layers and prune.fraction")
    # Python's round: halves go to the even neighbour (round(15.5) == 16, round(14.5) == 14)
    if layers is not None:
        n, key = layers, f"prune.layers={layers}"
    else:
        n, key = round(fraction * num_layers), f"prune.fraction={fraction}"
    if n <= 0:
        raise UserError(f"{key}: drops {n} of the model's {num_layers} layers; it must drop at least 1")
    if n >= num_layers:
        raise UserError(f"{key}: drops {n} of the model's {num_layers} layers; it must keep at least 1")
    return n


def allowed_starts(num_layers: int, size: int, keep_first: int, keep_last: int) -> range:
    starts = range(keep_first, num_layers - keep_last - size + 1)
    if not starts:
        room = max(num_layers - keep_first - keep_last, 0)
        raise UserError(
            f"prune.keep_first={keep_first}, prune.keep_last={keep_last}: leave {room} droppable layers "
            f"of {num_layers}, too few for a block of {size}"
        )
    return starts


def choose_block(
    scores: np.ndarray | None, num_layers: int, size: int, strategy: str, keep_first: int, keep_last: int
) -> Block:
    """scores[n, start] is the distance between the input of layer `start` and of layer `start + n` (NaN where
    undefined); "similarity" drops the allowed block of `size` layers with the smallest distance, the first on ties.
    "deepest" is Gromov et al.'s baseline: the `size` deepest layers that are not protected."""
    starts = allowed_starts(num_layers, size, keep_first, keep_last)
    if strategy == "deepest":
        return Block(starts[-1], size)
    if strategy != "similarity":
        raise UserError(f"prune.strategy={strategy!r}: choose_block knows similarity and deepest; "
                        f"allowed strategies: {', '.join(STRATEGIES)}")
    if scores is None or scores.ndim != 2 or scores.shape[0] <= size or scores.shape[1] < starts[-1] + 1:
        shape = None if scores is None else scores.shape
        raise ValueError(f"scores of shape {shape} do not cover block size {size} at starts up to {starts[-1]}")
    row = np.asarray(scores[size, starts.start : starts.stop], dtype=float)
    if np.isnan(row).all():
        raise UserError(f"prune.layers={size}: no similarity score for any allowed block of {size} layers")
    return Block(starts.start + int(np.nanargmin(row)), size)


def runs(layers) -> list[tuple[int, int]]:
    """Runs of consecutive layers, as half-open (first, stop) pairs in order: {3, 8, 9} -> [(3, 4), (8, 10)]."""
    found = []
    for layer in sorted(set(layers)):
        if found and layer == found[-1][1]:
            found[-1] = (found[-1][0], layer + 1)
        else:
            found.append((layer, layer + 1))
    return found


def kept_ranges(num_layers: int, dropped) -> list[tuple[int, int]]:
    """Half-open mergekit layer_range values, one per run of kept layers, that keep every layer not in `dropped`
    (a Block or any collection of layer indices)."""
    return runs(set(range(num_layers)) - set(dropped))


def layers_label(dropped) -> str:
    """Dropped layers as runs: "8..9", "3, 8..9", "5"."""
    return ", ".join(str(a) if b == a + 1 else f"{a}..{b - 1}" for a, b in runs(dropped))


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


def passthrough_config(base_model: str, ranges, dtype: str) -> dict:
    """The mergekit YAML, as a dict, that stacks the kept ranges of base_model."""
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base_model), "layer_range": [int(a), int(b)]}]} for a, b in ranges],
        "dtype": dtype,
    }
