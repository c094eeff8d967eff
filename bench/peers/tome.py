"""Token Merging (ToMe; Bolya et al., ICLR 2023) for timm ``VisionTransformer``, written from the paper.

In every block, between the attention and the MLP, ToMe merges ``r`` tokens:

1. similarity metric: the attention keys averaged over heads, ``k̄ ∈ R^{n × head_dim}``, cosine-normalised;
2. bipartite soft matching, split as in the official code (facebookresearch/ToMe, ``tome/merge.py``): all
   tokens, CLS included, alternate into sets A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); the CLS
   token (in A) is protected by a similarity of −inf, so it is never merged and stays at position 0; every
   A token finds its most similar B token; the ``r`` A tokens with the highest such similarity are merged
   into their B match;
3. merging is a size-weighted average, and each token carries its size ``s`` (how many patches it stands
   for), so later merges stay true averages;
4. proportional attention: ``softmax(q kᵀ / √d + log s)`` so a merged token counts as many keys.

``patch_tome(model, r)`` swaps the classes of the model, its blocks and their attention (no new
parameters: a ToMe model loads the dense checkpoint and fine-tunes like the dense one). ``r`` is an int
(constant schedule, as in the paper) or one value per block; ``model.r`` can be changed afterwards.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_plain_vit_blocks, per_block_r

__all__ = ["patch_tome", "bipartite_soft_matching", "merge_wavg", "tome_schedule", "ToMeBlock",
           "ToMeAttention"]


def tome_schedule(r: int, depth: int, mode: str = "constant") -> List[int]:
    """Per-block r: ``constant`` (r everywhere) or ``decreasing`` (2r linearly down to 0, same total)."""
    if mode == "constant":
        return [int(r)] * depth
    if mode == "decreasing":
        return [int(round(2 * r * (1 - i / max(depth - 1, 1)))) for i in range(depth)]
    raise ValueError(f"mode: expected 'constant' or 'decreasing', got {mode!r}")


class MatchingPlan(NamedTuple):
    """One ToMe step's choices: A = tokens 0, 2, 4, ..., B = 1, 3, 5, ...; ``src_idx`` the A tokens merged into
    the B tokens ``dst_idx``; ``unm_idx`` the kept A tokens in their original order (protected ones first);
    ``p_a`` / ``p_b`` the protected tokens in A and B."""
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    protect_first: int
    p_a: int
    p_b: int


def matching_plan(metric: torch.Tensor, r: int, protect_first: int = 1) -> Optional[MatchingPlan]:
    """The choices of one ToMe step on ``metric`` (B, n, c), or None when nothing is merged.

    The split follows the official ToMe: every token, the protected ones included, alternates into A
    (positions 0, 2, 4, ...) and B (1, 3, 5, ...). The first ``protect_first`` tokens (CLS; a distillation
    token at position 1; registers) are protected: a protected A token's similarities are −inf (it is never
    merged away), a protected B token's are −inf too (nothing merges into it), as the official code does for
    the class and distillation tokens. Each A token picks its most similar B token; the ``r`` best-matched A
    tokens are merged into their B partners.
    """
    p = protect_first
    n = metric.shape[1]
    r = min(r, (n - p) // 2)
    if r <= 0:
        return None
    p_a, p_b = (p + 1) // 2, p // 2                          # protected tokens in A (even) and B (odd)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)                     # (B, nA, nB) cosine similarity
        scores[:, :p_a, :] = -math.inf
        scores[:, :, :p_b] = -math.inf
        best_val, best_dst = scores.max(dim=-1)              # each A token's best B partner
        order = best_val.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]                               # A tokens merged away (never a protected one)
        unm_idx = order[:, r:].sort(dim=-1).values           # kept A tokens, original order: protected first
        dst_idx = best_dst.gather(1, src_idx)
    return MatchingPlan(unm_idx, src_idx, dst_idx, p, p_a, p_b)


def merge_by_plan(plan: MatchingPlan):
    """``merge(x, reduce)``: (B, n, C) → (B, n − r, C) as ``plan`` says. Output order: the protected tokens in
    their original order, the unmerged A tokens in their original order, then the other B tokens."""
    unm_idx, src_idx, dst_idx, p, p_a, p_b = plan

    def merge(x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        c = x.shape[-1]
        xa, xb = x[:, ::2], x[:, 1::2]
        unm = xa.gather(1, unm_idx[..., None].expand(-1, -1, c))
        src = xa.gather(1, src_idx[..., None].expand(-1, -1, c))
        xb = xb.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), src, reduce=reduce)
        # protected tokens back in front, in their original order (A, B, A, ...)
        prefix = [unm[:, i // 2:i // 2 + 1] if i % 2 == 0 else xb[:, i // 2:i // 2 + 1] for i in range(p)]
        return torch.cat(prefix + [unm[:, p_a:], xb[:, p_b:]], dim=1)

    return merge


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: int = 1):
    """Plan of one ToMe step on ``metric`` (B, n, c) (``matching_plan``): returns ``merge(x, reduce)`` mapping
    (B, n, C) to (B, n − r, C), or None when nothing is merged."""
    plan = matching_plan(metric, r, protect_first)
    return None if plan is None else merge_by_plan(plan)


def merge_wavg(merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B, n, C); ``size`` (B, n, 1) or None (all ones)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


class ToMeAttention(nn.Module):
    """timm ``Attention`` (class swapped in) that adds ``log size`` to the logits and returns the keys'
    head-mean as the matching metric. Not constructed directly: ``patch_tome`` swaps ``__class__``."""

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # proportional attention: + log(size) on every key column (none when all sizes are 1)
        bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x, k.mean(dim=1)


class ToMeBlock(nn.Module):
    """timm ``Block`` (class swapped in) that merges ``r`` tokens between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        info = self._tome_info
        attn_out, metric = self.attn(self.norm1(x), size=info["size"])
        x = x + self.drop_path1(self.ls1(attn_out))
        r = info["r"][self._tome_layer]
        merge = bipartite_soft_matching(metric, r, protect_first=info["num_prefix"]) if r > 0 else None
        if merge is not None:
            x, info["size"] = merge_wavg(merge, x, info["size"])
        info["tokens"].append(x.shape[1])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _make_tome_vit_class(base):
    class ToMeVisionTransformer(base):
        """The timm model with the ToMe state reset at each forward."""

        @property
        def r(self):
            return self._tome_info["r"]

        @r.setter
        def r(self, value):
            self._tome_info["r"] = per_block_r(value, len(self.blocks))

        def forward_features(self, x, attn_mask=None, is_causal: bool = False):
            if attn_mask is not None or is_causal:
                raise NotImplementedError("ToMe: attention masks are not supported")
            self._tome_info["size"] = None
            self._tome_info["tokens"] = []
            return super().forward_features(x)

        def forward_head(self, x, pre_logits: bool = False):
            if self.global_pool == "avg" and self._tome_info["size"] is not None:
                # a merged token stands for `size` patches: weight the average accordingly
                s = self._tome_info["size"][:, self.num_prefix_tokens:]
                feats = x[:, self.num_prefix_tokens:]
                x = (feats * s).sum(1) / s.sum(1)
                x = self.fc_norm(x)
                x = self.head_drop(x)
                return x if pre_logits else self.head(x)
            return super().forward_head(x, pre_logits)

    ToMeVisionTransformer.__name__ = "ToMe" + base.__name__
    return ToMeVisionTransformer


def patch_tome(model: nn.Module, r: Union[int, Sequence[int]] = 0) -> nn.Module:
    """Turn a timm ``VisionTransformer`` into a ToMe model, in place; returns it.

    r: tokens merged per block (int) or a per-block list. After a forward, ``model._tome_info["tokens"]``
    holds the token count after each block's merge.
    """
    return install_tome(model, r, "patch_tome", _make_tome_vit_class, ToMeBlock)


def install_tome(model: nn.Module, r, caller: str, make_class, block_class, **state) -> nn.Module:
    """The class swaps of a ToMe variant: ``make_class(model class)`` for the model, ``block_class`` for every
    block, ``ToMeAttention``; one shared state dict (``r`` per block, ``size``, ``tokens``, ``num_prefix`` and
    ``state``). A model already patched only gets the new ``r``."""
    if getattr(model, "_tome_info", None) is not None:
        model.r = r
        return model
    check_plain_vit_blocks(model, caller)
    info = {"r": per_block_r(r, len(model.blocks)), "size": None, "tokens": [],
            "num_prefix": getattr(model, "num_prefix_tokens", 1), **state}
    model.__class__ = make_class(model.__class__)
    model._tome_info = info
    for i, blk in enumerate(model.blocks):
        blk.__class__ = block_class
        blk.attn.__class__ = ToMeAttention
        blk._tome_info = info
        blk._tome_layer = i
    return model
    check_plain_vit_blocks(model, "patch_tome")
    info = {"r": per_block_r(r, len(model.blocks)), "size": None, "tokens": [],
            "num_prefix": getattr(model, "num_prefix_tokens", 1)}
    model.__class__ = _make_tome_vit_class(model.__class__)
    model._tome_info = info
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ToMeBlock
        blk.attn.__class__ = ToMeAttention
        blk._tome_info = info
        blk._tome_layer = i
    return model
