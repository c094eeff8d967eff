"""The one place where the pipeline asks about a model's anatomy: its layers, patch grid, prefix tokens, input
shape, structure. Every command, the demo, the evaluation and the pictures ask these functions, which ask the
model's host (``pm_kernels.hosts``: timm, transformers, open_clip), never the model's own attribute names.

``model`` may be a classifier, a task model naming its backbone (``pm_backbone``: a ``Segmenter``) or either's
``optimize`` form (``pm_source``: the model it folds).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..hosts import Host, resolve
from ..measure.macs import kept_tokens as _kept_tokens

__all__ = ["vit", "layers", "img_size", "input_shape", "grid", "num_patches", "num_prefix", "num_tokens",
           "is_compressed", "kept_tokens", "pruned_tokens", "mean_keep", "BlockStructure", "block_structures",
           "reference_parameter", "num_heads"]


def _host(model: nn.Module) -> Tuple[Host, nn.Module]:
    """(host, backbone) of ``model``, through an ``optimize`` form to the model it folds."""
    return resolve(getattr(model, "pm_source", model))


def vit(model: nn.Module) -> nn.Module:
    """The ViT whose layers Prune-and-Merge compresses."""
    return _host(model)[1]


def layers(model: nn.Module) -> List[nn.Module]:
    host, backbone = _host(model)
    return list(host.layers(backbone))


def num_heads(model: nn.Module) -> int:
    host, backbone = _host(model)
    return int(host.num_heads(host.layers(backbone)[0]))


def grid(model: nn.Module) -> Tuple[int, int]:
    host, backbone = _host(model)
    return tuple(int(g) for g in host.grid(backbone))


def input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) of one input image."""
    host, backbone = _host(model)
    (h, w), (ph, pw) = host.grid(backbone), host.patch_size(backbone)
    return int(host.in_chans(backbone)), int(h * ph), int(w * pw)


def img_size(model: nn.Module) -> int:
    """The (square) image side the model is built for."""
    return input_shape(model)[1]


def num_patches(model: nn.Module) -> int:
    h, w = grid(model)
    return h * w


def num_prefix(model: nn.Module) -> int:
    host, backbone = _host(model)
    return int(host.num_prefix(backbone))


def num_tokens(model: nn.Module) -> int:
    """N: patches and prefix tokens."""
    return num_patches(model) + num_prefix(model)


def is_compressed(model: nn.Module) -> bool:
    """Whether any layer has a structure other than the identity."""
    return any(not getattr(layer, "is_identity", True) for layer in layers(model))


def kept_tokens(model: nn.Module) -> List[int]:
    """K per layer (N for a dense layer)."""
    return _kept_tokens(vit(model))


def pruned_tokens(model: nn.Module) -> List[int]:
    return [int(getattr(layer, "num_pruned", 0)) for layer in layers(model)]


def mean_keep(model: nn.Module) -> float:
    """Mean fraction of the tokens the layers attend over (K / N); 1.0 for the dense model."""
    ks = kept_tokens(model)
    return sum(ks) / (len(ks) * num_tokens(model))


class BlockStructure(NamedTuple):
    """One layer's structure, for pictures: ``M`` (K × N, None for a dense layer), ``keep_mask`` (N), K."""
    M: Optional[torch.Tensor]
    keep_mask: Optional[torch.Tensor]
    kept: int


def block_structures(model: nn.Module) -> List[BlockStructure]:
    return [BlockStructure(getattr(layer, "M", None), getattr(layer, "keep_mask", None), k)
            for layer, k in zip(layers(model), kept_tokens(model))]


def reference_parameter(model: nn.Module) -> torch.Tensor:
    """A tensor whose device and dtype are the model's."""
    host, backbone = _host(model)
    return host.reference_tensor(backbone)
