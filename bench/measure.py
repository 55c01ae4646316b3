"""What bench/run.py times: the reference methods it compares layerprune against, and how it measures.

Every comparison runs its contestants interleaved (A, B, A, B ...): on a shared machine the load of the neighbours
drifts over minutes, and a ratio of two numbers taken seconds apart survives that drift far better than either
number alone.
"""
import math
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import psutil
import torch

from layerprune.forward import batches, model_inputs, pad, without_head


def interleave(contestants: dict, rounds: int) -> dict[str, list]:
    """Call each contestant once per round, in turn; contestant(round) returns its measurement."""
    results = {name: [] for name in contestants}
    for r in range(rounds):
        for name, contestant in contestants.items():
            results[name].append(contestant(r))
    return results


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b: each ratio compares two runs taken moments apart."""
    return statistics.median(x / y for x, y in zip(a, b))


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


class PeakRSS:
    """Peak anonymous resident memory above the level at entry, polled every millisecond from a thread.

    RSS, not tracemalloc: torch allocates tensors outside Python's allocator. Anonymous (rss - shared), because
    safetensors are read through mmap, and file pages in RSS are page cache the kernel can drop, not memory the
    step needs. Run it in a fresh process (in_child): a warm process re-uses heap it already holds, and the delta
    would understate the need."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self._anonymous()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _anonymous(self) -> int:
        info = self.process.memory_info()
        return info.rss - info.shared

    def _poll(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, self._anonymous())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self._anonymous())
        self.delta = self.peak - self.start


# Children fork from a server process that imported these modules and never ran a model: each child starts with
# a clean heap, as a spawned one would, without paying the seconds of importing torch, transformers and mergekit.
_CHILDREN = get_context("forkserver")
_CHILDREN.set_forkserver_preload(["measure", "layerprune.models", "layerprune.slicing"])


def in_child(fn, *args):
    """fn(*args) in a fresh process, for memory measurements that the parent's heap would blur."""
    with ProcessPoolExecutor(1, mp_context=_CHILDREN) as pool:
        return pool.submit(fn, *args).result()


# ---- similarity: the references layer_distances is compared against ----


def matmul_flops_per_second(size: int = 2048) -> float:
    """FLOP/s of a plain fp32 size x size matmul, the best of three: the machine's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / min(timed(torch.matmul, a, b) for _ in range(3))


def bare_forward(model, token_ids, batch_size: int, pad_id: int) -> None:
    """The floor under layer_distances: the same body (no lm_head), the same batches, no hooks, no metrics.
    Uses forward.py, as layer_distances does, so the batches are the same by construction."""
    forward, device = without_head(model), model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for batch in batches(token_ids, batch_size):
            forward(**model_inputs(batch, pad_id=pad_id, device=device))


def pruneme_pass(model, token_ids, n: int, batch_size: int, pad_id: int) -> list[float]:
    """PruneMe's method for one block size n (one run of its script): the full model, logits included, with
    output_hidden_states=True, over every sample in dataset order (no sorting by length), the last non-padding
    token of each state after the embedding, angular distance of x_l and x_{l+n} averaged per batch.
    A reimplementation of the method for timing, not PruneMe's code; returns distance by start layer."""
    sums = None
    with torch.no_grad():
        for begin in range(0, len(token_ids), batch_size):
            input_ids, mask = pad(token_ids[begin : begin + batch_size], "right", pad_id)
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            last = mask.sum(-1) - 1
            states = [h[torch.arange(len(last)), last] for h in hidden[1:]]
            batch = [
                (torch.arccos(torch.cosine_similarity(states[l], states[l + n]).clamp(-1, 1)) / math.pi).mean().item()
                for l in range(len(states) - n)
            ]
            sums = batch if sums is None else [s + d for s, d in zip(sums, batch)]
    return sums


# ---- evaluation ----


def direct_loglikelihood(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> tuple[int, float]:
    """The floor under lm-eval's perplexity: lm-eval's own rolling windows (its window functions, its prefix token),
    batched longest first, one forward pass per batch, log_softmax over the vocabulary and a gather of the scored
    tokens. Returns (tokens scored, their total log-likelihood)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = [
        make_disjoint_window(window)
        for text in texts
        for window in get_rolling_token_windows(tokenizer.encode(text, add_special_tokens=False), prefix, max_length, 1)
    ]
    windows.sort(key=lambda w: -(len(w[0]) + len(w[1])))
    total = 0.0
    with torch.inference_mode():
        for begin in range(0, len(windows), batch_size):
            batch = windows[begin : begin + batch_size]
            input_ids, _ = pad([(context + target)[:-1] for context, target in batch], "right", 0)
            logprobs = model(input_ids=input_ids).logits.log_softmax(-1)  # right padding: no mask needed
            for row, (context, target) in enumerate(batch):
                positions = torch.arange(len(context) - 1, len(context) - 1 + len(target))
                total += logprobs[row, positions, torch.tensor(target)].sum().item()
    return sum(len(target) for _, target in windows), total


# ---- run in a fresh process (in_child) for peak memory ----


def similarity_peak_rss(model_dir: str, token_ids, batch_size: int, pad_id: int) -> int:
    from layerprune.models import load_model
    from layerprune.similarity import layer_distances

    model, _ = load_model(model_dir, "cpu")
    with PeakRSS() as memory:
        layer_distances(model, token_ids, batch_size=batch_size, pad_id=pad_id, progress=False)
    return memory.delta


def timed_slice(config, out_dir: str) -> tuple[float, int]:
    """(seconds, peak RSS delta) of layerprune's mergekit slice of `config` (a mergekit MergeConfiguration);
    imports stay outside the measurement."""
    from pathlib import Path

    from layerprune.slicing import slice_model

    with PeakRSS() as memory:
        seconds = timed(slice_model, config, Path(out_dir), progress=False)
    return seconds, memory.delta
