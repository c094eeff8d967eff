"""Shared by the token-op tests (test_token_ops.py: triton and torch backends; test_extension.py: the compiled
extension): inputs, the float64 comparison and its per-dtype tolerances (Liger-style table)."""
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
