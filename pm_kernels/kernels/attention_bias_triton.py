"""The additive logit bias inside the attention kernels of ``attention_triton.py``: the jit helpers their
``HAS_BIAS`` / ``HAS_REL_POS`` / ``STORE_D_BIAS`` / ``REL_POS_GRAD`` constexpr branches call, and the launchers'
arguments for them. Without a bias every branch compiles away: the kernels are the plain ones.

Two kinds, added to the logits S = q kᵀ · scale + bias (both may be given):

- a general bias (B|1, H|1, N, N), read tile by tile through its strides (a broadcast dim has stride 0). Its
  gradient is dS itself: the dQ kernel stores each fp32 dS tile into a (B, H, N, N) buffer and the caller sums
  it over the broadcast dims (the gradient of an N×N input is N×N whatever the kernel does).
- the decomposed relative-position bias bias_h[b,h,i,key_h[j]] + bias_w[b,h,i,key_w[j]]: for each tile the
  entries are gathered from the query rows' tables (BLOCK_M × G values per table, cache-resident), so no N×N
  tensor exists. Its gradient d bias_h[i, g] = Σ_j dS[i, j] · [key_h[j] = g] is the product dS · onehot(key_h):
  the dQ kernel (one program per query block, looping over every key block) accumulates it with tl.dot on
  tensor cores into a [BLOCK_M, G_PAD] fp32 register tile (G padded to a power of 2 ≥ 16, tl.dot's minimum) and
  stores it once: no atomics, deterministic. A key index outside [0, G), which the public op refuses, reads
  nothing out of bounds: its logit is NaN (for every query), so its rows come out NaN, not silently wrong.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# jit helpers (called from the kernels of attention_triton.py), then the launchers' argument builder.
__all__ = ["bias_pointers", "bias_tile", "one_hot", "store_table", "BiasArgs", "bias_args"]


@triton.jit
def bias_pointers(BIAS, BH, BW, KEY_H, KEY_W, off_b, off_h, H, N, GH, GW, stride_bias_b, stride_bias_h,
                  stride_key_b):
    """The bias pointers moved to one (b, h): the general bias through its strides, the contiguous (B, H, N, G)
    tables, the key indices through their batch stride (0 when shared by the batch). off_b, off_h: int64."""
    bh = off_b * H + off_h
    return (BIAS + off_b * stride_bias_b + off_h * stride_bias_h, BH + bh * N * GH, BW + bh * N * GW,
            KEY_H + off_b * stride_key_b, KEY_W + off_b * stride_key_b)


@triton.jit
def _key_index(KEY, keys, mask_keys, G):
    """The position indices of a block of keys (0 for padding keys) and whether each lies in [0, G)."""
    index = tl.load(KEY + keys, mask=mask_keys, other=0)
    ok = (index >= 0) & (index < G)
    return tl.where(ok, index, 0).to(tl.int32), ok  # int32 offsets: half the registers of int64 ones


@triton.jit
def _table_tile(TABLE, G, queries, index, ok, mask):
    """TABLE[query, index] over a 2-D tile: ``queries`` and ``index`` / ``ok`` broadcast to it (as [:, None] and
    [None, :], or the transpose). fp32; NaN where ``ok`` is off; 0 in padding lanes."""
    t = tl.load(TABLE + queries * G + index, mask=mask & ok, other=0.0).to(tl.float32)
    return tl.where(ok, t, float("nan"))


@triton.jit
def bias_tile(BIAS, BH, BW, KEY_H, KEY_W, queries, keys, mask_q, mask_k,
              stride_bias_q, stride_bias_k, GH, GW,
              HAS_BIAS: tl.constexpr, HAS_REL_POS: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """The bias of a logit tile, fp32, in log2 units (the kernels' exp2 softmax): [queries, keys], or [keys, queries]
    when KEYS_FIRST (the dK/dV kernel's transposed tiles). 0 in padding lanes. BIAS / BH / BW point at this
    (b, h), KEY_H / KEY_W at this b."""
    if KEYS_FIRST:
        q2, k2 = queries[None, :], keys[:, None]
        mask = mask_k[:, None] & mask_q[None, :]
    else:
        q2, k2 = queries[:, None], keys[None, :]
        mask = mask_q[:, None] & mask_k[None, :]
    if HAS_BIAS:
        bias = tl.load(BIAS + q2 * stride_bias_q + k2 * stride_bias_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_REL_POS:
        index_h, ok_h = _key_index(KEY_H, keys, mask_k, GH)
        index_w, ok_w = _key_index(KEY_W, keys, mask_k, GW)
        if KEYS_FIRST:
            index_h, ok_h, index_w, ok_w = index_h[:, None], ok_h[:, None], index_w[:, None], ok_w[:, None]
        else:
            index_h, ok_h, index_w, ok_w = index_h[None, :], ok_h[None, :], index_w[None, :], ok_w[None, :]
        rel_pos = _table_tile(BH, GH, q2, index_h, ok_h, mask) + _table_tile(BW, GW, q2, index_w, ok_w, mask)
        if HAS_BIAS:
            bias += rel_pos
        else:
            bias = rel_pos
    return bias * 1.4426950408889634  # log2(e): the kernels' logits are in log2 units


@triton.jit
def one_hot(KEY, keys, mask_keys, G_PAD: tl.constexpr):
    """[keys, G_PAD] fp32 one-hot matrix of a key block's position indices (all-zero rows for padding keys)."""
    index = tl.load(KEY + keys, mask=mask_keys, other=-1)
    return (index[:, None] == tl.arange(0, G_PAD)[None, :]).to(tl.float32)


@triton.jit
def store_table(TABLE, G, rows, mask_rows, acc, G_PAD: tl.constexpr):
    """Store the fp32 [rows, G_PAD] accumulator into the first G columns of a contiguous (·, G) fp32 table."""
    cols = tl.arange(0, G_PAD)
    tl.store(TABLE + rows[:, None] * G + cols[None, :], acc, mask=mask_rows[:, None] & (cols[None, :] < G))


# ------------------------------------------------------------------------------------------ launchers

class BiasArgs(NamedTuple):
    """What the kernels take for the bias, in their argument order: pointers (BIAS, BH, BW, KEY_H, KEY_W), strides
    (stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k, stride_key_b), sizes (GH, GW) and constexprs.
    Absent inputs are replaced by ``q`` and zeros: their branches are compiled out."""
    pointers: tuple
    strides: tuple
    sizes: tuple
    flags: dict  # HAS_BIAS, HAS_REL_POS
    pads: dict   # GH_PAD, GW_PAD (the dQ kernel's gradient tiles)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def bias_args(q: torch.Tensor, bias: Optional[torch.Tensor], bias_h: Optional[torch.Tensor],
              bias_w: Optional[torch.Tensor], key_h: Optional[torch.Tensor],
              key_w: Optional[torch.Tensor]) -> BiasArgs:
    """Kernel arguments for the bias inputs of ``pm_kernels.attention`` (already checked). The tables and the key
    indices are made contiguous (a copy only if they are not: (B, H, N, G) and (N,) / (B, N) are small); the
    general bias is read in place through its strides."""
    B, H, N, _ = q.shape
    pointers, strides, sizes = [q, q, q, q, q], [0, 0, 0, 0, 0], [1, 1]
    if bias is not None:
        pointers[0] = bias
        strides[:4] = bias.expand(B, H, N, N).stride()
    if bias_h is not None:
        pointers[1:] = bias_h.contiguous(), bias_w.contiguous(), key_h.contiguous(), key_w.contiguous()
        strides[4] = 0 if key_h.dim() == 1 else N
        sizes = [bias_h.shape[3], bias_w.shape[3]]
    return BiasArgs(tuple(pointers), tuple(strides), tuple(sizes),
                    {"HAS_BIAS": bias is not None, "HAS_REL_POS": bias_h is not None},
                    {"GH_PAD": _pow2(sizes[0]), "GW_PAD": _pow2(sizes[1])})
