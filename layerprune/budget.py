"""Loading a model within a memory budget, on CPU or CUDA.

The budget is a setting of the machine, not of the experiment: the environment variable LAYERPRUNE_MEMORY (say
`10GiB`, `12GB`, `800MiB`), read by every stage that loads a model. It is not a DVC param, so a teammate with more
memory gets the same results from the same cache without rerunning anything; and results are the same to the bit
with or without it (tests/test_budget.py), because only where the weights wait between uses changes, not the
arithmetic.

Under a budget too small for the whole model, the parts that every forward pass needs before and after the decoder
layers (input embedding, rotary embedding, final norm) stay in memory, then as many decoder layers as fit beside
them and the activations of one forward pass; the other layers (and an untied lm_head that does not fit, or is not
used) are read in place from the checkpoint's own safetensors files for each pass and dropped after it. That is
accelerate's big-model inference: transformers points the "disk" entries of the device_map at the checkpoint files
(nothing is copied), and hooks load each offloaded layer onto the compute device just before its forward. The
embedding has to stay: offloaded, `model.device` reads `meta`, which breaks lm-eval's HFLM and our own batches.

We write the device_map ourselves rather than use device_map="auto": accelerate's planner fills memory in module
order, so on a CPU-only machine the final norm and the head (last in order) would go to disk, and it knows nothing
of the activations our passes hold (the similarity pass keeps every layer's hidden states of a batch).
"""
import ctypes
import os
import re
from dataclasses import dataclass

from layerprune.errors import UserError

ENV_VAR = "LAYERPRUNE_MEMORY"
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def memory_budget() -> int | None:
    """LAYERPRUNE_MEMORY in bytes, or None when unset (no budget: the whole model in memory)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"{ENV_VAR}={text!r}: expected an amount of memory such as 10GiB, 12GB or 800MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def gib(size: float) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1 (as LAYERPRUNE_MEMORY may be written)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{size:.0f} B"


def feed_forward_size(config) -> int:
    """The width of a layer's feed-forward, under whichever name the config gives it."""
    return (getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
            or 4 * config.hidden_size)


@dataclass(frozen=True)
class Workload:
    """The largest forward pass a stage makes: `tokens` in one batch (padding included) of sequences up to `length`,
    `kept_states` hidden states per token held beyond the pass (the similarity pass keeps L+1), whether it computes
    logits (lm-eval and the loss search do; the similarity pass stops before the head), and how many of the kept
    states' values it copies to float64 at a time (the similarity's cosines, a chunk at a time)."""

    tokens: int
    length: int
    kept_states: int = 0
    logits: bool = True
    float64_chunk: int = 0

    def activation_bytes(self, config, element_bytes: int) -> int:
        """A bound on the memory of one pass: the widest intermediates of a layer several times over (feed-forward
        up/gate/activation, attention projections, residual), the attention scores, the kept states, the logits
        with their log-softmax, and the float64 chunk with the float32 stack it is made from. Generous on purpose:
        too low, and the budget is overrun."""
        hidden, ffn = config.hidden_size, feed_forward_size(config)
        per_token = 8 * hidden + 3 * ffn + config.num_attention_heads * self.length + self.kept_states * hidden
        if self.logits:
            per_token += 3 * config.vocab_size
        chunk = min(self.float64_chunk, self.tokens * self.kept_states * hidden)
        return per_token * self.tokens * element_bytes + 12 * chunk


@dataclass
class Placement:
    """Where each part of a model lives: `device_map` for from_pretrained, or None when it all fits (a plain load)."""

    device_map: dict | None
    resident_layers: int
    num_layers: int
    needed_bytes: int  # the least this workload needs: resident parts, one layer streamed in, activations

    def describe(self) -> str:
        if self.device_map is None:
            return "the whole model in memory"
        streamed = self.num_layers - self.resident_layers
        return (f"{self.resident_layers} of {self.num_layers} decoder layers in memory, {streamed} read from the "
                f"safetensors files on each pass")


def _bytes(module, element_bytes: int, seen: set) -> int:
    """Bytes of a module's parameters and buffers at the compute dtype, each tensor once (tied weights share)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * (element_bytes if tensor.is_floating_point() else tensor.element_size())
    return total


def plan(model, budget: int | None, workloads: tuple[Workload, ...], *, device, element_bytes: int,
         reserved: int = 0) -> Placement:
    """The placement of `model` (built on the meta device: no weights read) within `budget` bytes on `device`
    ("cpu" or a GPU index) for passes like each of `workloads`, less `reserved` bytes that the caller holds beside it.
    Raises a one-line UserError when the budget cannot hold the resident parts, one streamed layer and the
    activations."""
    from layerprune.layers import decoder_layers

    layers = decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    layers_name = names[id(layers)]
    head = model.get_output_embeddings()
    config = model.config.get_text_config()
    activations = max((workload.activation_bytes(config, element_bytes) for workload in workloads), default=0)
    logits = any(workload.logits for workload in workloads)

    # The modules beside the path from the root to the layer list: embedding, norm, rotary, head.
    seen: set = set()
    resident, device_map = 0, {}
    path = layers_name.split(".")
    for depth in range(len(path)):
        parent = model.get_submodule(".".join(path[:depth]))
        for child_name, child in parent.named_children():
            if child_name == path[depth] or child is head:
                continue
            device_map[names[id(child)]] = device
            resident += _bytes(child, element_bytes, seen)
    head_bytes = _bytes(head, element_bytes, seen)  # 0 when tied to the (already counted) embedding
    layer_bytes = [_bytes(layer, element_bytes, set()) for layer in layers]
    # A streamed module exists twice while it loads: as read from the file (bf16 at rest) and at the compute dtype.
    streamed = 3 * max(layer_bytes + [head_bytes if logits else 0]) // 2
    needed = resident + streamed + activations
    total = resident + head_bytes + sum(layer_bytes) + activations
    if budget is None or total + reserved <= budget:
        return Placement(None, len(layers), len(layers), needed)
    if needed + reserved > budget:
        beside = f" beside {gib(reserved)} for training" if reserved else ""
        raise UserError(
            f"{ENV_VAR}={gib(budget)} cannot hold this model's resident parts ({gib(resident)}), one decoder layer "
            f"streamed in ({gib(streamed)}) and the activations of one batch ({gib(activations)}){beside}: it needs "
            f"at least {gib(needed + reserved)}; raise it, or lower the batch size")
    free = budget - reserved - resident - activations - streamed
    kept = 0
    for index, size in enumerate(layer_bytes):
        fits = kept == index and size <= free  # in order: the first layers stay, the rest stream
        device_map[f"{layers_name}.{index}"] = device if fits else "disk"
        if fits:
            kept, free = kept + 1, free - size
    # The head only when a pass uses it and it fits after the layers (it costs as much to stream as 1.5 of
    # Falcon-11B's layers); tied to the embedding, it is the embedding, and stays.
    if head_bytes == 0 or (logits and head_bytes <= free):
        device_map[names[id(head)]] = device
    else:
        device_map[names[id(head)]] = "disk"
    return Placement(device_map, kept, len(layers), needed)


def return_freed_memory(layers) -> None:
    """After each decoder layer's pass, hand the memory freed in it back to the OS (glibc's malloc_trim).

    Under a budget, a streamed layer's weights and a batch's activations come and go in blocks of many sizes, and
    glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MB) in its heaps, where they fragment: one
    lm-eval pass of Falcon-11B under a 10 GiB budget grew 3.3 GiB of resident memory that way (peak 13.6 GiB; 10.3
    GiB with this, the same numbers, ~5% slower). Elsewhere than glibc (macOS), nothing to do."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    for layer in layers:
        layer.register_forward_hook(lambda *args: trim(0) and None)
