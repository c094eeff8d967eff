"""The compiled extension ``pm_kernels._C`` as differentiable Python functions (backend ``"cuda"``).

``import pm_kernels._C`` registers the native ops (csrc/pm_ops.cpp, csrc/pm_ops_cuda.cu):

    torch.ops.pm_kernels.merge_fwd(x, M)                                  z  = M x
    torch.ops.pm_kernels.reconstruct_fwd(z, R, x, keep_mask)              x' = R z + (1 − m) ⊙ x
    torch.ops.pm_kernels.reconstruct_merge_fwd(z, R, x, keep_mask, M')    (x', M' x')   fused block boundary
    torch.ops.pm_kernels.transposed_apply(W, g, addend)                   Wᵀ g (+ addend)
    torch.ops.pm_kernels.matrix_grad(g, y, dtype)                         Σ_b g_b y_bᵀ  (in ``dtype``)

with C++ kernels for CPU tensors, CUDA kernels for CUDA tensors and Meta kernels (for torch.compile / fake
tensors). This module gives the three forward ops their backward (dx, dz, dM, dR) with
``torch.library.register_autograd``, so the ops themselves are differentiable (eager, torch.compile and
``torch.library.opcheck`` alike), and exposes ``merge`` / ``reconstruct`` / ``reconstruct_merge`` as called by
``pm_kernels.token_ops`` with inputs already validated.

Precision: kernels accumulate in fp32 (fp64 for fp64 inputs) with M and R used in fp32 even under fp16/bf16
activations; outputs are in the activation dtype and the gradients of M / R in their own dtype.
keep_mask is a constant (no gradient). Double backward is not supported.
"""
from typing import Tuple

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.pm_kernels.*)

__all__ = ["merge", "reconstruct", "reconstruct_merge"]

_ops = torch.ops.pm_kernels


def _pruned(keep_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (~keep_mask).to(dtype).unsqueeze(-1)  # (N, 1): 1 where the token is pruned


def _reconstruct_grads(ctx, d_x_next, z, R, keep_mask):
    """Gradients (dz, dR, dx) of x' = R z + (1 − m) ⊙ x given dx' (None when x' has no gradient)."""
    need_z, need_R, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if d_x_next is None:
        return None, None, None
    d_z = _ops.transposed_apply(R, d_x_next, None) if need_z else None               # Rᵀ dx'
    d_R = _ops.matrix_grad(d_x_next, z, R.dtype) if need_R else None                 # Σ_b dx'_b z_bᵀ
    d_x = d_x_next * _pruned(keep_mask, d_x_next.dtype) if need_x else None          # (1 − m) ⊙ dx'
    return d_z, d_R, d_x


# ---- merge_fwd: z = M x -------------------------------------------------------------------------------

def _merge_setup_context(ctx, inputs, output):
    x, M = inputs
    ctx.save_for_backward(x, M)


def _merge_backward(ctx, d_z):
    x, M = ctx.saved_tensors
    if d_z is None:
        return None, None
    d_x = _ops.transposed_apply(M, d_z, None) if ctx.needs_input_grad[0] else None   # Mᵀ dz
    d_M = _ops.matrix_grad(d_z, x, M.dtype) if ctx.needs_input_grad[1] else None     # Σ_b dz_b x_bᵀ
    return d_x, d_M


# ---- reconstruct_fwd: x' = R z + (1 − m) ⊙ x ------------------------------------------------------------

def _reconstruct_setup_context(ctx, inputs, output):
    z, R, x, keep_mask = inputs
    ctx.save_for_backward(z, R, keep_mask)


def _reconstruct_backward(ctx, d_out):
    z, R, keep_mask = ctx.saved_tensors
    d_z, d_R, d_x = _reconstruct_grads(ctx, d_out, z, R, keep_mask)
    return d_z, d_R, d_x, None


# ---- reconstruct_merge_fwd: (x', z' = M' x') -------------------------------------------------------------

def _reconstruct_merge_setup_context(ctx, inputs, output):
    z, R, x, keep_mask, M_next = inputs
    x_next, _ = output
    ctx.save_for_backward(z, R, keep_mask, M_next, x_next)


def _reconstruct_merge_backward(ctx, d_x_next, d_z_next):
    z, R, keep_mask, M_next, x_next = ctx.saved_tensors
    need_upstream = any(ctx.needs_input_grad[:3])
    d_M_next = None
    if d_z_next is not None:
        if ctx.needs_input_grad[4]:
            d_M_next = _ops.matrix_grad(d_z_next, x_next, M_next.dtype)                # Σ_b dz'_b x'_bᵀ
        if need_upstream:
            d_x_next = _ops.transposed_apply(M_next, d_z_next, d_x_next)               # dx' + M'ᵀ dz'
    d_z, d_R, d_x = _reconstruct_grads(ctx, d_x_next, z, R, keep_mask) if need_upstream else (None,) * 3
    return d_z, d_R, d_x, None, d_M_next


def _register_autograd() -> None:
    for name, backward, setup_context in (
        ("merge_fwd", _merge_backward, _merge_setup_context),
        ("reconstruct_fwd", _reconstruct_backward, _reconstruct_setup_context),
        ("reconstruct_merge_fwd", _reconstruct_merge_backward, _reconstruct_merge_setup_context),
    ):
        qualname = f"pm_kernels::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            continue  # already registered (module reloaded)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)


_register_autograd()


# ---- the functions pm_kernels.token_ops calls (backend "cuda") -------------------------------------------

def merge(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """z = M x: x (B, N, C), M (K, N) → (B, K, C) in x's dtype."""
    return _ops.merge_fwd(x, M)


def reconstruct(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """x' = R z + (1 − keep_mask) ⊙ x → (B, N, C) in x's dtype."""
    return _ops.reconstruct_fwd(z, R, x, keep_mask)


def reconstruct_merge(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor,
                      M_next: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block boundary in one op: (x', z') with x' = R z + (1 − m) ⊙ x and z' = M_next x'."""
    x_next, z_next = _ops.reconstruct_merge_fwd(z, R, x, keep_mask, M_next)
    return x_next, z_next
