"""``pm_kernels.attention``: attention that can emit the gradient-weighted token score (SPEC §3).

With ``score`` given, the backward pass adds Σ_{b,h,q} P ⊙ dP per key into it (signed, un-normalised);
``calibrate`` turns that into the SPEC §3 score. Without ``score`` it is plain attention.

The Triton kernels and the torch math that computes a score both run inside two ``torch.library`` custom ops,
``pm_kernels::attention_fwd`` (→ out, lse) and ``pm_kernels::attention_bwd`` (→ dq, dk, dv; mutates
``score``), tied by ``register_autograd`` and given fake implementations, so ``torch.compile(fullgraph=True)``
traces a model calling ``attention`` without a graph break. The torch backend without a score is SDPA (which
also runs attention dropout). Which backend runs is ``pm_kernels.dispatch``'s decision.
"""
import math
from typing import FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .reference import _compute_dtype, attention_backward_reference, attention_forward_reference

__all__ = ["attention", "attention_features", "run_attention", "attention_forward_flops", "attention_backward_flops"]


def _check_inputs(q, k, v, scale, score, dropout_p):
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
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        try:
            ok = math.isfinite(scale) and scale > 0  # NaN fails both
        except OverflowError:  # an int beyond the float range
            ok = False
        if not ok:
            raise ValueError(f"scale: expected a finite float > 0 (or None for head_dim ** -0.5), got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")


def attention_features(score: Optional[torch.Tensor], dropout_p: float) -> FrozenSet[str]:
    """What a call needs of a backend (``dispatch.CAPABILITIES`` features): "score", "dropout", not both."""
    if score is None:
        return _DROPOUT if dropout_p > 0 else _PLAIN
    if dropout_p > 0:
        raise ValueError("score: the calibration score needs attention dropout off (dropout_p=0, model.eval())")
    return _SCORE


_PLAIN, _SCORE, _DROPOUT = frozenset(), frozenset({"score"}), frozenset({"dropout"})


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
    return attention_backward_reference(grad_out, q, k, v, out, lse, scale, score)


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
              score: Optional[torch.Tensor] = None, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q, k, v of shape (B, H, N, D); returns (B, H, N, D).

    score: optional float32 (N,) tensor; the backward pass **adds** Σ_{b,h,q} P[q,k]·dP[q,k] to it.
    scale: finite and > 0, defaults to D ** -0.5. dropout_p: attention-probability dropout (torch backend only;
    no score).
    backend: "auto" (Triton on CUDA tensors where it supports the input, else torch), "triton"
    (fp32/fp16/bf16, head dim 32, 64 or 128; CUDA tensors, or CPU under TRITON_INTERPRET=1) or "torch".
    q, k, v may be strided views (e.g. timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``): no copy is made.

    inf / NaN in q, k, v propagate the same way on every backend (docs/architecture.md, "Non-finite input"):
    P = exp(S − logsumexp(S)) row by row, so a +inf logit gives P = NaN at its key only (and a NaN output row),
    a row of all −inf logits a NaN row. Exception: the torch backend without a score (SDPA) gives 0 for the
    latter.
    """
    _check_inputs(q, k, v, scale, score, dropout_p)
    name = dispatch.select("attention", backend, q.device, q.dtype, head_dim=q.shape[-1],
                           features=attention_features(score, dropout_p), arg="q")
    return run_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale), score, dropout_p, name)


def run_attention(q, k, v, scale: float, score: Optional[torch.Tensor], dropout_p: float, name: str):
    """``attention`` on the resolved backend ``name``, no checks (callers that resolved it once call this)."""
    if name == "torch" and score is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return _attention_fwd(q, k, v, scale, score, name)[0]


# ------------------------------------------------------------------------------------------- FLOPs
# torch.utils.flop_counter lacks formulas for these ops and for torch's CPU SDPA kernel: without them attention
# counts as 0 FLOPs. Convention (torch's): 2 FLOPs per multiply-add; forward QKᵀ and PV, 4·B·H·N²·D; backward
# dV, dP, dQ, dK, 8·B·H·N²·D (the recomputation of P is not counted, as torch does for its own kernels).

def attention_forward_flops(q_shape) -> int:
    return 4 * math.prod(q_shape[:-1]) * q_shape[-2] * q_shape[-1]


def attention_backward_flops(q_shape) -> int:
    return 2 * attention_forward_flops(q_shape)


def _register_flops(op_names, count):
    for name in op_names:
        namespace, op = name.split("::")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is None:  # an op this torch does not have
            continue

        @register_flop_formula(packet)
        def _formula(*shapes, out_shape=None, **kwargs):
            return count(shapes[0])


_register_flops(("pm_kernels::attention_fwd", "aten::_scaled_dot_product_flash_attention_for_cpu"),
                attention_forward_flops)
# The backward ops take grad_out first; its shape equals q's.
_register_flops(("pm_kernels::attention_bwd", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
                attention_backward_flops)
