"""Triton kernels for the Prune-and-Merge token ops (SPEC §1), with their autograd Functions.

    merge(x, M)                                z  = M x                       (B, K, C)
    reconstruct(z, R, x, keep_mask)            x' = R z + (1 − m) ⊙ x         (B, N, C)
    reconstruct_merge(z, R, x, keep_mask, M')  (x', z' = M' x')               the block boundary, fused

Shapes: x (B, N, C), z (B, K, C), M (K, N), R (N, K), keep_mask bool (N,) with True = kept; m = keep_mask
as 0/1, so (1 − m) ⊙ x passes the pruned tokens by the shortcut. It is a product, not a select, and padding
rows of a tile are kept out of every sum, so inf / NaN propagate as in the reference (docs/architecture.md).

Inputs arrive validated by ``pm_kernels.token_ops``. Precision: M and R are used in x's dtype, as autocast
would do (the reference does the same); every product is accumulated in fp32 and the outputs are written
in x's dtype. fp32 inputs use IEEE fp32 products (no TF32). Gradients of M / R come back in M's / R's
own dtype, those of x / z in x's dtype. float64 activations (x, z) are not run by these kernels: the dispatch
(``pm_kernels.dispatch.CAPABILITIES``) sends them elsewhere.

Layout and copies: every kernel takes explicit strides, so non-contiguous x, z, M, R and incoming gradients
are read in place, **no copies**. The only extra tensors are: the (N,) fp32 "pruned" vector built from
keep_mask; in the fused backward a (B, N, C) scratch holding dx'_total = dx' + M'ᵀ dz' (needed for dR);
and the fp32 (SPLIT, P, Q) partial sums of the dM / dR reductions, summed over SPLIT by torch.

Kernels (all tile one batch element × one channel block, accumulate in fp32):
- ``_matrix_times_tile`` / ``_matrix_times_registers``: the two product loops every kernel is made of (W from
  memory times an activation tile from memory, or times a tile held in registers).
- ``_shared_matmul_kernel``: out[b] = A · X[b] (+ (1 − m) ⊙ S[b]); A any (P, Q) strided view, so
  Mᵀ / Rᵀ are free. Runs merge forward (A = M), reconstruct forward (A = R, shortcut x), merge backward
  dx (A = Mᵀ), reconstruct backward dz (A = Rᵀ).
- ``_reconstruct_merge_fwd_kernel``: the fused block boundary; the whole N × C_tile tile of x' stays in
  registers between x' = R z + (1 − m) ⊙ x and z' = M' x'.
- ``_reconstruct_merge_bwd_kernel``: the fused backward; dx'_total = dx' + M'ᵀ dz' stays in registers
  while dx = (1 − m) ⊙ dx'_total and dz = Rᵀ dx'_total are formed.
  Both hold N tokens on chip: for N > ``FUSED_MAX_TOKENS`` (1024) the boundary runs as two shared matmuls.
- ``_batch_outer_sum_kernel``: out[p, q] = Σ_b Σ_c A[b, p, c] · B[b, q, c], the weight gradients
  dM = Σ_b dz xᵀ and dR = Σ_b dx' zᵀ (a Triton reduction kernel, split over the batch; no einsum).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..dispatch import interpreting

__all__ = ["merge", "reconstruct", "reconstruct_merge"]




_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of tl.dot: x's dtype on a GPU (tensor cores, fp32 accumulation); fp32 when
    interpreting, because the interpreter's half-precision dot is wrong (values are first rounded to
    x's dtype, so the result is the one the GPU computes)."""
    if interpreting():
        return tl.float32
    return _TL_DTYPE[dtype]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _interpreter_block(n: int) -> int:
    """Block size under the interpreter: 16 on the small test shapes (several blocks, ragged ones), 64 past 256
    (segmentation's thousands of tokens: 16x fewer interpreted steps per 2-D tile grid)."""
    return 16 if n <= 256 else 64


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # acc += a @ b, fp32 accumulation; IEEE keeps fp32 operands exact (no TF32 on the GPU).
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _round(v, DT: tl.constexpr, FIX_BF16: tl.constexpr):
    # v.to(DT), rounding to nearest even. FIX_BF16 is set only under TRITON_INTERPRET with bf16: the
    # interpreter truncates fp32 → bf16 (the GPU rounds to nearest even), so we round the bits by hand
    # first (add half an ulp, ties to even, clear the low 16 bits; finite values only).
    if FIX_BF16:
        v = v.to(tl.float32)
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(DT)


@triton.jit
def _tile(ptr, rows, s_r, cols, s_c):
    """Addresses of the [rows, cols] tile of a strided 2-D view."""
    return ptr + rows[:, None] * s_r + cols[None, :] * s_c


@triton.jit
def _matrix_times_tile(acc, w_ptr, s_wi, s_wj, offs_i, mask_i, J, y_ptr, s_yj, s_yc, offs_c, mask_c,
                       BLOCK_J: tl.constexpr, IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       IEEE: tl.constexpr, FIX_BF16: tl.constexpr):
    """acc[i, c] += Σ_j W[i, j] · Y[j, c] over j < J, in BLOCK_J steps. W is rounded to x's dtype (as autocast
    would) and read through its strides, so Wᵀ is free; padding rows / columns load 0."""
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < J
        w = tl.load(_tile(w_ptr, offs_i, s_wi, offs_j, s_wj), mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        y = tl.load(_tile(y_ptr, offs_j, s_yj, offs_c, s_yc), mask=mask_j[:, None] & mask_c[None, :], other=0.0)
        acc = _dot(_round(w, IN_DTYPE, FIX_BF16).to(DOT_DTYPE), y.to(DOT_DTYPE), acc, IEEE)
    return acc


@triton.jit
def _matrix_times_registers(w_ptr, s_wi, s_wj, I, offs_j, mask_j, tile, out_ptr, s_oi, s_oc, offs_c, mask_c,
                            BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr, IN_DTYPE: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FIX_BF16: tl.constexpr):
    """out[i, c] = Σ_j W[i, j] · tile[j, c] for every i < I, in BLOCK_I output blocks, where ``tile`` (already
    in DOT_DTYPE, padding rows 0) holds every j in registers: the fused kernels' second product."""
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        w = tl.load(_tile(w_ptr, offs_i, s_wi, offs_j, s_wj), mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        acc = _dot(_round(w, IN_DTYPE, FIX_BF16).to(DOT_DTYPE), tile, tl.zeros((BLOCK_I, BLOCK_C), tl.float32), IEEE)
        tl.store(_tile(out_ptr, offs_i, s_oi, offs_c, s_oc), _round(acc, IN_DTYPE, FIX_BF16),
                 mask=mask_i[:, None] & mask_c[None, :])


@triton.jit
def _shared_matmul_kernel(
    a_ptr, x_ptr, s_ptr, pruned_ptr, out_ptr,
    P, Q, C,
    s_ap, s_aq,                      # A: (P, Q), shared by the whole batch
    s_xb, s_xq, s_xc,                # X: (B, Q, C)
    s_sb, s_sp, s_sc,                # S: (B, P, C), the shortcut (only read if HAS_SHORTCUT)
    s_ob, s_op, s_oc,                # out: (B, P, C)
    HAS_SHORTCUT: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, p, c] = Σ_q A[p, q] · X[b, q, c]  (+ (1 − m[p]) · S[b, p, c])
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc = _matrix_times_tile(acc, a_ptr, s_ap, s_aq, offs_p, mask_p, Q, x_ptr + b * s_xb, s_xq, s_xc, offs_c,
                             mask_c, BLOCK_Q, IN_DTYPE, DOT_DTYPE, IEEE, FIX_BF16)
    mask_pc = mask_p[:, None] & mask_c[None, :]
    if HAS_SHORTCUT:
        # (1 − m) ⊙ S: pruned tokens pass through unchanged; kept tokens get 0 from the shortcut.
        pruned = tl.load(pruned_ptr + offs_p, mask=mask_p, other=0.0)
        s = tl.load(_tile(s_ptr + b * s_sb, offs_p, s_sp, offs_c, s_sc), mask=mask_pc, other=0.0)
        acc += pruned[:, None] * s.to(tl.float32)
    tl.store(_tile(out_ptr + b * s_ob, offs_p, s_op, offs_c, s_oc), _round(acc, IN_DTYPE, FIX_BF16), mask=mask_pc)


@triton.jit
def _reconstruct_merge_fwd_kernel(
    z_ptr, r_ptr, x_ptr, pruned_ptr, m_ptr, xo_ptr, zo_ptr,
    N, K, K2, C,
    s_zb, s_zk, s_zc,                # z: (B, K, C)
    s_rn, s_rk,                      # R: (N, K)
    s_xb, s_xn, s_xc,                # x: (B, N, C)
    s_mj, s_mn,                      # M_next: (K2, N)
    s_yb, s_yn, s_yc,                # x' out: (B, N, C)
    s_ob, s_oj, s_oc,                # z' out: (B, K2, C)
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program = one batch element b × one channel block; BLOCK_N ≥ N holds every token.
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    mask_nc = mask_n[:, None] & mask_c[None, :]

    # (1) x'[n, c] = Σ_k R[n, k] · z[b, k, c] + (1 − m[n]) · x[b, n, c], the whole N × BLOCK_C tile.
    xn = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    xn = _matrix_times_tile(xn, r_ptr, s_rn, s_rk, offs_n, mask_n, K, z_ptr + b * s_zb, s_zk, s_zc, offs_c, mask_c,
                            BLOCK_K, IN_DTYPE, DOT_DTYPE, IEEE, FIX_BF16)
    pruned = tl.load(pruned_ptr + offs_n, mask=mask_n, other=0.0)
    xt = tl.load(_tile(x_ptr + b * s_xb, offs_n, s_xn, offs_c, s_xc), mask=mask_nc, other=0.0)
    xn += pruned[:, None] * xt.to(tl.float32)
    # Padding rows n ≥ N are 0 · z = NaN where z is not finite; they must be 0 for the product (2).
    xn = tl.where(mask_n[:, None], xn, 0.0)
    # x' is an output in x's dtype; z' is computed from that same rounded x' (as the unfused ops would).
    xn_io = _round(xn, IN_DTYPE, FIX_BF16)
    tl.store(_tile(xo_ptr + b * s_yb, offs_n, s_yn, offs_c, s_yc), xn_io, mask=mask_nc)

    # (2) z'[j, c] = Σ_n M_next[j, n] · x'[n, c], from the tile still in registers (x' is not re-read).
    _matrix_times_registers(m_ptr, s_mj, s_mn, K2, offs_n, mask_n, xn_io.to(DOT_DTYPE), zo_ptr + b * s_ob, s_oj,
                            s_oc, offs_c, mask_c, BLOCK_J, BLOCK_C, IN_DTYPE, DOT_DTYPE, IEEE, FIX_BF16)


@triton.jit
def _reconstruct_merge_bwd_kernel(
    gx_ptr, gz_ptr, m_ptr, r_ptr, pruned_ptr, dxt_ptr, dx_ptr, dz_ptr,
    N, K, K2, C,
    s_gb, s_gn, s_gc,                # dx' (incoming grad of x'): (B, N, C)   (only read if HAS_GX)
    s_hb, s_hj, s_hc,                # dz' (incoming grad of z'): (B, K2, C)
    s_mj, s_mn,                      # M_next: (K2, N)
    s_rn, s_rk,                      # R: (N, K)
    s_tb, s_tn, s_tc,                # dx'_total scratch out: (B, N, C)       (only written if WRITE_DXT)
    s_xb, s_xn, s_xc,                # dx out: (B, N, C)                      (only written if WRITE_DX)
    s_zb, s_zk, s_zc,                # dz out: (B, K, C)                      (only written if WRITE_DZ)
    HAS_GX: tl.constexpr, WRITE_DXT: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DZ: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FIX_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    mask_nc = mask_n[:, None] & mask_c[None, :]

    # (1) dx'_total[n, c] = dx'[b, n, c] + Σ_j M_next[j, n] · dz'[b, j, c]   (M_nextᵀ dz', via strides)
    dxt = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    dxt = _matrix_times_tile(dxt, m_ptr, s_mn, s_mj, offs_n, mask_n, K2, gz_ptr + b * s_hb, s_hj, s_hc, offs_c,
                             mask_c, BLOCK_J, IN_DTYPE, DOT_DTYPE, IEEE, FIX_BF16)
    if HAS_GX:
        gx = tl.load(_tile(gx_ptr + b * s_gb, offs_n, s_gn, offs_c, s_gc), mask=mask_nc, other=0.0)
        dxt += gx.to(tl.float32)
    # Padding rows n ≥ N are 0 · dz' = NaN where dz' is not finite; they must be 0 for the product (3).
    dxt = tl.where(mask_n[:, None], dxt, 0.0)
    # Rounded to x's dtype: it is the gradient of the x'-dtype tensor x' (what unfused autograd would see).
    dxt_io = _round(dxt, IN_DTYPE, FIX_BF16)
    if WRITE_DXT:
        tl.store(_tile(dxt_ptr + b * s_tb, offs_n, s_tn, offs_c, s_tc), dxt_io, mask=mask_nc)

    # (2) dx = (1 − m) ⊙ dx'_total: only pruned tokens reach x (through the shortcut).
    if WRITE_DX:
        pruned = tl.load(pruned_ptr + offs_n, mask=mask_n, other=0.0)
        dx = pruned[:, None] * dxt_io.to(tl.float32)
        tl.store(_tile(dx_ptr + b * s_xb, offs_n, s_xn, offs_c, s_xc), _round(dx, IN_DTYPE, FIX_BF16), mask=mask_nc)

    # (3) dz[k, c] = Σ_n R[n, k] · dx'_total[n, c]   (Rᵀ dx'_total, from the tile in registers)
    if WRITE_DZ:
        _matrix_times_registers(r_ptr, s_rk, s_rn, K, offs_n, mask_n, dxt_io.to(DOT_DTYPE), dz_ptr + b * s_zb, s_zk,
                                s_zc, offs_c, mask_c, BLOCK_K, BLOCK_C, IN_DTYPE, DOT_DTYPE, IEEE, FIX_BF16)


@triton.jit
def _batch_outer_sum_kernel(
    a_ptr, b_ptr, out_ptr,
    NB, P, Q, C, SPLIT,
    s_ab, s_ap, s_ac,                # A: (NB, P, C)
    s_bb, s_bq, s_bc,                # B: (NB, Q, C)
    s_os, s_op, s_oq,                # out: (SPLIT, P, Q) fp32 partial sums
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[s, p, q] = Σ_{b ≡ s mod SPLIT} Σ_c A[b, p, c] · B[b, q, c]; the host sums over s.
    # Used for dM = Σ_b dz · xᵀ and dR = Σ_b dx' · zᵀ (reduction over batch and channels).
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    pid_s64 = pid_s.to(tl.int64)
    for b0 in range(0, NB, SPLIT):
        bi = pid_s64 + b0            # batch element of this step (int64 offsets); may run past NB once
        in_batch = bi < NB
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = (offs_c < C) & in_batch
            a = tl.load(_tile(a_ptr + bi * s_ab, offs_p, s_ap, offs_c, s_ac),
                        mask=mask_p[:, None] & mask_c[None, :], other=0.0)
            bt = tl.load(_tile(b_ptr + bi * s_bb, offs_c, s_bc, offs_q, s_bq),  # Bᵀ tile (C, Q)
                         mask=mask_c[:, None] & mask_q[None, :], other=0.0)
            acc = _dot(a.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, IEEE)
    tl.store(_tile(out_ptr + pid_s * s_os, offs_p, s_op, offs_q, s_oq), acc, mask=mask_p[:, None] & mask_q[None, :])


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


def _common(dtype: torch.dtype):
    return dict(IN_DTYPE=_TL_DTYPE[dtype], DOT_DTYPE=_dot_dtype(dtype), IEEE=dtype == torch.float32,
                FIX_BF16=interpreting() and dtype == torch.bfloat16)


def _pruned_vector(keep_mask: torch.Tensor) -> torch.Tensor:
    """(1 − m) as fp32, shape (N,): 1 for pruned tokens, 0 for kept ones (a small copy)."""
    return (~keep_mask).to(torch.float32).contiguous()


def _shared_matmul(A: torch.Tensor, X: torch.Tensor, out_dtype: torch.dtype,
                   shortcut: Optional[torch.Tensor] = None,
                   pruned: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[b] = A · X[b] (+ (1 − m) ⊙ shortcut[b]); A (P, Q) any strides, X (B, Q, C)."""
    P, Q = A.shape
    B, _, C = X.shape
    out = torch.empty((B, P, C), device=X.device, dtype=out_dtype)
    if B == 0 or P == 0 or C == 0:
        return out
    BLOCK_P = _interpreter_block(P) if interpreting() else min(64, _pow2(P))
    BLOCK_Q = _interpreter_block(Q) if interpreting() else 32
    BLOCK_C = min(64, _pow2(C))
    has_s = shortcut is not None
    s = shortcut if has_s else X          # dummy pointer when unused (never read)
    pv = pruned if has_s else A
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C), B)
    _shared_matmul_kernel[grid](
        A, X, s, pv, out, P, Q, C,
        A.stride(0), A.stride(1),
        X.stride(0), X.stride(1), X.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_SHORTCUT=has_s, **_common(X.dtype),
        BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C, num_warps=4,
    )
    return out


def _batch_outer_sum(A: torch.Tensor, Bm: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Σ_b A[b] · B[b]ᵀ over (B, P, C) × (B, Q, C) → (P, Q) in out_dtype (fp32 accumulation)."""
    NB, P, C = A.shape
    Q = Bm.shape[1]
    if NB == 0 or C == 0:
        return torch.zeros((P, Q), device=A.device, dtype=out_dtype)
    BLOCK_P = _interpreter_block(P) if interpreting() else min(64, _pow2(P))
    BLOCK_Q = _interpreter_block(Q) if interpreting() else min(64, _pow2(Q))
    BLOCK_C = 16 if interpreting() else 64
    tiles = triton.cdiv(P, BLOCK_P) * triton.cdiv(Q, BLOCK_Q)
    # Split the batch so that enough programs run; the fp32 partial sums are added by torch.
    target = 2 if interpreting() else 4 * _num_sms(A.device)
    split = max(1, min(NB, triton.cdiv(target, tiles)))
    partial = torch.empty((split, P, Q), device=A.device, dtype=torch.float32)
    dt = A.dtype if A.dtype == Bm.dtype else torch.float32
    grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q), split)
    _batch_outer_sum_kernel[grid](
        A, Bm, partial, NB, P, Q, C, split,
        A.stride(0), A.stride(1), A.stride(2),
        Bm.stride(0), Bm.stride(1), Bm.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        DOT_DTYPE=_dot_dtype(dt), IEEE=dt == torch.float32,
        BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C, num_warps=4,
    )
    return partial.sum(0).to(out_dtype)


_SM_COUNT = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# The fused kernels hold the whole N-token tile of one channel block on chip. Compiled for sm_90 (H100,
# 232448 B of shared memory per block): BLOCK_N = 1024 fits (fp32 196608 B, bf16 / fp16 164352 B); BLOCK_N = 2048
# (N = 1025: 512² images at patch 16; N = 1601: 640²) needs 328192 B in bf16 and cannot launch. Above this
# many tokens the boundary runs as its two products (x' is written and read back once): same math.
FUSED_MAX_TOKENS = 1024


def _fused_blocks(N: int, K: int, K2: int, C: int):
    """Block sizes of the fused kernels: the N × BLOCK_C tile is held whole, so BLOCK_C shrinks as N grows."""
    BLOCK_N = _pow2(N)
    if interpreting():
        return BLOCK_N, 16, 16, 16
    BLOCK_C = max(16, min(64, _pow2(C), 16384 // BLOCK_N))
    BLOCK_K = 16 if BLOCK_N >= 512 else 32
    BLOCK_J = 16 if BLOCK_N >= 512 else 32
    return BLOCK_N, BLOCK_K, BLOCK_J, BLOCK_C


def _reconstruct_merge_fwd(z, R, x, pruned, M_next):
    B, N, C = x.shape
    K, K2 = z.shape[1], M_next.shape[0]
    x_next = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
    z_next = torch.empty((B, K2, C), device=x.device, dtype=x.dtype)
    if B == 0 or C == 0:
        return x_next, z_next
    BLOCK_N, BLOCK_K, BLOCK_J, BLOCK_C = _fused_blocks(N, K, K2, C)
    grid = (triton.cdiv(C, BLOCK_C), B)
    _reconstruct_merge_fwd_kernel[grid](
        z, R, x, pruned, M_next, x_next, z_next,
        N, K, K2, C,
        z.stride(0), z.stride(1), z.stride(2),
        R.stride(0), R.stride(1),
        x.stride(0), x.stride(1), x.stride(2),
        M_next.stride(0), M_next.stride(1),
        x_next.stride(0), x_next.stride(1), x_next.stride(2),
        z_next.stride(0), z_next.stride(1), z_next.stride(2),
        **_common(x.dtype),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C,
        num_warps=8 if BLOCK_N * BLOCK_C >= 8192 else 4,
    )
    return x_next, z_next


def _reconstruct_merge_bwd(gx, gz, M_next, R, pruned, K: int, dtype: torch.dtype,
                           need_dxt: bool, need_dx: bool, need_dz: bool):
    """Returns (dx'_total, dx, dz); entries not asked for are None."""
    B, K2, C = gz.shape
    N = M_next.shape[1]
    dev = gz.device
    dxt = torch.empty((B, N, C), device=dev, dtype=dtype) if need_dxt else None
    dx = torch.empty((B, N, C), device=dev, dtype=dtype) if need_dx else None
    dz = torch.empty((B, K, C), device=dev, dtype=dtype) if need_dz else None
    if B == 0 or C == 0 or not (need_dxt or need_dx or need_dz):
        return dxt, dx, dz
    has_gx = gx is not None
    gx_ = gx if has_gx else gz
    dxt_ = dxt if need_dxt else gz
    dx_ = dx if need_dx else gz
    dz_ = dz if need_dz else gz
    BLOCK_N, BLOCK_K, BLOCK_J, BLOCK_C = _fused_blocks(N, K, K2, C)
    grid = (triton.cdiv(C, BLOCK_C), B)
    _reconstruct_merge_bwd_kernel[grid](
        gx_, gz, M_next, R, pruned, dxt_, dx_, dz_,
        N, K, K2, C,
        gx_.stride(0), gx_.stride(1), gx_.stride(2),
        gz.stride(0), gz.stride(1), gz.stride(2),
        M_next.stride(0), M_next.stride(1),
        R.stride(0), R.stride(1),
        dxt_.stride(0), dxt_.stride(1), dxt_.stride(2),
        dx_.stride(0), dx_.stride(1), dx_.stride(2),
        dz_.stride(0), dz_.stride(1), dz_.stride(2),
        HAS_GX=has_gx, WRITE_DXT=need_dxt, WRITE_DX=need_dx, WRITE_DZ=need_dz, **_common(dtype),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_J=BLOCK_J, BLOCK_C=BLOCK_C,
        num_warps=8 if BLOCK_N * BLOCK_C >= 8192 else 4,
    )
    return dxt, dx, dz


# --------------------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------------------


class _Merge(torch.autograd.Function):
    """z = M x.  Backward: dx = Mᵀ dz;  dM = Σ_b dz xᵀ."""

    @staticmethod
    def forward(ctx, x, M):
        ctx.save_for_backward(x, M)
        return _shared_matmul(M, x, x.dtype)

    @staticmethod
    def backward(ctx, dz):
        x, M = ctx.saved_tensors
        dx = dM = None
        if ctx.needs_input_grad[0]:
            dx = _shared_matmul(M.t(), dz, x.dtype)              # Mᵀ as a strided view, no copy
        if ctx.needs_input_grad[1]:
            dM = _batch_outer_sum(dz, x, M.dtype)
        return dx, dM


class _Reconstruct(torch.autograd.Function):
    """x' = R z + (1 − m) ⊙ x.  Backward: dz = Rᵀ dx';  dx = (1 − m) ⊙ dx';  dR = Σ_b dx' zᵀ."""

    @staticmethod
    def forward(ctx, z, R, x, keep_mask):
        pruned = _pruned_vector(keep_mask)
        ctx.save_for_backward(z, R, pruned)
        return _shared_matmul(R, z, x.dtype, shortcut=x, pruned=pruned)

    @staticmethod
    def backward(ctx, g):
        z, R, pruned = ctx.saved_tensors
        dz = dR = dx = None
        if ctx.needs_input_grad[0]:
            dz = _shared_matmul(R.t(), g, z.dtype)               # Rᵀ as a strided view, no copy
        if ctx.needs_input_grad[1]:
            dR = _batch_outer_sum(g, z, R.dtype)
        if ctx.needs_input_grad[2]:
            dx = (pruned.to(g.dtype)[:, None] * g).to(z.dtype)  # elementwise, torch
        return dz, dR, dx, None


class _ReconstructMerge(torch.autograd.Function):
    """Block boundary: x' = R z + (1 − m) ⊙ x;  z' = M_next x'.

    Backward (dx' and dz' the incoming gradients):
        dx'_total = dx' + M_nextᵀ dz'
        dM_next   = Σ_b dz' x'ᵀ
        dR        = Σ_b dx'_total zᵀ
        dz        = Rᵀ dx'_total
        dx        = (1 − m) ⊙ dx'_total
    """

    @staticmethod
    def forward(ctx, z, R, x, keep_mask, M_next):
        pruned = _pruned_vector(keep_mask)
        if x.shape[1] > FUSED_MAX_TOKENS:
            x_next = _shared_matmul(R, z, x.dtype, shortcut=x, pruned=pruned)
            z_next = _shared_matmul(M_next, x_next, x.dtype)
        else:
            x_next, z_next = _reconstruct_merge_fwd(z, R, x, pruned, M_next)
        ctx.save_for_backward(z, R, pruned, M_next, x_next)
        ctx.set_materialize_grads(False)   # an unused output gets None, not a zero tensor
        return x_next, z_next

    @staticmethod
    def backward(ctx, gx, gz):
        z, R, pruned, M_next, x_next = ctx.saved_tensors
        need_dz, need_dR, need_dx, _, need_dM = ctx.needs_input_grad
        dz = dR = dx = dM = None
        if gz is None:
            # Only x' was used: this is the plain reconstruct backward.
            if gx is None:
                return None, None, None, None, None
            dxt = gx
            if need_dz:
                dz = _shared_matmul(R.t(), gx, z.dtype)
            if need_dx:
                dx = (pruned.to(gx.dtype)[:, None] * gx).to(z.dtype)
        elif x_next.shape[1] > FUSED_MAX_TOKENS:  # the two products' backward, as in forward
            dxt = _shared_matmul(M_next.t(), gz, z.dtype)
            if gx is not None:
                dxt = (dxt.float() + gx.float()).to(z.dtype)
            if need_dz:
                dz = _shared_matmul(R.t(), dxt, z.dtype)
            if need_dx:
                dx = (pruned.to(dxt.dtype)[:, None] * dxt).to(z.dtype)
            if need_dM:
                dM = _batch_outer_sum(gz, x_next, M_next.dtype)
        else:
            dxt, dx, dz = _reconstruct_merge_bwd(gx, gz, M_next, R, pruned, z.shape[1], z.dtype,
                                                 need_dxt=need_dR, need_dx=need_dx, need_dz=need_dz)
            if need_dM:
                dM = _batch_outer_sum(gz, x_next, M_next.dtype)
        if need_dR:
            dR = _batch_outer_sum(dxt, z, R.dtype)
        return dz, dR, dx, None, dM


# --------------------------------------------------------------------------------------------------------
# Entry points called by pm_kernels.token_ops (inputs already validated)
# --------------------------------------------------------------------------------------------------------


def merge(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """z = M x: x (B, N, C), M (K, N) → (B, K, C) in x's dtype."""
    return _Merge.apply(x, M)


def reconstruct(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """x' = R z + (1 − m) ⊙ x → (B, N, C) in x's dtype."""
    return _Reconstruct.apply(z, R, x, keep_mask)


def reconstruct_merge(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor,
                      M_next: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused block boundary: (x', z') with x' = R z + (1 − m) ⊙ x and z' = M_next x'."""
    return _ReconstructMerge.apply(z, R, x, keep_mask, M_next)
