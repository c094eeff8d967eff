"""The tests' own ground truth: every op as a float64 einsum / loop formula, written from SPEC §1 and §3.

``pm_kernels.reference`` is what the torch backend runs, so a torch-backend test that compares with it compares
the reference with itself. These formulas share no code with it: einsum instead of matmul, a loop over tokens
instead of the (1 − m) mask product, an explicit softmax, and the score read off ``A ⊙ ∂L/∂A`` with autograd
(the authors' hook) instead of the hand-written backward. Everything is computed in float64 on the inputs as
given (round them to the tested dtype first); results are float64.
"""
from typing import Optional, Tuple

import torch

__all__ = ["merge", "reconstruct", "reconstruct_merge", "attention", "attention_with_grads", "attention_ieee",
           "rel_pos_bias", "biased_attention_with_grads", "biased_attention_ieee"]


def merge(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """z[b, k, c] = Σ_n M[k, n] · x[b, n, c]."""
    return torch.einsum("kn,bnc->bkc", M.double(), x.double())


def reconstruct(z: torch.Tensor, R: torch.Tensor, x: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """x'[b, n] = Σ_k R[n, k] · z[b, k], plus x[b, n] itself for each pruned token n (keep_mask[n] False) and
    0 · x[b, n] for each kept one: 0 for finite x, NaN where x is not (docs/architecture.md, non-finite input)."""
    spread = torch.einsum("nk,bkc->bnc", R.double(), z.double())
    rows = [spread[:, n] + (0.0 if kept else 1.0) * x[:, n].double() for n, kept in enumerate(keep_mask.tolist())]
    return torch.stack(rows, dim=1)


def reconstruct_merge(z, R, x, keep_mask, M_next) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', M_next x'): the block boundary as two separate formulas."""
    x_next = reconstruct(z, R, x, keep_mask)
    return x_next, merge(x_next, M_next)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None):
    """(out, A): A = softmax(q kᵀ · scale) over keys, written out; out = A v. q, k, v: (B, H, N, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    A = e / e.sum(dim=-1, keepdim=True)
    return torch.einsum("bhqk,bhkd->bhqd", A, v.double()), A


def attention_with_grads(q, k, v, grad_out, scale: Optional[float] = None):
    """(out, dq, dk, dv, score) for the loss ⟨out, grad_out⟩; score[k] = Σ_{b,h,q} A ⊙ ∂L/∂A (SPEC §3)."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, A = attention(qd, kd, vd, scale)
    A.retain_grad()
    out.backward(grad_out.double())
    score = (A * A.grad).sum(dim=(0, 1, 2))
    return out.detach(), qd.grad, kd.grad, vd.grad, score.detach()


def attention_ieee(q, k, v, grad_out, scale: float):
    """(out, dq, dk, dv, score) as docs/architecture.md defines them for any input, inf and NaN included:
    ``biased_attention_ieee`` without a bias."""
    return biased_attention_ieee(q, k, v, grad_out, scale)[:5]


def rel_pos_bias(bias_h, bias_w, key_h, key_w) -> torch.Tensor:
    """SAM's decomposed relative-position bias for keys at arbitrary grid positions, float64 (B, H, N, N), one key
    column at a time: bias[b, h, i, j] = bias_h[b, h, i, key_h[j]] + bias_w[b, h, i, key_w[j]] (key_* of shape
    (N,), or (B, N): one row of positions per batch element)."""
    B, H, N, _ = bias_h.shape
    rows_h, rows_w = key_h.expand(B, N).tolist(), key_w.expand(B, N).tolist()
    columns = [torch.stack([bias_h[b, :, :, rows_h[b][j]].double() + bias_w[b, :, :, rows_w[b][j]].double()
                            for b in range(B)]) for j in range(N)]
    return torch.stack(columns, dim=-1)


def biased_attention_with_grads(q, k, v, grad_out, scale: float, bias=None, bias_h=None, bias_w=None, key_h=None,
                                key_w=None):
    """(out, dq, dk, dv, d_bias, d_bias_h, d_bias_w, score) of softmax(q kᵀ · scale + bias + rel_pos_bias) v for the
    loss ⟨out, grad_out⟩, by autograd in float64; the bias gradients None where that bias is None."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (bias, bias_h, bias_w)]
    logits = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    if leaves[0] is not None:
        logits = logits + leaves[0]
    if leaves[1] is not None:
        logits = logits + rel_pos_bias(leaves[1], leaves[2], key_h.cpu(), key_w.cpu())
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    A = e / e.sum(dim=-1, keepdim=True)
    A.retain_grad()
    out = torch.einsum("bhqk,bhkd->bhqd", A, vd)
    out.backward(grad_out.double())
    score = (A * A.grad).sum(dim=(0, 1, 2))
    return (out.detach(), qd.grad, kd.grad, vd.grad, *(None if t is None else t.grad for t in leaves),
            score.detach())


def biased_attention_ieee(q, k, v, grad_out, scale: float, bias=None, bias_h=None, bias_w=None, key_h=None,
                          key_w=None):
    """(out, dq, dk, dv, score, d_bias, d_bias_h, d_bias_w) as docs/architecture.md defines them for any input, inf
    and NaN included (the bias gradients None without that bias).

    S = q kᵀ · scale + bias + rel_pos_bias (the tables read only at the indexed entries), P = exp(S − L) with L
    the row log-sum-exp shifted by the row max where that max is finite, by 0 where it is ±inf (so L = +inf with
    a +inf logit, −inf for a row of all −inf, NaN with a NaN); the backward written out from P: dP = dO vᵀ,
    dS = P ⊙ (dP − Δ) with Δ = Σ_d dO ⊙ O (FlashAttention's row term, equal to Σ_k P ⊙ dP on finite input),
    score[k] = Σ_{b,h,q} P ⊙ dP; d bias = dS summed over bias's broadcast dims, d bias_h = dS · onehot(key_h) (a
    matrix product: every product counts, 0 · inf = NaN). ``attention`` above (e / Σ e) agrees on finite input
    only: a +inf logit makes its whole row of A NaN.
    """
    qd, kd, vd, do = (t.detach().double() for t in (q, k, v, grad_out))
    S = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    if bias is not None:
        S = S + bias.detach().double()
    if bias_h is not None:
        S = S + rel_pos_bias(bias_h.detach(), bias_w.detach(), key_h.cpu(), key_w.cpu())
    top = S.amax(dim=-1, keepdim=True)
    shift = torch.where(top.isinf(), torch.zeros_like(top), top)
    L = shift + torch.exp(S - shift).sum(dim=-1, keepdim=True).log()
    P = torch.exp(S - L)
    out = torch.einsum("bhqk,bhkd->bhqd", P, vd)
    dP = torch.einsum("bhqd,bhkd->bhqk", do, vd)
    dS = P * (dP - (do * out).sum(dim=-1, keepdim=True))
    d_bias = d_bias_h = d_bias_w = None
    if bias is not None:
        d_bias = dS
        for dim in (0, 1):  # one dim at a time: sum(dim=[]) would sum over every dim
            if bias.shape[dim] == 1:
                d_bias = d_bias.sum(dim=dim, keepdim=True)
    if bias_h is not None:
        B, N = q.shape[0], q.shape[2]
        one_hot_h = torch.eye(bias_h.shape[-1], dtype=torch.float64)[key_h.cpu().expand(B, N)]  # (B, N, Gh)
        one_hot_w = torch.eye(bias_w.shape[-1], dtype=torch.float64)[key_w.cpu().expand(B, N)]
        d_bias_h = torch.einsum("bhqk,bkg->bhqg", dS, one_hot_h)
        d_bias_w = torch.einsum("bhqk,bkg->bhqg", dS, one_hot_w)
    return (out,
            torch.einsum("bhqk,bhkd->bhqd", dS, kd) * scale,
            torch.einsum("bhqk,bhqd->bhkd", dS, qd) * scale,
            torch.einsum("bhqk,bhqd->bhkd", P, do),
            (P * dP).sum(dim=(0, 1, 2)),
            d_bias, d_bias_h, d_bias_w)
