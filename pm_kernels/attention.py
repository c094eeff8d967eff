"""``pm_kernels.attention``: attention that can emit the gradient-weighted token score (SPEC §3).

With ``score`` given, the backward pass adds Σ_{b,h,q} P ⊙ dP per key into it (signed, un-normalised);
``calibrate`` turns that into the SPEC §3 score. Without ``score`` it is plain attention.

The Triton kernels and the torch math that computes a score both run inside two ``torch.library`` custom ops,
``pm_kernels::attention_fwd`` (→ out, lse) and ``pm_kernels::attention_bwd`` (→ dq, dk, dv; mutates
``score``), tied by ``register_autograd`` and given fake implementations, so ``torch.compile(fullgraph=True)``
traces a model calling ``attention`` without a graph break. The torch backend without a score is SDPA.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .dispatch import select as _select_backend
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .reference import _compute_dtype, attention_backward_reference, attention_forward_reference

__all__ = ["attention"]

# Backends in the order "auto" tries them; the compiled extension has no attention kernel.
_SUPPORTED = ("triton", "torch")
# What the Triton kernels handle (pm_kernels/kernels/attention_triton.py); "auto" falls back to torch otherwise.
TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q, k, v, scale, score):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, what="shape (B, H, N, D)")
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), shape=tuple(q.shape),
                 what=f"shape {tuple(q.shape)} like q")
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), shape=tuple(q.shape),
                 what=f"shape {tuple(q.shape)} like q")
    if score is not None:
        n = q.shape[2]
        check_tensor("score", score, ndim=1, dtypes=(torch.float32,), shape=(n,),
                     what=f"a float32 tensor of shape ({n},) (one entry per key)")
    check_same_device(q=q, k=k, v=v, score=score)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")


def triton_supports(q: torch.Tensor) -> bool:
    return q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS


def check_triton_inputs(q: torch.Tensor) -> None:
    """Raise ValueError unless the Triton kernels support q's dtype and head dim (k, v are checked like q)."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q: the triton attention backend supports dtypes float32, float16, bfloat16, "
                         f"got {str(q.dtype).replace('torch.', '')} (use backend='torch')")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"q: the triton attention backend supports head dims "
                         f"{', '.join(map(str, TRITON_HEAD_DIMS))}, got {q.shape[-1]} (use backend='torch')")


# ------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("pm_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   score: Optional[torch.Tensor], backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,N,D), lse (B,H,N)); ``score`` is only carried to the backward."""
    if backend == "triton":
        from .kernels.attention_triton import attention_fwd
        return attention_fwd(q, k, v, scale)
    return attention_forward_reference(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale, score, backend):
    B, H, N, D = q.shape
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_compute_dtype(q.dtype)))


@torch.library.custom_op("pm_kernels::attention_bwd", mutates_args=("score",))
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float, score: Optional[torch.Tensor],
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); adds Σ_{b,h,q} P ⊙ dP per key into ``score`` when given."""
    if backend == "triton":
        from .kernels.attention_triton import attention_bwd
        return attention_bwd(grad_out, q, k, v, out, lse, scale, score)
    return attention_backward_reference(grad_out, q, k, v, lse, scale, score)


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, score, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, score, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.score = score
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.score, ctx.backend)
    return dq, dk, dv, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- public op

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              score: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q, k, v of shape (B, H, N, D); returns (B, H, N, D).

    score: optional float32 (N,) tensor; the backward pass **adds** Σ_{b,h,q} P[q,k]·dP[q,k] to it.
    scale: defaults to D ** -0.5.
    backend: "auto" (Triton where it can run and supports the dtype / head dim, else torch), "triton"
    (fp32/fp16/bf16, head dim 32, 64 or 128; CUDA tensors, or CPU under TRITON_INTERPRET=1) or "torch".
    q, k, v may be strided views (e.g. timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``): no copy is made.
    """
    _check_inputs(q, k, v, scale, score)
    name = _select_backend(backend, q.device, _SUPPORTED, auto_order=_SUPPORTED)
    if name == "triton":
        if backend == "auto" and not triton_supports(q):
            name = "torch"
        else:
            check_triton_inputs(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if name == "torch" and score is None:
        return F.scaled_dot_product_attention(q, k, v, scale=float(scale))
    return _attention_fwd(q, k, v, float(scale), score, name)[0]
