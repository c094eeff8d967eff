"""What the transformers and open_clip hosts share: a model's ``optimize`` form as a *shallow copy* of the model.

Those libraries' models loop over their own layer list (``for layer in self.layers: x = layer(x, ...)``). The
optimize form keeps that loop, and so the model's call and output type: it is a copy of the model whose modules
on the path to the layer list are copied (their own ``_modules``), the list itself replaced by one
``FoldedRunner`` that runs every layer's ``body`` between the folded boundaries (``pm_kernels.optimize``). Every
other module, parameter and buffer is the PM model's own (shared, not duplicated).

Also here: the multiply-adds of a head module on the tokens it reads (``head_macs``), which both count alike.
"""
import copy
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["FoldedRunner", "module_at", "copy_replacing", "folded_copy", "runner_of", "head_macs"]


class FoldedRunner(nn.Module):
    """Stands for a host model's whole layer list in its optimize form: the first "layer" the host's loop calls
    is the folded chain (tokens entering the first layer → tokens after the last); the list holds nothing else.

    ``prefix_only``: the exit reconstructs only the prefix tokens (the host says its head reads only those)."""

    def __init__(self, folded: nn.Module, layers: Sequence[nn.Module], prefix_only: bool):
        super().__init__()
        self.folded = folded
        self.layers = nn.ModuleList(layers)  # the PM model's layers (shared): their bodies run between the folds
        self.prefix_only = bool(prefix_only)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # the host's own arguments (masks, output flags) are checked by its call hook before the loop starts
        return self.folded(hidden_states, self.layers, prefix_only=self.prefix_only)

    def all_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every token after the last layer, whatever ``prefix_only`` says (dense-prediction features)."""
        return self.folded(hidden_states, self.layers)


def module_at(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at dotted ``path`` ("" → ``model``), or None when a step is missing."""
    module = model
    for name in filter(None, path.split(".")):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def copy_replacing(model: nn.Module, path: str, replacement: nn.Module) -> nn.Module:
    """A shallow copy of ``model`` whose submodule at ``path`` is ``replacement``; the modules along the path are
    copied with their own child tables, everything else is ``model``'s own."""
    names = path.split(".")
    top = copy.copy(model)
    top._modules = dict(model._modules)
    parent = top
    for name in names[:-1]:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[names[-1]] = replacement
    return top


def folded_copy(model: nn.Module, layers_path: str, folded: nn.Module, layers: Sequence[nn.Module],
                prefix_only: bool) -> nn.Module:
    """``model``'s optimize form: a shallow copy whose layer list (at ``layers_path``) is one ``FoldedRunner``.
    ``pm_source`` (the PM model) and ``folded_dtype`` are plain attributes (not submodules: the copy's state
    dict is the model's own, seen once)."""
    fast = copy_replacing(model, layers_path, nn.ModuleList([FoldedRunner(folded, layers, prefix_only)]))
    object.__setattr__(fast, "pm_source", model)
    object.__setattr__(fast, "folded_dtype", folded.folded_dtype)
    return fast


def runner_of(layer_list) -> Optional[FoldedRunner]:
    """The ``FoldedRunner`` standing for ``layer_list`` (an optimize form), else None (a PM or plain model)."""
    if isinstance(layer_list, nn.ModuleList) and len(layer_list) == 1 and isinstance(layer_list[0], FoldedRunner):
        return layer_list[0]
    return None


def head_macs(module: Optional[nn.Module], n_tokens: int) -> int:
    """Multiply-adds of a head module reading one token, except an attention pool (``nn.MultiheadAttention``
    inside), whose keys and values are projections of all ``n_tokens`` tokens (plus the query's attention
    products, 2·queries·n·width)."""
    if module is None:
        return 0
    macs = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            width = m.embed_dim
            macs += width * width + 2 * n_tokens * m.kdim * width + 2 * n_tokens * width
    return macs
