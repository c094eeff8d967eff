"""Pure-PyTorch reference of every pm_kernels op.

This file is the ground truth: every Triton / CUDA kernel is tested against it, and the
``backend="torch"`` path runs it. It favours readability over speed, and takes no
input checks (the public ops in ``pm_kernels.attention`` / ``pm_kernels.token_ops`` do).

Shapes: ``x`` (B, N, C) all tokens, ``z`` (B, K, C) merged tokens, ``M`` (K, N),
``R`` (N, K), ``keep_mask`` bool (N,) with True = kept, False = pruned.
M and R are cast to the activation dtype, as autocast would do for a matmul.
inf / NaN propagate as IEEE arithmetic does in these formulas; every backend follows (docs/architecture.md).
"""
from typing import Optional, Tuple

import torch

__all__ = [
    "attention_reference",
    "attention_forward_reference",
    "attention_backward_reference",
    "merge_reference",
    "reconstruct_reference",
    "reconstruct_merge_reference",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are computed in fp32 so the reference is the accurate side of a comparison.
    return torch.promote_types(dtype, torch.float32)


def attention_forward_reference(q, k, v, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out = softmax(q kᵀ · scale) v in q's dtype, lse the fp32+ log-sum-exp of each query row."""
    cdt = _compute_dtype(q.dtype)
    logits = (q.to(cdt) @ k.to(cdt).transpose(-2, -1)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.exp(logits - lse.unsqueeze(-1)) @ v.to(cdt)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def attention_backward_reference(grad_out, q, k, v, out, lse, scale: float, score: Optional[torch.Tensor]):
    """(dq, dk, dv), P recomputed from the LSE; adds Σ_{b,h,q} P ⊙ dP per key into ``score`` when given.

    The row term of dS is Δ = rowsum(dO ⊙ O) (``out`` as the forward returned it), as FlashAttention and SDPA
    compute it: equal to rowsum(P ⊙ dP) on finite input, and the same inf / NaN as those kernels otherwise."""
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc, d_out = q.to(cdt), k.to(cdt), v.to(cdt), grad_out.to(cdt)
    probs = torch.exp((qc @ kc.transpose(-2, -1)) * scale - lse.to(cdt).unsqueeze(-1))
    d_probs = d_out @ vc.transpose(-2, -1)                                   # dP = dO Vᵀ
    d_v = probs.transpose(-2, -1) @ d_out                                    # dV = Pᵀ dO
    delta = (d_out * out.to(cdt)).sum(-1, keepdim=True)                      # Δ = rowsum(dO ⊙ O)
    d_logits = probs * (d_probs - delta)                                     # dS = P ⊙ (dP − Δ)
    d_q = (d_logits @ kc) * scale
    d_k = (d_logits.transpose(-2, -1) @ qc) * scale
    if score is not None:
        # Gradient-weighted attention score (SPEC §3): A ⊙ dA = P ⊙ dP, summed over b, h, q.
        score.add_((probs * d_probs).sum(dim=(0, 1, 2)).to(score.dtype))
    return d_q.to(q.dtype).contiguous(), d_k.to(k.dtype).contiguous(), d_v.to(v.dtype).contiguous()


class _AttentionWithScore(torch.autograd.Function):
    """Attention whose backward adds Σ_{b,h,q} P ⊙ dP per key into ``score``."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, score: Optional[torch.Tensor]):
        out, lse = attention_forward_reference(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.score = scale, score
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward_reference(grad_out, q, k, v, out, lse, ctx.scale, ctx.score), None, None)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    score: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over (B, H, N, D) inputs; ``score`` (N,) float32 is added to in backward."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _AttentionWithScore.apply(q, k, v, float(scale), score)


def merge_reference(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """z = M @ x: (K, N) × (B, N, C) → (B, K, C)."""
    return torch.matmul(M.to(x.dtype), x)


def reconstruct_reference(
    z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor
) -> torch.Tensor:
    """out = R @ z + (1 − m) ⊙ x: merged tokens spread back, pruned tokens pass by the shortcut."""
    pruned = (~keep_mask).to(x.dtype).unsqueeze(-1)  # (N, 1), broadcast over B and C
    return torch.matmul(R.to(z.dtype), z) + pruned * x


def reconstruct_merge_reference(
    z: torch.Tensor,
    R: torch.Tensor,
    x: torch.Tensor,
    keep_mask: torch.Tensor,
    M_next: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block boundary: x' = R z + (1 − m) ⊙ x, then z' = M_next x'. Returns (x', z')."""
    x_next = reconstruct_reference(z, R, x, keep_mask)
    return x_next, merge_reference(x_next, M_next)
