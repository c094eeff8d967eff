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
    "attention_backward_logits_reference",
    "attention_bias_reference",
    "rel_pos_bias_reference",
    "rel_pos_bias_backward_reference",
    "merge_reference",
    "reconstruct_reference",
    "reconstruct_merge_reference",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are computed in fp32 so the reference is the accurate side of a comparison.
    return torch.promote_types(dtype, torch.float32)


def _positions_one_hot(key, size: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot matrix of key position indices: (N,) → (1, 1, N, size), (B, N) → (B, 1, N, size)."""
    one_hot = torch.nn.functional.one_hot(key, size).to(dtype)
    return one_hot.unsqueeze(0).unsqueeze(0) if key.dim() == 1 else one_hot.unsqueeze(1)


def _gather_positions(table: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """out[b, h, i, j] = table[b, h, i, key[(b,) j]]: (B, H, N, G) → (B, H, N, N)."""
    B, H, N, _ = table.shape
    index = key.view(-1, 1, 1, key.shape[-1]).expand(B, H, N, key.shape[-1])
    return torch.gather(table, -1, index)


def rel_pos_bias_backward_reference(d_bias: torch.Tensor, key_h, key_w, size_h: int, size_w: int):
    """(d bias_h, d bias_w) from the gradient ``d_bias`` (B, H, N, N) of the materialised decomposed bias: the
    products d_bias · onehot(key_h) and d_bias · onehot(key_w), every product counting (0 · inf = NaN), as the
    Triton kernel forms them."""
    return (d_bias @ _positions_one_hot(key_h, size_h, d_bias.dtype),
            d_bias @ _positions_one_hot(key_w, size_w, d_bias.dtype))


def rel_pos_bias_reference(bias_h, bias_w, key_h, key_w) -> torch.Tensor:
    """bias[b, h, i, j] = bias_h[b, h, i, key_h[j]] + bias_w[b, h, i, key_w[j]] (key_* of shape (N,) or (B, N)),
    gathered into (B, H, N, N) in bias_h's dtype: only the indexed entries of the tables are read."""
    return _gather_positions(bias_h, key_h) + _gather_positions(bias_w, key_w)


class _RelPosBias(torch.autograd.Function):
    """``rel_pos_bias_reference`` whose backward is the one-hot product (not the scatter-add of gather's)."""

    @staticmethod
    def forward(ctx, bias_h, bias_w, key_h, key_w):
        ctx.save_for_backward(key_h, key_w)
        ctx.sizes = bias_h.shape[-1], bias_w.shape[-1]
        return rel_pos_bias_reference(bias_h, bias_w, key_h, key_w)

    @staticmethod
    def backward(ctx, d_bias):
        key_h, key_w = ctx.saved_tensors
        d_h, d_w = rel_pos_bias_backward_reference(d_bias, key_h, key_w, *ctx.sizes)
        return d_h, d_w, None, None


def attention_bias_reference(bias, bias_h, bias_w, key_h, key_w,
                             dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """The whole additive logit bias, broadcastable to (B, H, N, N): ``bias`` plus the decomposed relative-position
    bias (either may be None; None when there is neither), summed in ``dtype`` (default: the inputs' own; the
    compute dtype where it matters that half inputs are not rounded after the sum, as the kernels do not),
    differentiable w.r.t. bias, bias_h and bias_w with the gradients the kernels give (the one-hot product for the
    tables)."""
    if dtype is not None:
        bias, bias_h, bias_w = (None if t is None else t.to(dtype) for t in (bias, bias_h, bias_w))
    if bias_h is None:
        return bias
    rel_pos = _RelPosBias.apply(bias_h, bias_w, key_h, key_w)
    return rel_pos if bias is None else rel_pos + bias


def attention_forward_reference(q, k, v, scale: float,
                                bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out = softmax(q kᵀ · scale + bias) v in q's dtype, lse the fp32+ log-sum-exp of each query row.
    ``bias``: None or broadcastable to (B, H, N, N), added in the compute dtype."""
    cdt = _compute_dtype(q.dtype)
    logits = (q.to(cdt) @ k.to(cdt).transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.to(cdt)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.exp(logits - lse.unsqueeze(-1)) @ v.to(cdt)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def attention_backward_reference(grad_out, q, k, v, out, lse, scale: float, score: Optional[torch.Tensor]):
    """(dq, dk, dv), P recomputed from the LSE; adds Σ_{b,h,q} P ⊙ dP per key into ``score`` when given.

    The row term of dS is Δ = rowsum(dO ⊙ O) (``out`` as the forward returned it), as FlashAttention and SDPA
    compute it: equal to rowsum(P ⊙ dP) on finite input, and the same inf / NaN as those kernels otherwise."""
    return attention_backward_logits_reference(grad_out, q, k, v, out, lse, scale, score)[:3]


def attention_backward_logits_reference(grad_out, q, k, v, out, lse, scale: float, score: Optional[torch.Tensor],
                                        bias: Optional[torch.Tensor] = None):
    """``attention_backward_reference`` with a logit ``bias`` (as the forward had it): (dq, dk, dv, dS), dS the
    gradient of the logits (B, H, N, N) in the compute dtype, which is the gradient of any additive bias."""
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc, d_out = q.to(cdt), k.to(cdt), v.to(cdt), grad_out.to(cdt)
    logits = (qc @ kc.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.to(cdt)
    probs = torch.exp(logits - lse.to(cdt).unsqueeze(-1))
    d_probs = d_out @ vc.transpose(-2, -1)                                   # dP = dO Vᵀ
    d_v = probs.transpose(-2, -1) @ d_out                                    # dV = Pᵀ dO
    delta = (d_out * out.to(cdt)).sum(-1, keepdim=True)                      # Δ = rowsum(dO ⊙ O)
    d_logits = probs * (d_probs - delta)                                     # dS = P ⊙ (dP − Δ)
    d_q = (d_logits @ kc) * scale
    d_k = (d_logits.transpose(-2, -1) @ qc) * scale
    if score is not None:
        # Gradient-weighted attention score (SPEC §3): A ⊙ dA = P ⊙ dP, summed over b, h, q.
        score.add_((probs * d_probs).sum(dim=(0, 1, 2)).to(score.dtype))
    return (d_q.to(q.dtype).contiguous(), d_k.to(k.dtype).contiguous(), d_v.to(v.dtype).contiguous(), d_logits)


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
