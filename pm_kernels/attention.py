"""``pm_kernels.attention``: attention that can emit the gradient-weighted token score (SPEC §3).

With ``score`` given, the backward pass adds Σ_{b,h,q} P ⊙ dP per key into it (signed, un-normalised);
``calibrate`` turns that into the SPEC §3 score. Without ``score`` it is plain attention.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import backends as _backends
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .reference import attention_reference

__all__ = ["attention"]

# Backends in the order "auto" tries them; the compiled extension has no attention kernel.
_SUPPORTED = ("triton", "torch")


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              score: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q, k, v of shape (B, H, N, D); returns (B, H, N, D).

    score: optional float32 (N,) tensor; the backward pass **adds** Σ_{b,h,q} P[q,k]·dP[q,k] to it.
    scale: defaults to D ** -0.5.
    """
    _check_inputs(q, k, v, scale, score)
    name = _backends.select(backend, q.device, _SUPPORTED, auto_order=_SUPPORTED)
    if name == "triton":
        from .kernels.attention_triton import triton_attention
        return triton_attention(q, k, v, scale=scale, score=score)
    if score is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_reference(q, k, v, scale=scale, score=score)
