"""Analytic FLOPs of a timm VisionTransformer for given per-layer token counts.

Convention
----------
``GFLOPs`` here follow the ViT token-compression literature (DeiT, ToMe, EViT, PM and fvcore): **one
multiply-accumulate (MAC) counts as one FLOP**. That is what gives the familiar 1.3 / 4.6 / 17.6 GFLOPs for
DeiT-T/S/B at 224 (SPEC §6). Pass ``mac_factor=2`` everywhere for arithmetic FLOPs (1 MAC = 2 FLOPs).

Counted: the matrix products, i.e. patch embedding (conv as matmul), per block qkv, attention ``Q Kᵀ`` and
``A V``, the output projection, the two MLP layers, and the classifier head (one token). Not counted:
layer norms, softmax, GELU, bias and residual adds (together < 1 % for DeiT).

Per block, the token count may differ between the attention half and the MLP half (ToMe and EViT reduce
tokens between the two), so a layer's count is either an ``int`` or a pair ``(n_attn, n_mlp)``.

Method-specific extras (``include_overheads=True``, on by default because fvcore would count them too):
- ToMe: the bipartite similarity ``(⌈n/2⌉ × ⌊n/2⌋ × head_dim)`` per merging block.
- EViT: the weighted fusion of the inattentive tokens, ``(n_dropped × C)`` per reduction layer.
PM's own count is the library's (``pm_kernels.measure.macs``: the same convention, the merge ``K × N × C`` and
reconstruct ``N × K × C`` products of a compressed block included), so that a peer is matched to exactly the MACs
the PM model is reported with.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ._common import per_block_r

__all__ = [
    "VitDims", "dims_from_model", "dims_from_config", "vit_flops", "dense_flops", "tome_token_counts",
    "tome_flops", "evit_token_counts", "evit_flops", "tome_schedule_from_total", "match_tome_r",
    "match_evit_keep_rate",
]

LayerCount = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class VitDims:
    """The sizes that the FLOPs depend on."""
    num_patches: int      # P, patch tokens (grid h × w)
    num_prefix: int       # class (+ register) tokens, so N = P + num_prefix
    embed_dim: int        # C
    attn_dim: int         # heads × head_dim (= C for DeiT)
    num_heads: int
    mlp_hidden: int       # MLP hidden width (4C for DeiT)
    depth: int
    patch_in: int         # in_chans × patch_h × patch_w (the patch-embed conv as a matmul)
    num_classes: int      # 0 for no head

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads


def dims_from_model(model: nn.Module) -> VitDims:
    """Read the sizes from a timm ``VisionTransformer`` (works for patched ToMe / EViT / PM models too)."""
    blk = model.blocks[0]
    attn = blk.attn
    proj = model.patch_embed.proj
    patch_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    head = getattr(model, "head", None)
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    return VitDims(
        num_patches=model.patch_embed.num_patches,
        num_prefix=getattr(model, "num_prefix_tokens", 1),
        embed_dim=model.embed_dim,
        attn_dim=attn.qkv.out_features // 3,
        num_heads=attn.num_heads,
        mlp_hidden=blk.mlp.fc1.out_features,
        depth=len(model.blocks),
        patch_in=patch_in,
        num_classes=num_classes,
    )


def dims_from_config(img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                     num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 1000, in_chans: int = 3,
                     num_prefix: int = 1) -> VitDims:
    """The sizes of a plain ViT config (no model needed)."""
    g = img_size // patch_size
    return VitDims(num_patches=g * g, num_prefix=num_prefix, embed_dim=embed_dim, attn_dim=embed_dim,
                   num_heads=num_heads, mlp_hidden=int(embed_dim * mlp_ratio), depth=depth,
                   patch_in=in_chans * patch_size * patch_size, num_classes=num_classes)


def _dims(model_or_dims) -> VitDims:
    return model_or_dims if isinstance(model_or_dims, VitDims) else dims_from_model(model_or_dims)


def _pair(n: LayerCount) -> Tuple[int, int]:
    return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))


def block_macs(d: VitDims, n_attn: int, n_mlp: int) -> int:
    """MACs of one pre-norm block: attention on ``n_attn`` tokens, MLP on ``n_mlp`` tokens."""
    C, A, Hd = d.embed_dim, d.attn_dim, d.mlp_hidden
    qkv = n_attn * C * 3 * A
    qk = n_attn * n_attn * A          # Q Kᵀ, summed over heads: H × n × n × head_dim
    av = n_attn * n_attn * A          # A V
    proj = n_attn * A * C
    mlp = 2 * n_mlp * C * Hd
    return qkv + qk + av + proj + mlp


def vit_flops(model_or_dims, tokens: Optional[Sequence[LayerCount]] = None, *, extra_macs: int = 0,
              mac_factor: int = 1) -> float:
    """GFLOPs of one image through the ViT, with ``tokens[l]`` tokens in block ``l``.

    tokens: per block, an int (same count in attention and MLP) or ``(n_attn, n_mlp)``; default: all N.
    extra_macs: method overheads to add (see the module docstring).
    mac_factor: 1 = literature convention (1 MAC = 1 FLOP), 2 = arithmetic FLOPs.
    """
    d = _dims(model_or_dims)
    if tokens is None:
        tokens = [d.num_tokens] * d.depth
    if len(tokens) != d.depth:
        raise ValueError(f"tokens: expected {d.depth} per-layer counts, got {len(tokens)}")
    macs = d.num_patches * d.patch_in * d.embed_dim            # patch embedding
    macs += sum(block_macs(d, *_pair(n)) for n in tokens)
    macs += d.embed_dim * d.num_classes                        # head on the CLS token
    macs += extra_macs
    return mac_factor * macs / 1e9


def dense_flops(model_or_dims, mac_factor: int = 1) -> float:
    return vit_flops(model_or_dims, None, mac_factor=mac_factor)


# --------------------------------------------------------------------------------------------------- ToMe

def tome_token_counts(num_tokens: int, depth: int, r, num_protected: int = 1) -> List[Tuple[int, int]]:
    """Per block ``(n_attn, n_mlp)`` under ToMe merging ``r`` (int or per-layer list) tokens per block.

    A block can merge at most ``(n - num_protected) // 2`` tokens (set A's unprotected tokens), exactly what
    ``bench.peers.tome`` does at run time.
    """
    out, n = [], num_tokens
    for rl in per_block_r(r, depth):
        rl = max(0, min(rl, (n - num_protected) // 2))
        out.append((n, n - rl))
        n -= rl
    return out


def _tome_overhead(d: VitDims, counts) -> int:
    return sum(math.ceil(na / 2) * (na // 2) * d.head_dim for na, nm in counts if nm < na)


def tome_flops(model_or_dims, r, mac_factor: int = 1, include_overheads: bool = True) -> float:
    d = _dims(model_or_dims)
    counts = tome_token_counts(d.num_tokens, d.depth, r, num_protected=d.num_prefix)
    extra = _tome_overhead(d, counts) if include_overheads else 0
    return vit_flops(d, counts, extra_macs=extra, mac_factor=mac_factor)


def tome_schedule_from_total(total: int, depth: int) -> List[int]:
    """Spread ``total`` merges over ``depth`` blocks as evenly as possible, extras to the earliest blocks."""
    base, extra = divmod(int(total), depth)
    return [base + (1 if i < extra else 0) for i in range(depth)]


def match_tome_r(model_or_dims, target_gflops: float, *, constant: bool = False, mac_factor: int = 1,
                 include_overheads: bool = True) -> Tuple[Union[int, List[int]], float]:
    """ToMe schedule whose GFLOPs are closest to ``target_gflops``; returns ``(r, gflops)``.

    constant=True: the paper's constant ``r`` (an int; coarse steps). Otherwise a per-layer list with
    ``⌊T/L⌋`` or ``⌈T/L⌉`` merges per block (total T, the extra ones in the earliest blocks), which lands
    much closer to the target.
    """
    d = _dims(model_or_dims)
    f = lambda r: tome_flops(d, r, mac_factor=mac_factor, include_overheads=include_overheads)  # noqa: E731
    if constant:
        cands = [(abs(f(r) - target_gflops), r) for r in range(0, d.num_tokens // 2 + 1)]
        r = min(cands)[1]
        return r, f(r)
    best = None
    for total in range(0, d.depth * (d.num_tokens // 2) + 1):
        sched = tome_schedule_from_total(total, d.depth)
        g = f(sched)
        if best is None or abs(g - target_gflops) < best[0]:
            best = (abs(g - target_gflops), sched, g)
        if g < target_gflops:          # monotone in the total: past the target, stop
            break
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------- EViT
def _keep_list(keep_rate, locations) -> List[float]:
    if isinstance(keep_rate, (int, float)):
        return [float(keep_rate)] * len(locations)
    keep_rate = [float(k) for k in keep_rate]
    if len(keep_rate) != len(locations):
        raise ValueError(f"keep_rate: expected a float or {len(locations)} values, got {len(keep_rate)}")
    return keep_rate


def evit_kept(n_patches: int, keep_rate: float) -> int:
    """Patch tokens EViT keeps out of ``n_patches`` (same rounding as ``bench.peers.evit``)."""
    return min(n_patches, max(1, math.ceil(keep_rate * n_patches - 1e-9)))


def evit_token_counts(num_tokens: int, depth: int, keep_rate, locations: Sequence[int], fuse: bool = True,
                      num_prefix: int = 1) -> List[Tuple[int, int]]:
    """Per block ``(n_attn, n_mlp)`` for EViT: at each location, keep ``ceil(keep·(n−prefix))`` patch tokens
    (plus one fused token when ``fuse`` and something was dropped)."""
    keeps = dict(zip(locations, _keep_list(keep_rate, locations)))
    out, n = [], num_tokens
    for layer in range(depth):
        n_in = n
        if layer in keeps and keeps[layer] < 1.0:
            p = n - num_prefix
            k = evit_kept(p, keeps[layer])
            n = num_prefix + k + (1 if fuse and k < p else 0)
        out.append((n_in, n))
    return out


def evit_flops(model_or_dims, keep_rate, locations: Sequence[int], fuse: bool = True, mac_factor: int = 1,
               include_overheads: bool = True) -> float:
    d = _dims(model_or_dims)
    counts = evit_token_counts(d.num_tokens, d.depth, keep_rate, locations, fuse, num_prefix=d.num_prefix)
    extra = 0
    if include_overheads:   # CLS-attention fusion: (dropped tokens) × C
        extra = sum(max(0, na - nm) * d.embed_dim for na, nm in counts if nm < na)
    return vit_flops(d, counts, extra_macs=extra, mac_factor=mac_factor)


def match_evit_keep_rate(model_or_dims, target_gflops: float, locations: Sequence[int], fuse: bool = True,
                         mac_factor: int = 1, include_overheads: bool = True) -> Tuple[float, float]:
    """One keep rate (same at every location) whose GFLOPs are closest to the target: ``(keep, gflops)``.

    FLOPs are a step function of the keep rate (one step per kept token at the first location), so this
    scans every distinct kept count at the first location.
    """
    d = _dims(model_or_dims)
    p0 = d.num_patches
    best = None
    for k in range(1, p0 + 1):
        keep = k / p0
        g = evit_flops(d, keep, locations, fuse, mac_factor, include_overheads)
        if best is None or abs(g - target_gflops) < best[0]:
            best = (abs(g - target_gflops), keep, g)
    return best[1], best[2]
