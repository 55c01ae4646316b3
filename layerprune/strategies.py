"""The pruning strategies, in one registry: how each picks the layers to drop, what its score is called, and how the
model card says why. Params validation, choose-range, the frontier and the card all read STRATEGIES.

Adding a strategy is one function and one entry: a function Problem -> Pick, and a Strategy in STRATEGIES naming it.
A strategy sees only its Problem: the model's size, the protected layers, the similarity distances, and a
calibration-loss search (`problem.search()`, search.LossSearch: `block_losses(dropped, blocks)` is the loss of the
model without `dropped` plus each block, memoised), built (the model loaded) the first time a strategy asks for it.

Layers are numbered 0..L-1. A Block drops layers start..start+size-1; `loss` and `iterative` may drop layers that
are not consecutive, so what is dropped is a set of layers, and a Block is one. Pure: no torch, no model; what the
stages write of a choice is the Choice record (metrics/choice.json).
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict

from layerprune.errors import UserError
from layerprune.files import read_json, write_json


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


def runs(layers) -> list[tuple[int, int]]:
    """Runs of consecutive layers, as half-open (first, stop) pairs in order: {3, 8, 9} -> [(3, 4), (8, 10)]."""
    found = []
    for layer in sorted(set(layers)):
        if found and layer == found[-1][1]:
            found[-1] = (found[-1][0], layer + 1)
        else:
            found.append((layer, layer + 1))
    return found


def layers_label(dropped) -> str:
    """Dropped layers as runs: "8..9", "3, 8..9", "5"."""
    return ", ".join(str(a) if b == a + 1 else f"{a}..{b - 1}" for a, b in runs(dropped))


# ---- the contract ----


@dataclass
class Problem:
    """What a strategy may look at to pick `size` of the model's `num_layers` layers."""

    num_layers: int
    size: int
    keep_first: int  # the first keep_first and last keep_last layers are never dropped
    keep_last: int
    metric: Optional[str]  # the similarity metric `scores` is under
    # [n, start]: distance between the inputs of layers start and start + n (NaN: none). The frontier gives None to
    # a strategy that is not per_metric: such a strategy may report a distance but must not pick by one.
    scores: Optional[np.ndarray]
    make_search: Callable[[], object]  # builds the calibration-loss search (search.LossSearch): loads the model
    _search: object = field(default=None, init=False, repr=False)

    def search(self):
        """The calibration-loss search (search.LossSearch), built on the first call and kept."""
        if self._search is None:
            self._search = self.make_search()
        return self._search

    def starts(self) -> range:
        """Where a block of `size` layers may start without dropping a protected layer."""
        return allowed_starts(self.num_layers, self.size, self.keep_first, self.keep_last)


@dataclass
class Pick:
    dropped: list[int]  # sorted
    score: float  # the strategy's own measure of the choice (its Strategy.score_name)
    candidates: list[dict] = field(default_factory=list)  # every candidate scored: {step, start, dropped, loss}


@dataclass(frozen=True)
class Strategy:
    pick: Callable[[Problem], Pick]
    score_name: str  # what Pick.score is; "{metric}" stands for the similarity metric
    why: str  # the model card's reason for the choice; may use {metric} and {score}
    per_metric: bool = False  # it picks by the similarity metric: the frontier draws one line per metric


# ---- the strategies ----


def pick_similarity(problem: Problem) -> Pick:
    """Gromov et al. / PruneMe: the allowed block whose input and output are closest, the first on ties."""
    starts, scores = problem.starts(), problem.scores
    if scores is None or scores.ndim != 2 or scores.shape[0] <= problem.size or scores.shape[1] < starts[-1] + 1:
        shape = None if scores is None else scores.shape
        raise ValueError(f"scores of shape {shape} do not cover block size {problem.size} at starts up to {starts[-1]}")
    row = np.asarray(scores[problem.size, starts.start : starts.stop], dtype=float)
    if np.isnan(row).all():
        raise UserError(f"prune.layers={problem.size}: no similarity score for any allowed block of {problem.size} "
                        "layers")
    start = starts.start + int(np.nanargmin(row))
    return Pick(list(Block(start, problem.size)), float(row[start - starts.start]))


def pick_deepest(problem: Problem) -> Pick:
    """Gromov et al.'s baseline: the `size` deepest layers that are not protected (scored by their distance)."""
    start = problem.starts()[-1]
    score = float(problem.scores[problem.size, start]) if problem.scores is not None else float("nan")
    return Pick(list(Block(start, problem.size)), score)


def loss_by_start(problem: Problem) -> dict[int, float]:
    """The calibration loss of the model without each allowed block of `size` layers, by the block's start."""
    starts = problem.starts()
    return dict(zip(starts, problem.search().block_losses((), [tuple(Block(s, problem.size)) for s in starts])))


def pick_loss(problem: Problem) -> Pick:
    """Shortened LLaMA (Kim et al. 2024): the allowed block whose removal gives the lowest calibration loss, the
    first on ties. Every allowed block is a candidate."""
    losses = loss_by_start(problem)
    best = min(losses, key=losses.get)
    candidates = [{"step": 1, "start": start, "dropped": layers_label(Block(start, problem.size)), "loss": value}
                  for start, value in losses.items()]
    return Pick(list(Block(best, problem.size)), losses[best], candidates)


def pick_iterative(problem: Problem) -> Pick:
    """SLEB (Song et al. 2024): `size` steps, each removing the allowed layer whose removal, on top of the layers
    removed so far, gives the lowest calibration loss (the shallowest on ties). The layers need not be consecutive.
    The search memoises every set it scored, so the path to a larger size reuses the path to a smaller one."""
    problem.starts()  # the same room check as a block's, with the same message
    search, dropped, candidates = problem.search(), [], []
    for step in range(1, problem.size + 1):
        allowed = [i for i in range(problem.keep_first, problem.num_layers - problem.keep_last) if i not in dropped]
        losses = dict(zip(allowed, search.block_losses(dropped, [(i,) for i in allowed])))
        candidates += [{"step": step, "start": layer, "dropped": layers_label([*dropped, layer]), "loss": value}
                       for layer, value in losses.items()]
        best = min(losses, key=losses.get)
        dropped.append(best)
    return Pick(sorted(dropped), losses[best], candidates)


STRATEGIES = {
    "similarity": Strategy(pick_similarity, "{metric} distance", "the lowest `{metric}` distance ({score})",
                           per_metric=True),
    "deepest": Strategy(pick_deepest, "{metric} distance",
                        "the deepest layers before the protected ones (Gromov et al.'s baseline)"),
    "loss": Strategy(pick_loss, "calibration loss", "the lowest calibration loss ({score})"),
    "iterative": Strategy(pick_iterative, "calibration loss",
                          "one layer at a time, each the cheapest by calibration loss (SLEB); loss after the last: "
                          "{score}"),
}


def get_strategy(name: str) -> Strategy:
    """The registered strategy `name`, or a one-line error listing the registered ones."""
    if name not in STRATEGIES:
        raise UserError(f"prune.strategy={name!r}: unknown; allowed: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


# ---- the record ----


class Choice(BaseModel):
    """What choose-range decided (metrics/choice.json), read by the slice, the heal and the release."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    metric: str  # the similarity metric of `distance` (and of the choice, for similarity and deepest)
    n: int
    dropped: list[int]
    dropped_layers: str  # layers_label(dropped)
    start: Optional[int] = None  # a block (consecutive layers) only: its first layer
    distance: Optional[float] = None  # a block only: its distance under `metric`, whichever strategy chose it
    score_name: str
    score: float
    kept_ranges: str  # the mergekit layer ranges, "[0,8] + [10,18]"
    layers_before: int
    layers_kept: int
    parameters_before: int
    parameters_after: int

    def save(self, path) -> None:
        write_json(path, self.model_dump(exclude_none=True))

    @classmethod
    def load(cls, path) -> "Choice":
        return cls.model_validate(read_json(path))
