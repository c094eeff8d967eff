"""FlashAttention-2 style Triton attention whose backward can emit the gradient-weighted token score.

Forward: online softmax over key blocks, never materialising the N×N matrix; saves the row log-sum-exp
(LSE, fp32, natural log) next to the output.

Backward (three launches, all deterministic, no atomics):

1. ``_attn_bwd_preprocess``: Δ = rowsum(dO ⊙ O) (fp32).
2. ``_attn_bwd_dkdv_kernel``: key-block-major; each program owns one key block of one (b, h), loops over
   every query block, recomputes P from the LSE and accumulates dK, dV and, with ``HAS_SCORE``, the per-key
   Σ_q P[q,k]·dP[q,k] (dP = dO Vᵀ, *not* dS) in registers. It stores one partial per (b·h, key); the
   partials are summed over b·h by torch and added into ``score``.
3. ``_attn_bwd_dq_kernel``: query-block-major; dQ = Σ_k dS K · scale.

With a logit bias (a general one and / or SAM's decomposed relative-position bias) the forward, dK/dV and dQ
kernels recompute it per tile under a constexpr branch, and the dQ kernel also forms its gradients
(``attention_bias_triton.py``). Without one the branches compile away (the same SASS as before the bias).

q, k, v, dO are read through their strides (so timm's ``qkv.reshape(B,N,3,H,D).permute(2,0,3,1,4)``
views need no copy); O, dQ, dK, dV are allocated contiguous (B, H, N, D). Head dims 32, 64, 128; fp32,
fp16, bf16. fp32 dots use TF32 only where ``torch.backends.cuda.matmul.allow_tf32`` is set.

Under ``TRITON_INTERPRET=1`` (the CPU test mode) the kernels run one fixed config and upcast every dot
operand to fp32 (the interpreter's half-precision ``tl.dot`` is wrong); on a GPU they are autotuned.
"""
import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting
from .attention_bias_triton import bias_args, bias_pointers, bias_tile, one_hot, store_table

__all__ = ["attention_fwd", "attention_bwd"]


_INTERPRET = interpreting()
_LOG2E = 1.4426950408889634
# Fixed block sizes used under the interpreter (small: the interpreter is slow, and several key/query
# blocks per test shape exercise the masking and the online softmax). Past 1024 tokens (segmentation),
# one of the GPU autotuner's shapes, 128 × 64: 8x fewer interpreted steps than 32 × 32 (measured faster than
# 64 × 64 and than 128 × 128 under the interpreter).
_INTERPRET_BLOCK = 32
_INTERPRET_LARGE = {"BLOCK_M": 128, "BLOCK_N": 64}


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Allocation point of every kernel output (tests replace it with a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------- kernels

@triton.jit
def _rne_bf16(x):
    """fp32 -> nearest bf16 value (still fp32). The interpreter's bf16 store truncates; the GPU rounds."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _load_rows(ptr, rows, mask, stride_n, stride_d, offs_d, UPCAST: tl.constexpr):
    """The [rows, HEAD_DIM] tile of one (b, h) slice, 0 where ``mask`` is off; fp32 when UPCAST."""
    t = tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask[:, None], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store_rows(ptr, rows, mask, stride_n, stride_d, offs_d, acc, UPCAST: tl.constexpr):
    """Store an fp32 [rows, HEAD_DIM] accumulator in the output's dtype (rounded to nearest, as on the GPU)."""
    if UPCAST:
        if ptr.dtype.element_ty == tl.bfloat16:
            acc = _rne_bf16(acc)
    tl.store(ptr + rows[:, None] * stride_n + offs_d[None, :] * stride_d, acc.to(ptr.dtype.element_ty),
             mask=mask[:, None])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, BIAS, BH, BW, KEY_H, KEY_W,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k, stride_key_b,
    H, N, GH, GW, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REL_POS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh
    LSE += pid_bh.to(tl.int64) * N
    if HAS_BIAS or HAS_REL_POS:
        BIAS, BH, BW, KEY_H, KEY_W = bias_pointers(BIAS, BH, BW, KEY_H, KEY_W, off_b, off_h, H, N, GH, GW,
                                                   stride_bias_b, stride_bias_h, stride_key_b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q = _load_rows(Q, offs_m, mask_m, stride_qn, stride_qd, offs_d, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        k = _load_rows(K, cols, mask_n, stride_kn, stride_kd, offs_d, UPCAST)
        v = _load_rows(V, cols, mask_n, stride_vn, stride_vd, offs_d, UPCAST)
        # Logits in log2 units; out-of-range keys get -inf.
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        if HAS_BIAS or HAS_REL_POS:
            s += bias_tile(BIAS, BH, BW, KEY_H, KEY_W, offs_m, cols, mask_m, mask_n, stride_bias_q, stride_bias_k,
                           GH, GW, HAS_BIAS, HAS_REL_POS, False)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # l_i and acc are sums of exp2(s - c), c = the running max m, or 0 while m is ±inf (torch.logsumexp's
        # guard). Unguarded, a row whose first key block is all -inf gets exp2(-inf - -inf) = NaN, and a +inf
        # logit a NaN LSE instead of +inf (and the backward, which rebuilds P from it, NaN for every key).
        c_new = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)  # NaN stays NaN
        alpha = tl.exp2(m_i - c_new)  # m_i unguarded: 0 while every key so far was -inf (l_i, acc are 0)
        p = tl.exp2(s - c_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]  # a row of all -inf logits: 0 / 0 = NaN, as in the reference
    # Natural-log LSE of the scaled logits; -inf for a row of all -inf logits (l_i = 0), +inf with a +inf
    # logit (l_i = inf): m_i + log2(l_i) needs no guard.
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634
    _store_rows(O, offs_m, mask_m, stride_on, stride_od, offs_d, acc, UPCAST)
    tl.store(LSE + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    O += off_b * stride_ob + off_h * stride_oh
    DO += off_b * stride_dob + off_h * stride_doh
    Delta += pid_bh.to(tl.int64) * N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N
    o = _load_rows(O, offs_m, mask_m, stride_on, stride_od, offs_d, True)
    do = _load_rows(DO, offs_m, mask_m, stride_don, stride_dod, offs_d, True)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, SP, BIAS, BH, BW, KEY_H, KEY_W,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k, stride_key_b,
    H, N, GH, GW, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REL_POS: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DK += off_b * stride_dkb + off_h * stride_dkh
    DV += off_b * stride_dvb + off_h * stride_dvh
    LSE += pid_bh.to(tl.int64) * N
    Delta += pid_bh.to(tl.int64) * N
    if HAS_BIAS or HAS_REL_POS:
        BIAS, BH, BW, KEY_H, KEY_W = bias_pointers(BIAS, BH, BW, KEY_H, KEY_W, off_b, off_h, H, N, GH, GW,
                                                   stride_bias_b, stride_bias_h, stride_key_b)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < N

    k = _load_rows(K, offs_n, mask_n, stride_kn, stride_kd, offs_d, UPCAST)
    v = _load_rows(V, offs_n, mask_n, stride_vn, stride_vd, offs_d, UPCAST)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    sc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m0
        mask_m = rows < N
        q = _load_rows(Q, rows, mask_m, stride_qn, stride_qd, offs_d, UPCAST)
        do = _load_rows(DO, rows, mask_m, stride_don, stride_dod, offs_d, UPCAST)
        lse2 = tl.load(LSE + rows, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + rows, mask=mask_m, other=0.0)

        # Transposed tiles: [BLOCK_N (keys), BLOCK_M (queries)].
        qkT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        sT = qkT * qk_scale
        if HAS_BIAS or HAS_REL_POS:
            sT += bias_tile(BIAS, BH, BW, KEY_H, KEY_W, rows, offs_n, mask_m, mask_n, stride_bias_q, stride_bias_k,
                            GH, GW, HAS_BIAS, HAS_REL_POS, True)
        pT = tl.exp2(sT - lse2[None, :])
        pT = tl.where(mask_n[:, None] & mask_m[None, :], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)   # dPᵀ = V dOᵀ
        if HAS_SCORE:
            # Padding queries add 0 to the score, not 0 · NaN (their dO rows are 0, and v · 0 = NaN where v is
            # not finite): that key's score is ±inf where the reference's is. (Its dK needs no mask: it is NaN
            # in the reference too.)
            dpT = tl.where(mask_m[None, :], dpT, 0.0)
            sc += tl.sum(pT * dpT, 1)                                      # Σ_q P ⊙ dP, per key
        dsT = pT * (dpT - delta[None, :])                                  # dSᵀ = Pᵀ ⊙ (dPᵀ − Δ)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=INPUT_PRECISION)

    _store_rows(DK, offs_n, mask_n, stride_dkn, stride_dkd, offs_d, dk * sm_scale, UPCAST)
    _store_rows(DV, offs_n, mask_n, stride_dvn, stride_dvd, offs_d, dv, UPCAST)
    if HAS_SCORE:
        tl.store(SP + pid_bh.to(tl.int64) * N + offs_n, sc, mask=mask_n)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, BIAS, BH, BW, KEY_H, KEY_W, D_BIAS, D_BH, D_BW,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_bias_b, stride_bias_h, stride_bias_q, stride_bias_k, stride_key_b,
    H, N, GH, GW, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_REL_POS: tl.constexpr, STORE_D_BIAS: tl.constexpr, REL_POS_GRAD: tl.constexpr,
    GH_PAD: tl.constexpr, GW_PAD: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    DO += off_b * stride_dob + off_h * stride_doh
    DQ += off_b * stride_dqb + off_h * stride_dqh
    LSE += pid_bh.to(tl.int64) * N
    Delta += pid_bh.to(tl.int64) * N
    if HAS_BIAS or HAS_REL_POS:
        BIAS, BH, BW, KEY_H, KEY_W = bias_pointers(BIAS, BH, BW, KEY_H, KEY_W, off_b, off_h, H, N, GH, GW,
                                                   stride_bias_b, stride_bias_h, stride_key_b)
    if STORE_D_BIAS:
        D_BIAS += pid_bh.to(tl.int64) * N * N      # fp32 (B, H, N, N), contiguous
    if REL_POS_GRAD:
        D_BH += pid_bh.to(tl.int64) * N * GH       # fp32 (B, H, N, G) tables, contiguous
        D_BW += pid_bh.to(tl.int64) * N * GW
        d_bh = tl.zeros([BLOCK_M, GH_PAD], dtype=tl.float32)
        d_bw = tl.zeros([BLOCK_M, GW_PAD], dtype=tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N

    q = _load_rows(Q, offs_m, mask_m, stride_qn, stride_qd, offs_d, UPCAST)
    do = _load_rows(DO, offs_m, mask_m, stride_don, stride_dod, offs_d, UPCAST)
    lse2 = tl.load(LSE + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n0
        mask_n = cols < N
        k = _load_rows(K, cols, mask_n, stride_kn, stride_kd, offs_d, UPCAST)
        v = _load_rows(V, cols, mask_n, stride_vn, stride_vd, offs_d, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        s = qk * qk_scale
        if HAS_BIAS or HAS_REL_POS:
            s += bias_tile(BIAS, BH, BW, KEY_H, KEY_W, offs_m, cols, mask_m, mask_n, stride_bias_q, stride_bias_k,
                           GH, GW, HAS_BIAS, HAS_REL_POS, False)
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
        if STORE_D_BIAS:  # d bias = dS (natural-log units), reduced over broadcast dims by the launcher's caller
            tl.store(D_BIAS + offs_m[:, None] * N + cols[None, :], ds, mask=mask_m[:, None] & mask_n[None, :])
        if REL_POS_GRAD:
            # d bias_h = dS · onehot(key_h): padding keys add 0 (not 0 · NaN where dS is not finite there).
            ds_keys = tl.where(mask_n[None, :], ds, 0.0).to(k.dtype)
            d_bh += tl.dot(ds_keys, one_hot(KEY_H, cols, mask_n, GH_PAD).to(k.dtype), input_precision=INPUT_PRECISION)
            d_bw += tl.dot(ds_keys, one_hot(KEY_W, cols, mask_n, GW_PAD).to(k.dtype), input_precision=INPUT_PRECISION)

    _store_rows(DQ, offs_m, mask_m, stride_dqn, stride_dqd, offs_d, dq * sm_scale, UPCAST)
    if REL_POS_GRAD:
        store_table(D_BH, GH, offs_m, mask_m, d_bh, GH_PAD)
        store_table(D_BW, GW, offs_m, mask_m, d_bw, GW_PAD)


# ------------------------------------------------------------------------------------------- autotune

def _configs(pairs, warps=(4, 8), stages=(2, 3, 4)):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in pairs for w in warps for s in stages]


# Autotune spaces (also compiled ahead of time for sm_90 by tests/test_triton_compile.py).
FWD_CONFIGS = _configs([(64, 32), (64, 64), (128, 32), (128, 64)])
DKDV_CONFIGS = _configs([(32, 64), (64, 64), (32, 128), (64, 128)], stages=(2, 3))
DQ_CONFIGS = _configs([(64, 32), (64, 64), (128, 32), (128, 64)], stages=(2, 3))

if _INTERPRET:
    _fwd_launch = _attn_fwd_kernel
    _dkdv_launch = _attn_bwd_dkdv_kernel
    _dq_launch = _attn_bwd_dq_kernel
    _BLOCK_KW = {"BLOCK_M": _INTERPRET_BLOCK, "BLOCK_N": _INTERPRET_BLOCK}
    _BLOCK_KW_LARGE = _INTERPRET_LARGE
else:
    # Tuned per (sequence length, head dim, bias kind); the autotuner adds the tensors' dtypes to the key. Every
    # kernel only stores (never accumulates into) its outputs, so the autotuner's repeated runs are harmless.
    _KEY = ["N", "HEAD_DIM", "HAS_BIAS", "HAS_REL_POS"]
    _fwd_launch = triton.autotune(configs=FWD_CONFIGS, key=_KEY)(_attn_fwd_kernel)
    _dkdv_launch = triton.autotune(configs=DKDV_CONFIGS, key=_KEY)(_attn_bwd_dkdv_kernel)
    _dq_launch = triton.autotune(configs=DQ_CONFIGS, key=_KEY + ["STORE_D_BIAS", "REL_POS_GRAD", "GH_PAD",
                                                                 "GW_PAD"])(_attn_bwd_dq_kernel)
    _BLOCK_KW = _BLOCK_KW_LARGE = {}

_PRE_BLOCK = 64


def _block_kw(N: int):
    return _BLOCK_KW_LARGE if N > 1024 else _BLOCK_KW


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for half-precision operands


# ------------------------------------------------------------------------------------------ launchers

def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  bias: Optional[torch.Tensor] = None, bias_h: Optional[torch.Tensor] = None,
                  bias_w: Optional[torch.Tensor] = None, key_h: Optional[torch.Tensor] = None,
                  key_w: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,N,D) contiguous, lse (B,H,N) fp32, natural log of Σ_k exp(S), S = q·k·scale + bias).

    Trusts its caller (``pm_kernels.attention``): dtype and head dim are ones the kernels support, the bias
    arguments as ``pm_kernels.attention`` documents them.
    """
    B, H, N, D = q.shape
    out = _new_buffer((B, H, N, D), q.dtype, q.device)
    lse = _new_buffer((B, H, N), torch.float32, q.device)
    if B * H * N == 0:
        return out, lse
    extra = bias_args(q, bias, bias_h, bias_w, key_h, key_w)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    with _device_guard(q):
        _fwd_launch[grid](
            q, k, v, out, lse, *extra.pointers,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *extra.strides,
            H, N, *extra.sizes, float(scale) * _LOG2E,
            HEAD_DIM=D, **extra.flags, UPCAST=_INTERPRET, INPUT_PRECISION=_input_precision(q.dtype),
            **_block_kw(N),
        )
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float, score: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, bias_h: Optional[torch.Tensor] = None,
                  bias_w: Optional[torch.Tensor] = None, key_h: Optional[torch.Tensor] = None,
                  key_w: Optional[torch.Tensor] = None, bias_grad: bool = False, rel_pos_grad: bool = False):
    """(dq, dk, dv, d_logits, d_bias_h, d_bias_w): dq, dk, dv contiguous (B,H,N,D); with ``bias_grad`` d_logits =
    dS, fp32 (B,H,N,N) (the gradient of ``bias`` before the sum over its broadcast dims), else None; with
    ``rel_pos_grad`` the fp32 (B,H,N,G) gradients of bias_h and bias_w, else None. Adds Σ_{b,h,q} P⊙dP per key
    into ``score`` if given."""
    B, H, N, D = q.shape
    dq = _new_buffer((B, H, N, D), q.dtype, q.device)
    dk = _new_buffer((B, H, N, D), k.dtype, k.device)
    dv = _new_buffer((B, H, N, D), v.dtype, v.device)
    extra = bias_args(q, bias, bias_h, bias_w, key_h, key_w)
    gh, gw = extra.sizes
    d_logits = _new_buffer((B, H, N, N), torch.float32, q.device) if bias_grad else None
    d_bh = _new_buffer((B, H, N, gh), torch.float32, q.device) if rel_pos_grad else None
    d_bw = _new_buffer((B, H, N, gw), torch.float32, q.device) if rel_pos_grad else None
    if B * H * N == 0:
        return tuple(t if t is None else t.zero_() for t in (dq, dk, dv, d_logits, d_bh, d_bw))
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    lse = lse.contiguous()
    delta = _new_buffer((B, H, N), torch.float32, q.device)
    has_score = score is not None
    partial = _new_buffer((B * H, N), torch.float32, q.device) if has_score else delta  # dummy if unused
    precision = _input_precision(q.dtype)

    with _device_guard(q):
        _attn_bwd_preprocess[(triton.cdiv(N, _PRE_BLOCK), B * H)](
            out, grad_out, delta, *_strides(out), *_strides(grad_out), H, N,
            HEAD_DIM=D, BLOCK_M=_PRE_BLOCK,
        )
        grid_n = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)  # noqa: E731
        _dkdv_launch[grid_n](
            q, k, v, grad_out, lse, delta, dk, dv, partial, *extra.pointers,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            *extra.strides, H, N, *extra.sizes, float(scale) * _LOG2E, float(scale),
            HEAD_DIM=D, HAS_SCORE=has_score, **extra.flags, UPCAST=_INTERPRET, INPUT_PRECISION=precision,
            **_block_kw(N),
        )
        grid_m = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        _dq_launch[grid_m](
            q, k, v, grad_out, lse, delta, dq, *extra.pointers,
            *(delta if t is None else t for t in (d_logits, d_bh, d_bw)),  # dummies where unused
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), *extra.strides,
            H, N, *extra.sizes, float(scale) * _LOG2E, float(scale),
            HEAD_DIM=D, **extra.flags, STORE_D_BIAS=bias_grad, REL_POS_GRAD=rel_pos_grad, **extra.pads,
            UPCAST=_INTERPRET, INPUT_PRECISION=precision, **_block_kw(N),
        )
    if has_score:
        score.add_(partial.sum(dim=0))  # deterministic reduction over (b, h)
    return dq, dk, dv, d_logits, d_bh, d_bw
