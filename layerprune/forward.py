"""Running a model's decoder layers on batches of token ids: tokenizing, batching, padding, position ids, the model
without its head, and hooks that capture the state entering every layer. The similarity pass, the loss search and
the benchmarks all run texts through these, so they see the texts exactly alike."""
import torch

from layerprune.layers import decoder_layers


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0: padded positions are masked out, so any id does."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, its first max_length tokens (special tokens included); drops texts with < 2 tokens.

    Returns (ids, dropped): one token, e.g. BOS alone for an empty text, says nothing about the language.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ids = [list(tokens) for tokens in encoded if len(tokens) >= 2]
    return ids, len(texts) - len(ids)


def batches(token_ids: list[list[int]], batch_size: int):
    """Samples sorted by length, so a batch holds similar lengths and little padding."""
    ordered = sorted(token_ids, key=len)
    for begin in range(0, len(ordered), batch_size):
        yield ordered[begin : begin + batch_size]


def pad(batch: list[list[int]], padding_side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(batch), longest): each sample padded on `padding_side`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(map(len, batch))
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        cols = slice(0, len(tokens)) if padding_side == "right" else slice(width - len(tokens), width)
        input_ids[row, cols] = torch.tensor(tokens)
        mask[row, cols] = 1
    return input_ids, mask


def model_inputs(batch: list[list[int]], *, pad_id: int, device, padding_side: str = "right") -> dict:
    """The keyword arguments of one forward pass over a padded batch, on `device`, without a KV cache.

    Positions count real tokens only: with left padding, the first real token is still position 0."""
    input_ids, mask = pad(batch, padding_side, pad_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "position_ids": position_ids.to(device), "use_cache": False}


def without_head(model, layers: torch.nn.Module | None = None) -> torch.nn.Module:
    """The model's decoder without the lm_head (logits are unused and costly: 262k vocab for Gemma 3), if it holds
    `layers` (default: the decoder layer list); else the whole model."""
    layers = decoder_layers(model) if layers is None else layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder if any(module is layers for module in decoder.modules()) else model


class Capture:
    """Hooks that keep x_0..x_L of each forward pass: the input of each of `layers`, and the output of the last one.

    Set `keep` ((batch, seq) bool) before a pass: only those positions are stored, in one (tokens, D) tensor per
    state; the captured list is `states`, which the caller empties between passes."""

    def __init__(self, layers):
        self.layers = layers
        self.keep: torch.Tensor | None = None
        self.states: list[torch.Tensor] = []

    def _store(self, hidden: torch.Tensor) -> None:
        # Indexing copies, so a layer that later updates its input in place cannot change what we stored.
        self.states.append(hidden[self.keep.to(hidden.device)])

    def __enter__(self):
        def before(module, args, kwargs):
            self._store(args[0] if args else kwargs["hidden_states"])

        def after(module, args, output):  # transformers 5 layers return a tensor or a tuple
            self._store(output if isinstance(output, torch.Tensor) else output[0])

        self.handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in self.layers]
        self.handles.append(self.layers[-1].register_forward_hook(after))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
