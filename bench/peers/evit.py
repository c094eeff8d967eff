"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need") for timm ``VisionTransformer``,
written from the paper.

At each reduction layer (default blocks 3, 6, 9 of a 12-block DeiT, 0-based, i.e. the 4th, 7th and 10th),
between the attention and the MLP:

1. attentiveness of each patch token = the CLS token's attention to it, averaged over heads;
2. keep the ``k = ceil(keep_rate · (n − 1))`` most attentive patch tokens;
3. fuse the inattentive ones into one token, ``x_fused = Σ_j a_j x_j`` with ``a_j`` their CLS attention
   (``fuse_normalize=True`` divides by ``Σ_j a_j`` instead: a true weighted average);
4. the MLP and every later block run on ``[CLS, kept..., fused]``.

The CLS attention row is computed on its own (``q_cls Kᵀ``, ``1 × n`` per head) so the full attention stays
on the fused SDPA kernel. ``patch_evit(model, keep_rate, locations)`` swaps the classes (no new parameters:
loads the dense checkpoint, fine-tunes like the dense model). Kept tokens stay in raster order.
"""
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_plain_vit_blocks

__all__ = ["patch_evit", "default_locations", "EViTBlock", "EViTAttention"]


def default_locations(depth: int) -> List[int]:
    """Blocks 3, 6, 9 for depth 12 (the paper's); scaled as ``round(depth·{1,2,3}/4)`` otherwise."""
    if depth == 12:
        return [3, 6, 9]
    return sorted({max(1, min(depth - 1, round(depth * j / 4))) for j in (1, 2, 3)})


class EViTAttention(nn.Module):
    """timm ``Attention`` (class swapped in) that can also return the CLS attention row (B, n), head mean."""

    def forward(self, x: torch.Tensor, want_cls_attn: bool = False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        cls_attn = None
        if want_cls_attn:
            logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)        # (B, H, 1, N)
            cls_attn = logits.float().softmax(dim=-1)[:, :, 0].mean(dim=1)   # (B, N)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x, cls_attn


class EViTBlock(nn.Module):
    """timm ``Block`` (class swapped in); reduces tokens between attention and MLP when ``keep_rate < 1``."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        keep = self._evit_keep_rate
        reduce = keep is not None and keep < 1.0
        attn_out, cls_attn = self.attn(self.norm1(x), want_cls_attn=reduce)
        x = x + self.drop_path1(self.ls1(attn_out))
        if reduce:
            x = self._reorganise(x, cls_attn, keep)
        self._evit_info["tokens"].append(x.shape[1])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def _reorganise(self, x: torch.Tensor, cls_attn: torch.Tensor, keep: float) -> torch.Tensor:
        p = self._evit_info["num_prefix"]
        B, N, C = x.shape
        n_patch = N - p
        k = min(n_patch, max(1, math.ceil(keep * n_patch - 1e-9)))
        if k >= n_patch:
            return x
        a = cls_attn[:, p:]                                      # (B, n_patch)
        order = a.argsort(dim=-1, descending=True)
        keep_idx = order[:, :k].sort(dim=-1).values             # raster order
        drop_idx = order[:, k:]
        patches = x[:, p:]
        kept = patches.gather(1, keep_idx[..., None].expand(-1, -1, C))
        parts = [x[:, :p], kept]
        if self._evit_info["fuse"]:
            dropped = patches.gather(1, drop_idx[..., None].expand(-1, -1, C))
            w = a.gather(1, drop_idx).to(x.dtype)[..., None]   # (B, N−k, 1)
            fused = (dropped * w).sum(dim=1, keepdim=True)
            if self._evit_info["fuse_normalize"]:
                fused = fused / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            parts.append(fused)
        return torch.cat(parts, dim=1)


def _make_evit_vit_class(base):
    class EViTVisionTransformer(base):
        def forward_features(self, x, attn_mask=None, is_causal: bool = False):
            if attn_mask is not None or is_causal:
                raise NotImplementedError("EViT: attention masks are not supported")
            self._evit_info["tokens"] = []
            return super().forward_features(x)

        def set_keep_rate(self, keep_rate, locations: Optional[Sequence[int]] = None):
            locations = self._evit_info["locations"] if locations is None else list(locations)
            _apply_keep(self, keep_rate, locations)

    EViTVisionTransformer.__name__ = "EViT" + base.__name__
    return EViTVisionTransformer


def _apply_keep(model, keep_rate, locations):
    depth = len(model.blocks)
    if any(not 0 <= l < depth for l in locations):
        raise ValueError(f"locations: expected block indices in [0, {depth}), got {list(locations)}")
    if isinstance(keep_rate, (int, float)):
        keeps = [float(keep_rate)] * len(locations)
    else:
        keeps = [float(k) for k in keep_rate]
        if len(keeps) != len(locations):
            raise ValueError(f"keep_rate: expected a float or {len(locations)} values, got {len(keeps)}")
    if any(not 0 < k <= 1 for k in keeps):
        raise ValueError(f"keep_rate: values must be in (0, 1], got {keeps}")
    per_block = dict(zip(locations, keeps))
    for i, blk in enumerate(model.blocks):
        blk._evit_keep_rate = per_block.get(i)
    model._evit_info["locations"] = list(locations)
    model._evit_info["keep_rate"] = keeps


def patch_evit(model: nn.Module, keep_rate: Union[float, Sequence[float]] = 0.7,
               locations: Optional[Sequence[int]] = None, fuse: bool = True,
               fuse_normalize: bool = False) -> nn.Module:
    """Turn a timm ``VisionTransformer`` into an EViT model, in place; returns it.

    keep_rate: fraction of patch tokens kept at each reduction layer (one value or one per location).
    locations: 0-based block indices (default ``default_locations(depth)``: 3, 6, 9 for depth 12).
    After a forward, ``model._evit_info["tokens"]`` holds the token count after each block's reduction.
    """
    locations = default_locations(len(model.blocks)) if locations is None else list(locations)
    if getattr(model, "_evit_info", None) is None:
        check_plain_vit_blocks(model, "patch_evit")
        info = {"tokens": [], "num_prefix": getattr(model, "num_prefix_tokens", 1)}
        model.__class__ = _make_evit_vit_class(model.__class__)
        model._evit_info = info
        for blk in model.blocks:
            blk.__class__ = EViTBlock
            blk.attn.__class__ = EViTAttention
            blk._evit_info = info
    model._evit_info["fuse"] = fuse
    model._evit_info["fuse_normalize"] = fuse_normalize
    _apply_keep(model, keep_rate, locations)
    return model
