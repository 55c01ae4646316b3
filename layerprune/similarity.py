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

A killed pass resumes: every process saves its sums, exactly (float64), after the batches it has done (see
SumsCheckpoint), and a rerun adds the remaining batches to them in the same order, so it ends with the same bits.
"""
import hashlib
import io
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import layerprune.forward
import layerprune.layers
from layerprune.budget import Workload
from layerprune.cost import Cost, forward_flops
from layerprune.errors import UserError
from layerprune.files import atomic_write_bytes, remove_stale_temps, significant
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


class SumsCheckpoint:
    """One process's _Sums on disk, so that a killed pass resumes after the last batch saved.

    The tensors go through torch.save, which keeps float64 exactly, and the rerun adds the remaining batches in the
    same order: the result is the one of an unbroken pass to the last bit. The file names the work it belongs to
    (a fingerprint); a file of other work is deleted, not resumed. Without a folder it does nothing."""

    def __init__(self, folder, rank: int, every_seconds: float):
        self.path = None if folder is None else Path(folder) / f"sums.rank{rank}.pt"
        self.every_seconds = every_seconds
        self.fingerprint = None
        self.saved_at = time.monotonic()

    def resume(self, sums: _Sums, num_batches: int, **work) -> int:
        """How many batches `sums` now holds: those of a checkpoint of this `work` (see work_fingerprint), else 0."""
        if self.path is None:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the folder is a DVC output even if nothing is saved
        self.fingerprint = work_fingerprint(**work)
        if not self.path.exists():
            return 0
        saved = torch.load(self.path, map_location=sums.last.device, weights_only=True)
        if saved.get("fingerprint") != self.fingerprint:
            print(f"layer distances: starting afresh; {self.path} held the sums of other work (texts, batches, model "
                  "or code)", flush=True)
            self.path.unlink()
            return 0
        sums.last, sums.mean, sums.adjacent_cos = saved["last"], saved["mean"], saved["adjacent_cos"]
        sums.num_samples, sums.num_tokens = saved["num_samples"], saved["num_tokens"]
        which = f" (rank {work['rank']})" if work["size"] > 1 else ""
        print(f"resuming layer distances at batch {saved['batches']} of {num_batches}{which}", flush=True)
        return saved["batches"]

    def after_batch(self, sums: _Sums, batches_done: int) -> None:
        """Save the sums of the first `batches_done` batches, if `every_seconds` have passed since the last save."""
        if self.path is None or time.monotonic() - self.saved_at < self.every_seconds:
            return
        buffer = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "batches": batches_done, "last": sums.last, "mean": sums.mean,
                    "adjacent_cos": sums.adjacent_cos, "num_samples": sums.num_samples,
                    "num_tokens": sums.num_tokens}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())  # temp file + rename: a kill mid-write keeps the last one
        self.saved_at = time.monotonic()

    def remove(self, all_ranks: bool) -> None:
        """After a finished pass: the folder is left empty, so the persistent DVC output is the same after every run
        (as checkpoints/heal is), and nothing stale is left to resume from. `all_ranks` also removes the files of
        other ranks, those a killed run with more processes left included; only once every process is done saving."""
        if self.path is None:
            return
        for path in self.path.parent.glob("sums.rank*.pt") if all_ranks else [self.path]:
            path.unlink(missing_ok=True)
            remove_stale_temps(path)  # a save that a kill cut short


def work_fingerprint(*, token_ids, model_key: str, **work) -> str:
    """A hash of everything the sums depend on: the token ids, the batching and process share (`work`), the model
    (`model_key`, e.g. its id and revision), the code that computes them and the libraries that run the model."""
    import transformers

    digest = hashlib.sha256(json.dumps({**work, "model_key": model_key, "torch": torch.__version__,
                                        "transformers": transformers.__version__}, sort_keys=True).encode())
    for module in (__file__, layerprune.forward.__file__, layerprune.layers.__file__):
        digest.update(Path(module).read_bytes())
    digest.update(json.dumps(token_ids).encode())
    return digest.hexdigest()


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


def similarity_workload(batch_size: int, max_length: int, num_layers: int) -> Workload:
    """The pass's largest batch, for models.load_model's memory budget: no logits, the L+1 states of every token kept,
    and the float64 copies _Sums.add makes of them, CHUNK_ELEMENTS at a time."""
    return Workload(batch_size * max_length, max_length, kept_states=num_layers + 1, logits=False,
                    float64_chunk=CHUNK_ELEMENTS)


def layer_distances(
    model,
    token_ids: list[list[int]],
    *,
    batch_size: int,
    padding_side: str = "right",
    pad_id: int = 0,
    progress: bool = True,
    checkpoints=None,
    model_key: str = "",
    checkpoint_seconds: float = 30.0,
) -> Distances:
    """Score every block of consecutive decoder layers on the given token ids (one forward pass per batch).

    With a torch.distributed group running, every process passes the same token_ids and scores every size-th batch
    of the length-sorted order from its rank on (whole batches, so each is padded as in one process, and the
    longest texts spread over all processes); every process returns the same result. Per batch the sums are those
    of one process; only the order of the float64 additions across batches differs (~1e-16 relative), and with
    one batch per process the result is bit-identical.

    With a `checkpoints` folder, every process saves its sums there (a file per rank) at most every
    `checkpoint_seconds`, and a rerun of the same work resumes after the last batch saved, with the same result to
    the last bit; `model_key` names the model's weights (id and revision) for the fingerprint. The file is deleted at
    the end. Why 30 s: a save is (L+1)^2 float64 twice (60 KB at 60 layers) and one device sync, about a millisecond;
    after every batch that would be nothing on a CPU (seconds to minutes a batch) but a few % on a GPU with small
    batches, while 30 s keeps the cost under 0.1% anywhere and a kill loses at most 30 s of work.
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
    checkpoint = SumsCheckpoint(checkpoints, rank, checkpoint_seconds)
    start = checkpoint.resume(
        sums, len(share), token_ids=token_ids, model_key=model_key, batch_size=batch_size, padding_side=padding_side,
        pad_id=pad_id, rank=rank, size=size, model=f"{type(model).__name__}, {len(layers)} layers, {device}, "
                                                   f"{model.get_input_embeddings().weight.dtype}")
    total = sum(len(ids) for batch in share for ids in batch)
    quiet = not progress or rank != 0
    cost = Cost("layer distances", sum(forward_flops(model, list(map(len, batch))) for batch in share[start:]),
                quiet=quiet)
    with Capture(layers) as capture, torch.inference_mode(), tqdm(
        total=total, initial=sum(len(ids) for batch in share[:start] for ids in batch), unit="tok",
        desc="layer distances", disable=quiet
    ) as bar:
        for done, batch in enumerate(share[start:], start + 1):
            started = time.perf_counter()
            inputs = model_inputs(batch, pad_id=pad_id, device=device, padding_side=padding_side)
            mask = inputs["attention_mask"]
            capture.keep, capture.states = mask.bool(), []
            forward(**inputs)
            sums.add(capture.states, mask.sum(-1))
            capture.states = []  # free this batch's states before the next forward pass
            bar.update(int(mask.sum()))
            cost.first_batch(forward_flops(model, list(map(len, batch))), time.perf_counter() - started)
            checkpoint.after_batch(sums, done)
    if size > 1:
        sums.all_reduce()
    checkpoint.remove(all_ranks=rank == 0)  # only now: every process is past its last save
    last, mean = ((pair_sums / sums.num_samples).cpu().numpy() for pair_sums in (sums.last, sums.mean))
    return Distances(
        num_layers=len(layers),
        num_samples=sums.num_samples,
        num_tokens=sums.num_tokens,
        angular_last=_by_block(last),
        angular_mean=_by_block(mean),
        block_influence=1.0 - (sums.adjacent_cos / sums.num_tokens).cpu().numpy(),
    )
