"""Shared by the op tests: for the token ops (test_token_ops.py: triton and torch backends; test_extension.py: the
compiled extension) and for attention (test_attention.py, test_attention_bias.py): inputs, the float64 comparison
and its per-dtype tolerances (Liger-style table)."""
from typing import NamedTuple

import pytest
import torch

# max |out − want| / max |want| (norm-wise relative error, so that a cancellation to ~0 in one entry does not
# fail a correct result), ``want`` from tests/formulas.py in float64. bf16 keeps 8 significant bits: 2e-2 is
# about 5 of its rounding units, room for the torch backend's own bf16 roundings (x' stored before M_next, dx'
# before dR; measured up to 1.5e-2 on a 5-entry dR with cancellation). A wrong formula is off by O(1).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (x dtype, M/R dtype): same dtype, or fp32 weights with half activations (autocast-style).
_PAIRS = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-x_fp32-MR": (torch.bfloat16, torch.float32),
    "fp16-x_fp32-MR": (torch.float16, torch.float32),
}


def dtype_pairs(*ids):
    """pytest params ``(dtype, wdtype)`` for the named pairs of ``_PAIRS``."""
    return [pytest.param(*_PAIRS[i], id=i) for i in ids]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    return (out - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def assert_close(name: str, out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == want.shape, f"{name}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, want)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


class TokenOpInputs(NamedTuple):
    x: torch.Tensor        # (B, N, C) all tokens
    z: torch.Tensor        # (B, K, C) merged tokens
    M: torch.Tensor        # (K, N)
    R: torch.Tensor        # (N, K)
    M_next: torch.Tensor   # (K_next, N)
    keep_mask: torch.Tensor  # bool (N,): CLS kept, the last token pruned, about a third of the others pruned


def token_op_inputs(B, N, K, K_next, C, dtype, wdtype=None, device="cpu", seed=0) -> TokenOpInputs:
    """Random inputs of the token ops; M and R scaled so that every output is O(1)."""
    wdtype = dtype if wdtype is None else wdtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g).to(device, dtype)
    z = torch.randn(B, K, C, generator=g).to(device, dtype)
    M = torch.randn(K, N, generator=g).div(N ** 0.5).to(device, wdtype)
    R = torch.randn(N, K, generator=g).div(K ** 0.5).to(device, wdtype)
    M_next = torch.randn(K_next, N, generator=g).div(N ** 0.5).to(device, wdtype)
    keep = torch.rand(N, generator=g) > 0.35
    keep[0] = True     # CLS is always kept
    keep[-1] = False   # at least one token takes the shortcut
    return TokenOpInputs(x, z, M, R, M_next, keep.to(device))


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def float64_leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 copy of an op input as the op defines it: weights are used in the activations' ``dtype``
    (autocast-style), so they are first rounded to it; activations are exact in float64."""
    return t.detach().to(dtype).double().requires_grad_(True)


# ------------------------------------------------------------------------------------------- attention

TF32 = torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32


def attention_tol(dtype: torch.dtype) -> float:
    """Norm-wise relative tolerance of attention's out, dq, dk, dv (and bias gradients) against float64."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 5e-3 if TF32 else 1e-4
    return 1e-2


def attention_score_tol(dtype: torch.dtype) -> float:
    """Max-norm relative tolerance of the score: it is accumulated in fp32 from fp32 P and fp32-accumulated dP
    whatever the input dtype, and the formula runs on the same rounded inputs, so half inputs get no slack."""
    return 5e-3 if (TF32 and dtype == torch.float32) else 1e-4


def norm_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def attention_inputs(B, H, N, D, dtype, device, scale=1.0, seed=0):
    """q, k, v (leaves that require grad) and an upstream gradient dO, (B, H, N, D) each, N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g) * scale for _ in range(4))
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, do.to(device, dtype)


def assert_attention_close(got, ref, dtype, names):
    """Each named result against the formula's: norm-wise for tensors, max-norm for the score (one wrong entry of
    a vector shows, however many right ones it has). A missing result (a None gradient) fails: it is not skipped."""
    assert len(got) == len(ref) == len(names)
    for name, g, r in zip(names, got, ref):
        assert g is not None, f"{name} is missing (None)"
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if name == "score":
            err, tol = rel_err(g, r), attention_score_tol(dtype)
        else:
            err, tol = norm_rel_err(g, r), attention_tol(dtype)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
