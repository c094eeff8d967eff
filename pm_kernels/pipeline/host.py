"""The one place where the pipeline reads a model's anatomy (timm attributes: ``blocks``, ``patch_embed``,
``num_prefix_tokens``, a block's ``M`` / ``keep_mask``).

Every command, the demo, the evaluation and the pictures ask these functions, never the model, so that a model
host other than timm's ViT (``pm_kernels.hosts``) changes this module only. ``model`` may be a classifier, a
``Segmenter`` (its backbone is read) or either's ``optimize`` form.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..measure.macs import kept_tokens as _kept_tokens
from ..optimize import OptimizedPM
from ..segmenter import OptimizedSegmenter, Segmenter

__all__ = ["vit", "blocks", "img_size", "input_shape", "grid_size", "num_patches", "num_prefix", "num_tokens",
           "is_compressed", "kept_tokens", "pruned_tokens", "mean_keep", "BlockStructure", "block_structures",
           "reference_parameter"]


def vit(model: nn.Module) -> nn.Module:
    """The ViT whose blocks Prune-and-Merge compresses."""
    if isinstance(model, (Segmenter, OptimizedSegmenter)):
        return model.backbone
    if isinstance(model, OptimizedPM):
        return model.model
    return model


def blocks(model: nn.Module) -> List[nn.Module]:
    return list(vit(model).blocks)


def img_size(model: nn.Module) -> int:
    """The (square) image side the model is built for."""
    return int(vit(model).patch_embed.img_size[0])


def input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) of one input image."""
    pe = vit(model).patch_embed
    return (int(pe.proj.in_channels), int(pe.img_size[0]), int(pe.img_size[1]))


def grid_size(model: nn.Module) -> Tuple[int, int]:
    return tuple(int(g) for g in vit(model).patch_embed.grid_size)


def num_patches(model: nn.Module) -> int:
    return int(vit(model).patch_embed.num_patches)


def num_prefix(model: nn.Module) -> int:
    return int(getattr(vit(model), "num_prefix_tokens", 1))


def num_tokens(model: nn.Module) -> int:
    """N: patches and prefix tokens."""
    return num_patches(model) + num_prefix(model)


def is_compressed(model: nn.Module) -> bool:
    """Whether any block has a structure other than the identity."""
    return any(not getattr(blk, "is_identity", True) for blk in blocks(model))


def kept_tokens(model: nn.Module) -> List[int]:
    """K per block (N for a dense block)."""
    return _kept_tokens(vit(model))


def pruned_tokens(model: nn.Module) -> List[int]:
    return [int(getattr(blk, "num_pruned", 0)) for blk in blocks(model)]


def mean_keep(model: nn.Module) -> float:
    """Mean fraction of the tokens the blocks attend over (K / N); 1.0 for the dense model."""
    ks = kept_tokens(model)
    return sum(ks) / (len(ks) * num_tokens(model))


class BlockStructure(NamedTuple):
    """One block's structure, for pictures: ``M`` (K × N, None for a dense block), ``keep_mask`` (N), K."""
    M: Optional[torch.Tensor]
    keep_mask: Optional[torch.Tensor]
    kept: int


def block_structures(model: nn.Module) -> List[BlockStructure]:
    return [BlockStructure(getattr(blk, "M", None), getattr(blk, "keep_mask", None), k)
            for blk, k in zip(blocks(model), kept_tokens(model))]


def reference_parameter(model: nn.Module) -> torch.Tensor:
    """A parameter whose device and dtype are the model's (the patch embedding's weight)."""
    return vit(model).patch_embed.proj.weight
