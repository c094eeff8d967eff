"""The Prune-and-Merge token ops: input checks, then the backend ``pm_kernels.dispatch`` picks.

    merge(x, M)                                z  = M x
    reconstruct(z, R, x, keep_mask)            x' = R z + (1 − m) ⊙ x
    reconstruct_merge(z, R, x, keep_mask, M')  (x', M' x')   — the block boundary, fused on cuda/triton

x: (B, N, C) all tokens; z: (B, K, C) merged tokens; M: (K, N); R: (N, K); keep_mask: bool (N,).
M and R may be fp32 parameters under bf16/fp16 activations (autocast-style): they are used in x's dtype.

inf / NaN propagate as IEEE arithmetic does in these formulas, the same on every backend (docs/architecture.md,
"Non-finite input"): zero weights count (0 · inf = NaN), and (1 − m) ⊙ x is a product, not a select, so a
non-finite x of a kept token gives NaN in x' (and in z' = M' x').

The public functions check their inputs; ``run_*`` take inputs already checked (the model layer checks a
structure once, where it changes, and x once per forward) and only dispatch.
"""
from typing import Optional, Tuple

import torch

from . import dispatch
from . import reference as _ref
from ._checks import FLOAT_DTYPES, check_keep_mask, check_same_device, check_tensor

__all__ = ["merge", "reconstruct", "reconstruct_merge"]


def check_x(name, x):
    return check_tensor(name, x, ndim=3, dtypes=FLOAT_DTYPES, what="shape (B, N, C)")


def check_merge_matrix(name, M, n_tokens, k_tokens: Optional[int] = None):
    check_tensor(name, M, ndim=2, dtypes=FLOAT_DTYPES, what=f"shape (K, {n_tokens}) with K <= {n_tokens}")
    if M.shape[1] != n_tokens or M.shape[0] > n_tokens or (k_tokens is not None and M.shape[0] != k_tokens):
        k = "K" if k_tokens is None else k_tokens
        raise ValueError(f"{name}: expected shape ({k}, {n_tokens}) with K <= {n_tokens}, got {tuple(M.shape)}")


def check_reconstruct_matrix(R, keep_mask, n_tokens, k_tokens, name="R"):
    check_tensor(name, R, ndim=2, dtypes=FLOAT_DTYPES, shape=(n_tokens, k_tokens),
                 what=f"shape ({n_tokens}, {k_tokens}) (N × K)")
    check_keep_mask(keep_mask, n_tokens)


def _check_reconstruct(z, R, x, keep_mask):
    check_x("x", x)
    n = x.shape[1]
    check_tensor("z", z, ndim=3, dtypes=(x.dtype,), what=f"shape ({x.shape[0]}, K, {x.shape[2]})")
    if z.shape[0] != x.shape[0] or z.shape[2] != x.shape[2] or z.shape[1] > n:
        raise ValueError(f"z: expected shape ({x.shape[0]}, K, {x.shape[2]}) with K <= {n} "
                         f"(batch and channels of x), got {tuple(z.shape)}")
    check_reconstruct_matrix(R, keep_mask, n, z.shape[1])


def merge(x: torch.Tensor, M: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """z = M @ x (SPEC §1 merge): x (B, N, C), M (K, N) → z (B, K, C)."""
    check_x("x", x)
    check_merge_matrix("M", M, x.shape[1])
    check_same_device(x=x, M=M)
    return run_merge(x, M, backend)


def reconstruct(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """x' = R @ z + (1 − keep_mask) ⊙ x (SPEC §1 reconstruct + shortcut) → (B, N, C).

    The shortcut is a product: a non-finite x of a kept token gives NaN in x' (0 · inf), as on every backend."""
    _check_reconstruct(z, R, x, keep_mask)
    check_same_device(z=z, R=R, x=x, keep_mask=keep_mask)
    return run_reconstruct(z, R, x, keep_mask, backend)


def reconstruct_merge(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor,
                      M_next: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """The block boundary in one op: x' = R z + (1 − m) ⊙ x and z' = M_next x'. Returns (x', z')."""
    _check_reconstruct(z, R, x, keep_mask)
    check_merge_matrix("M_next", M_next, x.shape[1])
    check_same_device(z=z, R=R, x=x, keep_mask=keep_mask, M_next=M_next)
    return run_reconstruct_merge(z, R, x, keep_mask, M_next, backend)


# ------------------------------------------------------------------------ dispatch (inputs already checked)

def run_merge(x: torch.Tensor, M: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    name = dispatch.select("merge", backend, x.device, x.dtype)
    if name == "torch":
        return _ref.merge_reference(x, M)
    return _native(name).merge(x, M)


def run_reconstruct(z, R, x, keep_mask, backend: str = "auto") -> torch.Tensor:
    name = dispatch.select("reconstruct", backend, x.device, x.dtype)
    if name == "torch":
        return _ref.reconstruct_reference(z, R, x, keep_mask)
    return _native(name).reconstruct(z, R, x, keep_mask)


def run_reconstruct_merge(z, R, x, keep_mask, M_next, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    name = dispatch.select("reconstruct_merge", backend, x.device, x.dtype)
    if name == "torch":
        return _ref.reconstruct_merge_reference(z, R, x, keep_mask, M_next)
    return _native(name).reconstruct_merge(z, R, x, keep_mask, M_next)


def _native(name: str):
    """The module implementing merge / reconstruct / reconstruct_merge for a native backend."""
    if name == "triton":
        from .kernels import token_ops_triton
        return token_ops_triton
    from . import _extension
    return _extension
