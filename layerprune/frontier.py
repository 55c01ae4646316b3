"""The pruning frontier: held-out quality against the number of layers removed, for every strategy, and how well
each similarity metric ranks blocks by what removing them costs. Pure: the measuring is done by the stage."""
import numpy as np
from scipy.stats import spearmanr

from layerprune.errors import UserError
from layerprune.similarity import METRICS
from layerprune.strategies import STRATEGIES, allowed_starts


def columns() -> dict[str, tuple[str, str | None]]:
    """The frontier's lines, column name -> (strategy, similarity metric): a strategy that picks by the similarity
    metric draws one line per metric, named by the metric; any other one line, named by the strategy."""
    found = {}
    for name, strategy in STRATEGIES.items():
        for column, metric in ([(m, m) for m in METRICS] if strategy.per_metric else [(name, None)]):
            if column in found:
                raise ValueError(f"two frontier lines named {column!r}: rename a strategy")
            found[column] = (name, metric)
    return found


def check_sizes(sizes: list[int], num_layers: int, keep_first: int, keep_last: int) -> None:
    """UserError naming frontier.layers unless every n leaves an allowed block of n layers in the model."""
    for n in sizes:
        if n >= num_layers:
            raise UserError(f"frontier.layers={sizes}: {n} would drop {n} of the model's {num_layers} layers; "
                            "it must keep at least 1")
        try:
            allowed_starts(num_layers, n, keep_first, keep_last)
        except UserError as err:
            raise UserError(f"frontier.layers={sizes}: {err}") from None


def rank_correlations(scores: dict[str, np.ndarray], losses: dict[int, float], n: int) -> dict[str, float]:
    """Spearman's rank correlation, over the blocks of n layers in `losses` (by start), between each metric's
    distance and the calibration loss without the block: 1 means the metric orders the blocks as the loss does."""
    starts = sorted(losses)
    cost = [losses[start] for start in starts]
    return {metric: round(float(spearmanr(matrix[n, starts], cost).statistic), 4) for metric, matrix in scores.items()}


def per_column(picks: dict[tuple[str, int], tuple[int, ...]], value) -> dict[str, dict[str, object]]:
    """{n: {column: value(its dropped layers)}}: `dvc metrics show` flattens it to frontier.json:<key>.n.column"""
    sizes = sorted({n for _, n in picks})
    return {str(n): {column: value(picks[column, n]) for column in columns()} for n in sizes}


def frontier_rows(picks: dict[tuple[str, int], tuple[int, ...]], bits_per_byte: dict[tuple[int, ...], float],
                  base_bits_per_byte: float) -> list[dict]:
    """One row per number of layers removed (0 is the base model), one column per frontier line: what `dvc plots`
    draws as one line per column. picks: (column, n) -> dropped layers; bits_per_byte: dropped layers -> value."""
    sizes = sorted({n for _, n in picks})
    rows = [{"layers_removed": 0, **{column: base_bits_per_byte for column in columns()}}]
    for n in sizes:
        rows.append({"layers_removed": n, **{column: bits_per_byte[picks[column, n]] for column in columns()}})
    return rows
