"""``patch_timm``: turn a timm VisionTransformer into a Prune-and-Merge model, in place (ToMe-style class swap).

The model becomes a ``PMVisionTransformer`` (its ``forward_features`` runs the fused block chain, gradient
checkpointing included), ``model.blocks`` a ``PMBlocks``, each block a ``PMBlock`` and its attention a
``PMAttention``; the identity structure is installed (outputs equal the dense model's). ``compress`` installs a
searched structure through ``install_structure``. State-dict keys stay timm's, plus ``blocks.i.M / .R /
.keep_mask``.
"""
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .dispatch import model_backend
from .layers import PMAttention, PMBlock, PMBlockMixin, PMBlocks
from .structure import LayerStructure, search_structure, structure_matrices

__all__ = ["PMVisionTransformer", "patch_timm", "install_structure", "is_patched", "num_tokens", "set_backend"]


class PMModelMixin:
    """What a PM model adds to its timm class: features through the fused ``PMBlocks`` chain."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.blocks.grad_checkpointing = enable  # checkpointed inside the chain: the fused boundaries survive

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        # timm's forward_features, except that the blocks always run as one PMBlocks chain (timm hands them to
        # checkpoint_seq one by one under gradient checkpointing, which would unfuse every boundary).
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask: Prune-and-Merge models take no mask and no causal flag")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.norm(self.blocks(x))


class PMVisionTransformer(PMModelMixin, VisionTransformer):
    """A timm VisionTransformer whose blocks are Prune-and-Merge blocks (identity structure when built)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        patch_timm(self)


_PM_CLASSES = {VisionTransformer: PMVisionTransformer}


def _pm_class(cls: type) -> type:
    """The PM class of a timm model class (made once for subclasses of VisionTransformer, as ToMe does)."""
    if issubclass(cls, PMModelMixin):
        return cls
    if cls not in _PM_CLASSES:
        _PM_CLASSES[cls] = type(f"PM{cls.__name__}", (PMModelMixin, cls), {"__module__": cls.__module__})
    return _PM_CLASSES[cls]


def is_patched(model) -> bool:
    return (isinstance(model, PMModelMixin) and len(model.blocks) > 0
            and all(isinstance(b, PMBlockMixin) for b in model.blocks))


def num_tokens(model: VisionTransformer) -> int:
    """N: prefix tokens + patches."""
    return model.num_prefix_tokens + model.patch_embed.num_patches


def set_backend(model, backend: str) -> None:
    """Route every patched block's token ops and attention to ``backend`` (auto | cuda | triton | torch).

    An op without that backend stays on "auto" (the extension, "cuda", has no attention kernel).
    """
    if backend not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch_timm), got {type(model).__name__}")
    for blk in model.blocks:
        blk.backend = model_backend("merge", backend)
        blk.attn.backend = model_backend("attention", backend)


def _check_vit(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer (DeiT/ViT), got {type(model).__name__}")
    if getattr(model, "dist_token", None) is not None or type(model).__name__ == "VisionTransformerDistilled":
        raise ValueError("model: distilled DeiT (a distillation token) is not supported; "
                         "use the non-distilled DeiT/ViT")
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise ValueError(f"model: expected exactly one prefix token (CLS), got num_prefix_tokens="
                         f"{model.num_prefix_tokens} (class_token={model.cls_token is not None})")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("model: dynamic_img_size=True is not supported (PM needs a fixed token count N)")
    if not isinstance(model.blocks, torch.nn.Sequential):
        raise TypeError(f"model.blocks: expected an nn.Sequential of timm Blocks, got {type(model.blocks).__name__}")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(f"model.blocks[{i}]: expected a timm pre-norm Block with Attention, "
                            f"got {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}")


def _install(model, matrices: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Put one (M, R, keep_mask) per block into the model's PM blocks; each is checked by set_structure."""
    if len(matrices) != len(model.blocks):
        raise ValueError(f"structure: expected {len(model.blocks)} per-layer structures (one per block), "
                         f"got {len(matrices)}")
    n = num_tokens(model)
    for layer, (blk, (M, R, keep_mask)) in enumerate(zip(model.blocks, matrices)):
        if M.dim() != 2 or M.shape[1] != n:
            raise ValueError(f"structure: layer {layer} is built for {M.shape[-1]} tokens, the model has N = {n}")
        blk.set_structure(M, R, keep_mask)


def patch_timm(model: VisionTransformer, structure: Optional[Sequence[LayerStructure]] = None,
               scores: Optional[torch.Tensor] = None, grid_size: Optional[Sequence[int]] = None
               ) -> VisionTransformer:
    """Make ``model`` a Prune-and-Merge model in place with the identity structure (M = I, R = I,
    keep_mask = 1: outputs equal the model's) and return it. A model already patched keeps its structure.

    ``structure`` / ``scores`` / ``grid_size`` are deprecated (use ``pm_kernels.compress``): they install a
    searched structure as before.
    """
    if structure is not None or scores is not None or grid_size is not None:
        warnings.warn("patch_timm(model, structure=..., scores=..., grid_size=...) is deprecated and will be removed "
                      "in 0.3: call pm_kernels.patch_timm(model), then pm_kernels.compress(model, scores, ...)",
                      DeprecationWarning, stacklevel=2)
    if is_patched(model):
        pass
    else:
        _check_vit(model)
        for blk in model.blocks:
            blk.__class__ = PMBlock
            blk.attn.__class__ = PMAttention
            blk.attn.init_pm()
            blk.backend = "auto"
        model.blocks.__class__ = PMBlocks
        model.blocks.grad_checkpointing = bool(getattr(model, "grad_checkpointing", False))
        model.__class__ = _pm_class(type(model))
        n = num_tokens(model)
        eye = torch.eye(n)
        _install(model, [(eye, eye, torch.ones(n, dtype=torch.bool))] * len(model.blocks))
    if structure is not None or scores is not None or grid_size is not None:
        _deprecated_install(model, structure, scores, grid_size)
    return model


def _deprecated_install(model, structure, scores, grid_size) -> None:
    if scores is None:
        raise ValueError("scores: needed with a structure, to weight the merge matrices (SPEC §2)")
    if structure is None:
        structure = search_structure(check_scores(model, scores))
    install_structure(model, structure, scores, grid_size)


def check_scores(model, scores) -> torch.Tensor:
    expected = (len(model.blocks), model.patch_embed.num_patches)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor of shape (L, num_patches) = {expected} for this model, got {got}")
    return scores


def install_structure(model, structure: Sequence[LayerStructure], scores: torch.Tensor,
                      grid_size: Optional[Sequence[int]] = None) -> None:
    """Install per-layer ``structure`` into a PM model: M from ``scores`` (SPEC §2), R = pinv(M), keep masks.

    ``grid_size`` (h, w) defaults to the patch grid of ``model.patch_embed``.
    """
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch_timm), got {type(model).__name__}")
    check_scores(model, scores)
    if len(structure) != len(model.blocks):
        raise ValueError(f"structure: expected {len(model.blocks)} per-layer structures (one per block), "
                         f"got {len(structure)}")
    _install(model, structure_matrices(structure, scores, grid_size, tuple(model.patch_embed.grid_size)))
