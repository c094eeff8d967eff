"""timm's SAM image encoder (``VisionTransformerSAM``: ``samvit_*``, ViTDet-style windowed + global blocks) as a
Prune-and-Merge model (docs/windowed_attention.md).

Each ``Block`` becomes a ``PMSamBlock`` (``WindowedPMBlockMixin``: SPEC §1 per window), each ``Attention`` a
``PMSamAttention`` (q, k, v, the relative-position tables and the projection where timm has them, attention
through ``pm_kernels.attention``). ``model.blocks`` stays timm's ``nn.Sequential`` of blocks on (B, H, W, C)
tokens, so timm's ``forward_features`` / ``forward_intermediates`` / gradient checkpointing run as they are; the
model's class gains the structure's grid check. The neck and head read the reconstructed grid unchanged.
Rotary SAM variants (``use_rope=True``) are refused.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock
from timm.models.vision_transformer_sam import VisionTransformerSAM, get_rel_pos

from ...windowed import WindowedAttentionMixin, WindowedPMBlockMixin, grid_attention
from ..base import check_grid_matches, structure_grid
from ..windowed import WindowedHostMixin, neck_macs, structure_window
from .model import OptimizedPM

__all__ = ["PMSamAttention", "PMSamBlock", "PMSamModelMixin", "OptimizedSAM", "patch_sam", "TimmSamHostMixin"]


class PMSamAttention(WindowedAttentionMixin, SamAttention):
    """timm SAM ``Attention`` whose core is ``pm_kernels.attention`` (its decomposed bias, the SPEC §3 score)."""

    def pm_qkv(self, x: torch.Tensor):
        B_, n, _ = x.shape
        q, k, v = self.qkv(x).view(B_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def pm_rel_pos(self, size_h: int, size_w: int):
        if not self.use_rel_pos:
            return None
        return get_rel_pos(size_h, size_h, self.rel_pos_h), get_rel_pos(size_w, size_w, self.rel_pos_w)

    def pm_project(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(out))

    def pm_scale(self) -> float:
        return self.scale

    def pm_dropout(self) -> float:
        return self.attn_drop.p if self.training else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B_, h, w, C) → (B_, h, w, C): timm's attention over every position (no score: the block scores)."""
        return grid_attention(self, x)


class PMSamBlock(WindowedPMBlockMixin, SamBlock):
    """timm SAM ``Block`` (windowed or global) as a PM layer on (B, H, W, C) tokens."""

    @property
    def pm_attention(self) -> PMSamAttention:
        return self.attn

    def pm_norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm1(x)

    def pm_attention_branch(self, a: torch.Tensor) -> torch.Tensor:
        return self.drop_path1(self.ls1(a))

    def pm_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pm_forward(x)


class PMSamModelMixin:
    """What a PM SAM model adds to timm's class: the image size checked against the structure's grid."""

    def structure_grid(self) -> Optional[Tuple[int, int]]:
        return structure_grid(list(self.blocks), 0, tuple(self.patch_embed.grid_size))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images → the (B, H, W, C) tokens the first block takes (timm's ``forward_features`` up to the blocks)."""
        x = self.patch_embed(images)
        check_grid_matches(self.structure_grid(), tuple(x.shape[1:3]), tuple(self.patch_embed.patch_size))
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.neck(x.permute(0, 3, 1, 2))


_PM_CLASSES = {}


def _pm_class(cls: type) -> type:
    if issubclass(cls, PMSamModelMixin):
        return cls
    if cls not in _PM_CLASSES:
        _PM_CLASSES[cls] = type(f"PM{cls.__name__}", (PMSamModelMixin, cls), {"__module__": cls.__module__})
    return _PM_CLASSES[cls]


def is_sam_patched(model: nn.Module) -> bool:
    return isinstance(model, PMSamModelMixin) and all(isinstance(b, PMSamBlock) for b in model.blocks)


def patch_sam(model: VisionTransformerSAM) -> VisionTransformerSAM:
    """Make a timm ``VisionTransformerSAM`` a Prune-and-Merge model in place, with the identity structure (the
    dense encoder), and return it."""
    if is_sam_patched(model):
        return model
    name = type(model).__name__
    if getattr(model, "rope_global", None) is not None or getattr(model, "rope_window", None) is not None:
        raise ValueError(f"model: {name} uses rotary position embedding (use_rope=True); Prune-and-Merge supports "
                         "SAM's decomposed relative position (use_rel_pos=True) or none")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not SamBlock or type(blk.attn) is not SamAttention:
            raise TypeError(f"model.blocks[{i}]: Prune-and-Merge supports timm SAM's Block with its Attention; got "
                            f"{type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}")
    window = structure_window([blk.window_size for blk in model.blocks], name)
    for blk in model.blocks:
        blk.__class__ = PMSamBlock
        blk.attn.__class__ = PMSamAttention
        blk.attn.init_pm()
        blk.init_pm(0, blk.window_size, window)
    model.__class__ = _pm_class(type(model))
    return model


class OptimizedSAM(OptimizedPM):
    """Inference-only timm PM SAM with folded boundaries (``pm_kernels.optimize``), sharing the PM model's weights:
    ``forward_features`` (the neck's output) and ``forward`` (the head's)."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.neck(self.chain(m.embed(images), m.blocks).permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.forward_features(images))


class TimmSamHostMixin(WindowedHostMixin):
    """The timm host's methods for ``VisionTransformerSAM`` (mixed before ``TimmHost``)."""

    def supports(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformerSAM)

    def patch(self, model: nn.Module) -> nn.Module:
        return patch_sam(model)

    def is_patched(self, model: nn.Module) -> bool:
        return is_sam_patched(model)

    def layer_body(self, layer: nn.Module):
        return None

    def window(self, layer: nn.Module) -> int:
        return layer.window_size

    def attention_macs_per_token(self, layer: nn.Module) -> int:
        return self.layer_macs_per_token(layer.attn)

    def uses_rel_pos(self, layer: nn.Module) -> bool:
        return bool(layer.attn.use_rel_pos)

    def any_size(self, model: nn.Module) -> bool:
        return True  # timm resamples SAM's position embedding and interpolates its relative-position tables

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        # the neck's output on the grid, as (B, N, channels) tokens
        return lambda images: model.forward_features(images).flatten(2).transpose(1, 2)

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        return OptimizedSAM(model, folded)

    def head_macs(self, model: nn.Module) -> int:
        h, w = self.grid(model)
        return neck_macs(model.neck, h * w) + self.layer_macs_per_token(model.head)
