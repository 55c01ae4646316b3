"""How much each block of consecutive decoder layers changes the hidden state, from one forward pass per batch.

x_i is the input of decoder layer i (i < L) and x_L the output of the last layer *before* the final norm
(HF's last `hidden_states` entry is after it, which would score the deepest blocks against a normalised vector).
Dropping the block of n layers that starts at l maps x_l straight to x_{l+n}, so a block scores by how far apart
those two are. Metrics, each a matrix indexed [n, start]:
- angular_last: arccos(cos(x_l, x_{l+n})) / pi on each sample's last token, mean over samples (Gromov et al.
  2024, PruneMe).
- angular_mean: the same angle averaged over each sample's tokens, then over samples (every sample weighs the
  same, as in angular_last, however long it is).
- block_influence: ShortGPT's BI_i = 1 - cos(x_i, x_{i+1}) pooled over all tokens, summed over the block's layers.

Every matrix has shape (L, L) and is indexed [n, start] directly: row n=0 and cells with start + n > L are NaN.
Block sizes run over 1..L-1 (dropping every layer is not a pruning).

Across processes (torchrun): every sum is additive over texts, so each process scores its share of the batches and
the sums are added up with one all-reduce before the matrix is formed (see layer_distances, process_group).
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from layerprune.errors import UserError
from layerprune.files import significant
from layerprune.forward import Capture, batches, model_inputs, without_head
from layerprune.layers import decoder_layers

METRICS = ("angular_last", "angular_mean", "block_influence")
CHUNK_ELEMENTS = 2**25  # float64 values per chunk of token states: each float64 copy stays under 256 MB


# ---- pure math ----


def cosines(vectors: torch.Tensor) -> torch.Tensor:
    """(..., P, D) -> (..., P, P): cosine of every pair of the P vectors.

    float64, because arccos is steep near cos = 1: a rounding error e in the cosine moves the angle by ~sqrt(2e),
    so in float32 two identical states would already look ~1e-4 apart.
    """
    vectors = vectors.double()
    gram = vectors @ vectors.transpose(-1, -2)
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt().clamp(min=1e-30)  # from the Gram matrix: no pass over D
    return gram / (norms[..., :, None] * norms[..., None, :])


def angular(cos: torch.Tensor) -> torch.Tensor:
    """Angular distance in [0, 1]: 0 for the same direction, 1/2 orthogonal, 1 opposite."""
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class _Sums:
    """Running sums over samples and tokens: memory is flat in the number of samples."""

    def __init__(self, num_states: int, device):
        self.last = torch.zeros(num_states, num_states, dtype=torch.float64, device=device)
        self.mean = torch.zeros_like(self.last)
        self.adjacent_cos = torch.zeros(num_states - 1, dtype=torch.float64, device=device)
        self.num_samples = 0
        self.num_tokens = 0

    def add(self, states: list[torch.Tensor], lengths: torch.Tensor) -> None:
        """states[i]: (tokens, D) non-padding tokens of x_i, sample after sample; lengths: tokens per sample."""
        device = self.last.device
        lengths = lengths.to(device)
        # Each token weighs 1/len(its sample), so the sum over tokens is the sum over samples of token means.
        weights = torch.repeat_interleave(1.0 / lengths.double(), lengths)
        is_last = torch.zeros(len(weights), dtype=torch.bool, device=device)
        is_last[lengths.cumsum(0) - 1] = True
        chunk = max(1, CHUNK_ELEMENTS // (len(states) * states[0].shape[-1]))
        for begin in range(0, len(weights), chunk):
            window = slice(begin, begin + chunk)
            cos = cosines(torch.stack([s[window].to(device) for s in states], 1))  # (tokens, L+1, L+1)
            angles = angular(cos)
            self.last += angles[is_last[window]].sum(0)
            self.mean += torch.einsum("t,tij->ij", weights[window], angles)
            self.adjacent_cos += cos.diagonal(offset=1, dim1=-2, dim2=-1).sum(0)
        self.num_samples += len(lengths)
        self.num_tokens += len(weights)

    def all_reduce(self) -> None:
        """Add up the sums of every process, in place (the counts as int64: exact)."""
        import torch.distributed as dist

        counts = torch.tensor([self.num_samples, self.num_tokens], dtype=torch.int64, device=self.last.device)
        for tensor in (self.last, self.mean, self.adjacent_cos, counts):
            dist.all_reduce(tensor)
        self.num_samples, self.num_tokens = counts.tolist()


def _by_block(pairs: np.ndarray) -> np.ndarray:
    """(L+1, L+1) matrix over pairs of states [i, j] -> (L, L) matrix [n, start] of pair (start, start + n)."""
    num_layers = len(pairs) - 1
    out = np.full((num_layers, num_layers), np.nan)
    for n in range(1, num_layers):
        starts = np.arange(num_layers - n + 1)
        out[n, starts] = pairs[starts, starts + n]
    return out


# ---- results ----


@dataclass
class Distances:
    num_layers: int
    num_samples: int
    num_tokens: int
    angular_last: np.ndarray  # (L, L), [n, start]
    angular_mean: np.ndarray  # (L, L), [n, start]
    block_influence: np.ndarray  # (L,), BI_i per layer

    def scores(self, metric: str) -> np.ndarray:
        """(L, L) matrix [n, start] for a metric: lower means the block changes the hidden state less."""
        if metric not in METRICS:
            raise UserError(f"unknown similarity metric {metric!r}; allowed: {', '.join(METRICS)}")
        if metric == "block_influence":
            cumulative = np.concatenate([[0.0], np.cumsum(self.block_influence)])
            pairs = cumulative[None, :] - cumulative[:, None]  # [i, j] = BI_i + ... + BI_{j-1}
            return _by_block(pairs)
        return getattr(self, metric)

    def best_starts(self, metric: str) -> dict[int, tuple[int, float]]:
        """Block size n -> (start of the lowest-scoring block, its score); ties go to the shallowest start."""
        matrix = self.scores(metric)
        best = {}
        for n in range(1, self.num_layers):
            start = int(np.nanargmin(matrix[n]))
            best[n] = (start, float(matrix[n, start]))
        return best

    def to_rows(self) -> list[dict]:
        """Tidy rows {metric, n, start, distance}, one per block and metric (a CSV that `dvc plots` can draw).

        Distances at 6 significant digits: the CSV is in git, and the 7th digit moves with the thread count, the batch
        size and the CPU (float32 sums in another order), which would make a rerun elsewhere rewrite it."""
        rows = []
        for metric in METRICS:
            matrix = self.scores(metric)
            for n in range(1, self.num_layers):
                for start in range(self.num_layers - n + 1):
                    distance = significant(float(matrix[n, start]), 6)
                    rows.append({"metric": metric, "n": n, "start": start, "distance": distance})
        return rows

    def as_written(self) -> "Distances":
        """These distances as plots/layer_distances.csv keeps them (6 significant digits; a block's block_influence
        the sum of its layers' as written): what every later stage reads, so what this stage reports too."""
        return Distances.from_rows(self.to_rows(), num_samples=self.num_samples, num_tokens=self.num_tokens)

    @classmethod
    def from_rows(cls, rows, *, num_samples: int, num_tokens: int) -> "Distances":
        """Inverse of to_rows; accepts the strings csv.DictReader gives."""
        rows = [(r["metric"], int(r["n"]), int(r["start"]), float(r["distance"])) for r in rows]
        # Blocks of one layer start at 0..L-1, and block_influence of a one-layer block is BI itself.
        influence = sorted((start, value) for metric, n, start, value in rows if metric == "block_influence" and n == 1)
        num_layers = len(influence)
        matrices = {metric: np.full((num_layers, num_layers), np.nan) for metric in METRICS}
        for metric, n, start, value in rows:
            matrices[metric][n, start] = value
        return cls(
            num_layers=num_layers,
            num_samples=num_samples,
            num_tokens=num_tokens,
            angular_last=matrices["angular_last"],
            angular_mean=matrices["angular_mean"],
            block_influence=np.array([value for _, value in influence]),
        )


# ---- model I/O ----


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes; (0, 1) unless a torch.distributed group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(device: str):
    """Join the process group that torchrun describes (WORLD_SIZE > 1) and leave it at the end: gloo on CPU, nccl
    on CUDA, where each process pins the GPU of its LOCAL_RANK. Yields (rank, gpu): gpu is that GPU's index, or
    None for one process, which keeps device_map="auto" and so spreads a model too big for one GPU over all."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, None
        return
    import torch.distributed as dist

    gpu = int(os.environ["LOCAL_RANK"]) if device == "cuda" else None
    if gpu is not None:
        torch.cuda.set_device(gpu)
    dist.init_process_group("nccl" if gpu is not None else "gloo")
    try:
        yield dist.get_rank(), gpu
    finally:
        dist.destroy_process_group()


def layer_distances(
    model,
    token_ids: list[list[int]],
    *,
    batch_size: int,
    padding_side: str = "right",
    pad_id: int = 0,
    progress: bool = True,
) -> Distances:
    """Score every block of consecutive decoder layers on the given token ids (one forward pass per batch).

    With a torch.distributed group running, every process passes the same token_ids and scores every size-th batch
    of the length-sorted order from its rank on (whole batches, so each is padded as in one process, and the
    longest texts spread over all processes); every process returns the same result. Per batch the sums are those
    of one process; only the order of the float64 additions across batches differs (~1e-16 relative), and with
    one batch per process the result is bit-identical.
    """
    layers = decoder_layers(model)
    if len(layers) < 2:
        raise UserError(f"{type(model).__name__} has {len(layers)} decoder layer; nothing to prune")
    if not token_ids:
        raise UserError("no texts to score (every text had fewer than 2 tokens)")
    forward = without_head(model, layers)
    device = model.get_input_embeddings().weight.device
    sums = _Sums(len(layers) + 1, device)
    rank, size = rank_and_size()
    share = list(batches(token_ids, batch_size))[rank::size]
    total = sum(len(ids) for batch in share for ids in batch)
    with Capture(layers) as capture, torch.inference_mode(), tqdm(
        total=total, unit="tok", desc="layer distances", disable=not progress or rank != 0
    ) as bar:
        for batch in share:
            inputs = model_inputs(batch, pad_id=pad_id, device=device, padding_side=padding_side)
            mask = inputs["attention_mask"]
            capture.keep, capture.states = mask.bool(), []
            forward(**inputs)
            sums.add(capture.states, mask.sum(-1))
            capture.states = []  # free this batch's states before the next forward pass
            bar.update(int(mask.sum()))
    if size > 1:
        sums.all_reduce()
    last, mean = ((pair_sums / sums.num_samples).cpu().numpy() for pair_sums in (sums.last, sums.mean))
    return Distances(
        num_layers=len(layers),
        num_samples=sums.num_samples,
        num_tokens=sums.num_tokens,
        angular_last=_by_block(last),
        angular_mean=_by_block(mean),
        block_influence=1.0 - (sums.adjacent_cos / sums.num_tokens).cpu().numpy(),
    )
