"""What a pass over a model costs, said before the wait: its FLOPs first, then, once the first batch has run, the time
they take at that batch's rate. A progress bar with its own ETA follows (ours, lm-eval's or the Trainer's).

At Falcon-11B size on two CPU cores a stage runs for tens of minutes; knowing that before it starts is what lets
someone choose smaller samples instead of waiting to find out."""
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

from layerprune.layers import decoder_layers


def forward_flops(model, lengths: list[int], *, head: bool = False) -> float:
    """Useful FLOPs of one forward pass over sequences of these lengths: 2 per decoder-layer weight per token (a
    multiply-add), plus causal attention (QK^T and AV at s^2/2 multiply-adds each per head dim: 2 s^2 heads head_dim
    per layer), plus the lm_head when `head`. Padding and the embedding lookup (no arithmetic) are not counted.
    Reads shapes only, so it works on a model whose weights are offloaded."""
    config = model.config.get_text_config()
    layers = decoder_layers(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weights = sum(p.numel() for p in layers.parameters())
    attention = len(layers) * sum(2 * s * s * config.num_attention_heads * head_dim for s in lengths)
    flops = 2 * weights * sum(lengths) + attention
    if head:
        flops += 2 * model.get_output_embeddings().weight.numel() * sum(lengths)
    return flops


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Cost:
    """Says `what` will cost `total_flops` now, and how long that takes once the first batch is timed."""

    def __init__(self, what: str, total_flops: float, *, quiet: bool = False):
        self.what, self.total, self.quiet, self.reported = what, total_flops, quiet, False
        self._say(f"{total_flops / 1e12:.3g} TFLOP")

    def _say(self, text: str) -> None:
        if not self.quiet:  # tqdm.write: on its own line above a progress bar that is running, ours or lm-eval's
            tqdm.write(f"{self.what}: {text}", file=sys.stderr)

    def first_batch(self, flops: float, seconds: float) -> None:
        """The first batch did `flops` in `seconds`: say how long the whole takes at that rate (once)."""
        if self.reported or seconds <= 0 or flops <= 0:
            return
        self.reported = True
        rate = flops / seconds
        self._say(f"first batch at {rate / 1e9:.3g} GFLOP/s; all of it takes about {duration(self.total / rate)}")

    @contextmanager
    def first_call(self, module, flops_of_call):
        """Time the first forward call of `module` (inside loops that are not ours: lm-eval's), whose FLOPs are
        flops_of_call(input_ids)."""
        started = {}

        def before(mod, args, kwargs):
            started.setdefault("at", time.perf_counter())

        def after(mod, args, kwargs, output):
            if "at" in started and not self.reported:
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                if input_ids is not None:
                    self.first_batch(flops_of_call(input_ids), time.perf_counter() - started["at"])

        handles = [module.register_forward_pre_hook(before, with_kwargs=True),
                   module.register_forward_hook(after, with_kwargs=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
