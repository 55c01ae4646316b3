"""The calibration loss of a model without given layers, for the strategies that choose by what dropping costs
(strategies.py: `loss` after Shortened LLaMA, `iterative` after SLEB).

Those strategies need the loss of many pruned models, and a naive loop runs each pruned model whole. Here the
candidates share a prefix: one pass of the (possibly already pruned) model records the hidden state entering every
layer, and a candidate that drops the layers from position p on runs only the layers after its block, the final
norm and the head, starting from the recorded state at p.

Layers are removed in memory (without_layers), the way mergekit's passthrough slice removes them on disk.
Nothing is hand-written of a model's forward pass: a candidate runs the model's own forward, with the state
recorded at p put in place of the token embeddings (the embeddings feed the first layer it keeps).
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from layerprune.budget import Workload
from layerprune.cost import Cost
from layerprune.errors import UserError
# the similarity pass's batching, padding and hooks: the loss passes see the texts exactly as it does
from layerprune.forward import Capture, batches, model_inputs, pad_token_id, tokenize, without_head
from layerprune.layers import decoder_layers, slice_per_layer_lists


@contextmanager
def without_layers(model, dropped):
    """The model with the decoder layers in `dropped` (original indices) removed, restored on exit."""
    layers = decoder_layers(model)
    config = model.config.get_text_config()
    num_layers = len(layers)
    kept = [i for i in range(num_layers) if i not in set(dropped)]
    owner, name = next((m, n) for m in model.modules() for n, child in m.named_children() if child is layers)
    saved = {key: getattr(config, key) for key, value in config.to_dict().items()
             if isinstance(value, list) and len(value) == num_layers}
    # Attention modules index the KV cache by layer_idx; lm-eval's forward passes make a cache sized for the kept
    # layers, so each kept layer takes its new position, as in a mergekit slice.
    numbered = [(module, position, module.layer_idx) for position, i in enumerate(kept)
                for module in layers[i].modules() if hasattr(module, "layer_idx")]
    setattr(owner, name, torch.nn.ModuleList(layers[i] for i in kept))
    slice_per_layer_lists(config, kept, num_layers)
    config.num_hidden_layers = len(kept)
    for module, position, _ in numbered:
        module.layer_idx = position
    try:
        yield model
    finally:
        setattr(owner, name, layers)
        for key, value in saved.items():
            setattr(config, key, value)
        config.num_hidden_layers = num_layers
        for module, _, index in numbered:
            module.layer_idx = index


@contextmanager
def _embeddings_replaced(model, state: dict):
    """While active, the token embeddings are replaced by state["hidden"] (a recorded hidden state)."""
    handle = model.get_input_embeddings().register_forward_hook(lambda module, args, output: state["hidden"])
    try:
        yield
    finally:
        handle.remove()


def _scored(mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq-1) bool: the real tokens that follow a real token, i.e. the ones a next-token loss scores."""
    return (mask[:, 1:] * mask[:, :-1]).bool()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood over the real tokens (each predicted from the one before).

    logsumexp minus the target's logit is log-softmax at the target alone: no (batch, seq, vocab) tensor of
    log-probabilities is written (262k entries per token on Gemma 3; writing them was a fifth of the search)."""
    logits = logits[:, :-1].float()
    target = logits.gather(-1, input_ids[:, 1:, None])[..., 0]
    return (torch.logsumexp(logits, -1) - target)[_scored(mask)].sum()


def layer_flops(model) -> list[int]:
    """Matmul FLOPs per token of each decoder layer: 2 per weight (attention scores, at most a few percent at the
    lengths we score, are left out; they would only add to both sides of a comparison)."""
    return [2 * sum(p.numel() for p in layer.parameters() if p.dim() > 1) for layer in decoder_layers(model)]


@dataclass
class LossSearch:
    """Calibration loss (mean next-token NLL in nats) of the model without given layers, memoised by the dropped
    set, with a running count of the decoder-layer FLOPs spent."""

    model: object
    token_ids: list[list[int]]
    batch_size: int
    pad_id: int = 0
    progress: bool = True
    losses: dict = field(default_factory=dict)  # frozenset of dropped layers -> loss
    flops: int = 0

    def __post_init__(self):
        if not self.token_ids:
            raise UserError("no texts to score (every calibration text had fewer than 2 tokens)")
        self.num_layers = len(decoder_layers(self.model))
        self._flops_per_token = layer_flops(self.model)
        self._head_flops = 2 * self.model.get_output_embeddings().weight.numel()
        self._device = self.model.get_input_embeddings().weight.device

    def _count(self, layers_run, mask) -> None:
        self.flops += int(mask.sum()) * sum(self._flops_per_token[i] for i in layers_run)

    def full_loss(self, dropped) -> float:
        """The naive way: run the whole pruned model (the reference the shared prefix must equal)."""
        kept = [i for i in range(self.num_layers) if i not in set(dropped)]
        total, count = torch.zeros((), dtype=torch.float64), 0
        with without_layers(self.model, dropped), torch.inference_mode():
            for batch in batches(self.token_ids, self.batch_size):
                inputs = model_inputs(batch, pad_id=self.pad_id, device=self._device)
                input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
                logits = self.model(**inputs).logits
                total += token_nll(logits, input_ids, mask).double().cpu()
                count += int(_scored(mask).sum())
                self._count(kept, mask)
        return float(total / count)

    def block_losses(self, dropped, blocks: list[tuple[int, ...]]) -> list[float]:
        """Loss without `dropped` + each block; a block is consecutive among the layers `dropped` keeps. Blocks not
        seen before are scored together: one pass of the model without `dropped` records the input of every kept
        layer, then each block runs only the layers after it."""
        dropped = frozenset(dropped)
        kept = [i for i in range(self.num_layers) if i not in dropped]
        todo = sorted({tuple(b) for b in blocks if dropped | set(b) not in self.losses}, key=min)
        for block in todo:
            first = kept.index(block[0])
            if list(block) != kept[first : first + len(block)]:
                raise ValueError(f"block {block} is not consecutive among the kept layers {kept}")
        if todo:
            self._score(dropped, kept, todo)
        return [self.losses[dropped | set(b)] for b in blocks]

    def _score(self, dropped, kept, blocks) -> None:
        layers = decoder_layers(self.model)
        prefix = kept[: max(kept.index(b[0]) for b in blocks)]  # the layers before the deepest block
        sums = {block: torch.zeros((), dtype=torch.float64) for block in blocks}
        count, state = 0, {}
        per_token = sum(self._flops_per_token[i] for i in prefix) + sum(
            sum(self._flops_per_token[i] for i in kept[kept.index(b[0]) + len(b) :]) + self._head_flops for b in blocks)
        tokens = sum(map(len, self.token_ids))
        cost = Cost(f"calibration loss of {len(blocks)} candidates", per_token * tokens, quiet=not self.progress)
        bar = tqdm(total=len(self.token_ids) * len(blocks), unit="text×block", desc="calibration loss",
                   disable=not self.progress, leave=False)
        with torch.inference_mode(), bar:
            for batch in batches(self.token_ids, self.batch_size):
                started = time.perf_counter()
                inputs = model_inputs(batch, pad_id=self.pad_id, device=self._device)
                input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
                count += int(_scored(mask).sum())
                states = []  # states[p]: the input of kept layer p (p = 0..len(prefix)), (batch, seq, D), padding too
                if prefix:
                    with without_layers(self.model, set(range(self.num_layers)) - set(prefix)), \
                            Capture([layers[i] for i in prefix]) as capture:
                        capture.keep, capture.states = torch.ones_like(mask, dtype=torch.bool), []
                        without_head(self.model, layers[prefix[0]])(**inputs)  # the prefix needs no logits
                    states = [s.view(*mask.shape, -1) for s in capture.states]
                    self._count(prefix, mask)
                for block in blocks:
                    position = kept.index(block[0])
                    after = kept[position + len(block) :]
                    # A hook that returns None leaves the embeddings alone: a block at position 0 starts from them.
                    state["hidden"] = states[position] if position else None
                    with without_layers(self.model, set(range(self.num_layers)) - set(after)), \
                            _embeddings_replaced(self.model, state):
                        logits = self.model(**inputs).logits
                    sums[block] += token_nll(logits, input_ids, mask).double().cpu()
                    self._count(after, mask)
                    bar.update(len(batch))
                cost.first_batch(per_token * int(mask.sum()), time.perf_counter() - started)
        for block in blocks:
            self.losses[dropped | set(block)] = float(sums[block] / count)


def search_workload(similarity, num_layers: int) -> Workload:
    """The largest pass of a search: one batch of the similarity pass's shape, the input of every layer kept, and
    the logits."""
    tokens = similarity.batch_size * similarity.max_length
    return Workload(tokens, similarity.max_length, kept_states=num_layers + 1, logits=True)


def loss_search(model, tokenizer, texts: list[str], prune, similarity, *, progress: bool = True) -> LossSearch:
    """A LossSearch on the first prune.search_texts calibration texts, tokenized and batched as the similarity pass
    does it (similarity.max_length, similarity.batch_size): the params sections of choose-range and the frontier."""
    if prune.search_texts > len(texts):
        raise UserError(f"prune.search_texts={prune.search_texts}: the calibration set has only {len(texts)} texts "
                        "(sample.calibration)")
    token_ids, _ = tokenize(tokenizer, texts[: prune.search_texts], similarity.max_length)
    return LossSearch(model, token_ids, similarity.batch_size, pad_id=pad_token_id(tokenizer), progress=progress)
