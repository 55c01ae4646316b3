"""A model's stack of decoder layers: finding it, and what a config keeps of its per-layer lists when layers go.

The same rule serves a slice on disk (slicing.py, on the config mergekit writes) and a removal in memory
(search.without_layers): the kept layers keep their own per-layer config entries (Gemma 3's sliding/full
`layer_types`), in order. Small and stable on purpose: the model, slice and heal stages depend on it, and an edit to
batching or capture (forward.py) or to in-memory removal (search.py) reruns none of them.
"""
import torch

from layerprune.errors import UserError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layer list, found by length rather than by name (model.layers, transformer.h, ...)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():  # outermost first, so a per-layer sub-list never wins
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise UserError(f"{type(model).__name__}: no list of {num_layers} decoder layers found")


def slice_per_layer_lists(config, kept: list[int], num_layers: int) -> None:
    """Keep, in every list-valued entry with one item per original layer, the items of the kept layers, in order.
    `config` is the text config (where the decoder layers live); a list of another length is left alone."""
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == num_layers:
            setattr(config, key, [value[i] for i in kept])
