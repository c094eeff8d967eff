"""``pm_kernels.attention``: attention that can emit the gradient-weighted token score (SPEC §3), with an optional
additive logit bias (SAM's decomposed relative-position bias, or a general one).

With ``score`` given, the backward pass adds Σ_{b,h,q} P ⊙ dP per key into it (signed, un-normalised);
``calibrate`` turns that into the SPEC §3 score. Without ``score`` it is plain attention.

The Triton kernels and the torch math that computes a score both run inside two ``torch.library`` custom ops,
``pm_kernels::attention_fwd`` (→ out, lse) and ``pm_kernels::attention_bwd`` (→ dq, dk, dv and the bias gradients;
mutates ``score``), tied by ``register_autograd`` and given fake implementations, so ``torch.compile(fullgraph=True)``
traces a model calling ``attention`` without a graph break. The torch backend without a score is SDPA (which
also runs attention dropout; a bias is handed to it materialised, as ``attn_mask``). Which backend runs is
``pm_kernels.dispatch``'s decision.

The decomposed relative-position bias (SAM / MViTv2, timm's ``get_decomposed_rel_pos_bias``) is taken as two
per-query tables and per-key position indices, bias[b,h,i,j] = bias_h[b,h,i,key_h[j]] + bias_w[b,h,i,key_w[j]],
and not as the (B, H, N, N) tensor it expands to, because:

- after Prune and Merge the tokens are K merged tokens at arbitrary grid positions (each its centre token's
  (h, w)), so the bias is no longer SAM's (h_q, w_q, h_k, w_k) grid product; indices per key express any positions;
- the kernels gather it per tile from the query rows' tables (B·H·N·(Gh + Gw) values, G the grid side: 14 in a
  window, 64 in SAM's global blocks) instead of reading B·H·N² values, and form d bias_h / d bias_w in the backward
  as a product with the keys' one-hot matrix, with no N×N tensor in memory;
- the tables bias_h = q · Rh[h_q − ·] are ordinary torch ops of the caller (q unscaled, as SAM has it), so autograd
  carries d bias_h on to q and to the relative-position parameters.
"""
import math
from typing import FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .reference import (_compute_dtype, attention_backward_logits_reference, attention_bias_reference,
                        attention_forward_reference, rel_pos_bias_backward_reference)

__all__ = ["attention", "attention_features", "run_attention", "attention_forward_flops", "attention_backward_flops"]

_REL_POS_ARGS = ("bias_h", "bias_w", "key_h", "key_w")


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


def _check_bias(q, bias, bias_h, bias_w, key_h, key_w):
    """The additive bias arguments of ``attention`` (q already checked)."""
    B, H, N, _ = q.shape
    if bias is not None:
        check_tensor("bias", bias, ndim=4, dtypes=(q.dtype,), what=f"shape (B|1, H|1, N, N) = ({B}|1, {H}|1, {N}, {N})")
        if bias.shape[0] not in (1, B) or bias.shape[1] not in (1, H) or tuple(bias.shape[2:]) != (N, N):
            raise ValueError(f"bias: expected shape (B|1, H|1, N, N) = ({B}|1, {H}|1, {N}, {N}), "
                             f"got shape {tuple(bias.shape)}")
    rel_pos = dict(zip(_REL_POS_ARGS, (bias_h, bias_w, key_h, key_w)))
    given = [name for name, t in rel_pos.items() if t is not None]
    if given and len(given) < len(rel_pos):
        missing = [name for name in rel_pos if name not in given]
        raise ValueError(f"{', '.join(missing)}: the decomposed bias needs bias_h, bias_w, key_h and key_w together, "
                         f"got only {', '.join(given)}")
    if given:
        for name, table in (("bias_h", bias_h), ("bias_w", bias_w)):
            check_tensor(name, table, ndim=4, dtypes=(q.dtype,), shape=(B, H, N, None),
                         what=f"shape (B, H, N, G) = ({B}, {H}, {N}, G), one row per query and grid position")
            if table.shape[3] == 0:
                raise ValueError(f"{name}: expected at least one grid position (G >= 1), got shape "
                                 f"{tuple(table.shape)}")
        check_tensor("key_h", key_h, dtypes=(torch.int64,))
        if tuple(key_h.shape) not in ((N,), (B, N)):
            raise ValueError(f"key_h: expected shape ({N},) or ({B}, {N}) (a grid row per key), "
                             f"got shape {tuple(key_h.shape)}")
        check_tensor("key_w", key_w, dtypes=(torch.int64,), shape=tuple(key_h.shape),
                     what=f"shape {tuple(key_h.shape)} like key_h")
    check_same_device(q=q, bias=bias, **rel_pos)
    if given and N > 0 and not torch.compiler.is_compiling() and key_h.device.type != "meta":
        # A data-dependent check (one device sync): skipped while tracing, where the kernels read no table entry out
        # of range but give a NaN logit at that key instead (the torch backend's gather raises).
        for name, key, size in (("key_h", key_h, bias_h.shape[3]), ("key_w", key_w, bias_w.shape[3])):
            low, high = (int(x) for x in torch.aminmax(key))
            if low < 0 or high >= size:
                table = "bias_h" if name == "key_h" else "bias_w"
                raise ValueError(f"{name}: expected indices in [0, {size}) ({table}'s last dim), "
                                 f"got values in [{low}, {high}]")


def attention_features(score: Optional[torch.Tensor], dropout_p: float, bias: bool = False,
                       rel_pos_bias: bool = False) -> FrozenSet[str]:
    """What a call needs of a backend (``dispatch.CAPABILITIES`` features): "score", "dropout" (not both),
    "bias" (a general additive bias), "rel_pos_bias" (the decomposed relative-position bias)."""
    if score is None:
        plain = _DROPOUT if dropout_p > 0 else _PLAIN
    elif dropout_p > 0:
        raise ValueError("score: the calibration score needs attention dropout off (dropout_p=0, model.eval())")
    else:
        plain = _SCORE
    if not (bias or rel_pos_bias):
        return plain
    return plain | {name for name, on in (("bias", bias), ("rel_pos_bias", rel_pos_bias)) if on}


_PLAIN, _SCORE, _DROPOUT = frozenset(), frozenset({"score"}), frozenset({"dropout"})


# ------------------------------------------------------------------------------------- custom ops

@torch.library.custom_op("pm_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   score: Optional[torch.Tensor], bias: Optional[torch.Tensor], bias_h: Optional[torch.Tensor],
                   bias_w: Optional[torch.Tensor], key_h: Optional[torch.Tensor], key_w: Optional[torch.Tensor],
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B,H,N,D), lse (B,H,N)); ``score`` is only carried to the backward."""
    if backend == "triton":
        from .kernels.attention_triton import attention_fwd
        return attention_fwd(q, k, v, scale, bias, bias_h, bias_w, key_h, key_w)
    total_bias = attention_bias_reference(bias, bias_h, bias_w, key_h, key_w, _compute_dtype(q.dtype))
    return attention_forward_reference(q, k, v, scale, total_bias)


@_attention_fwd.register_fake
def _(q, k, v, scale, score, bias, bias_h, bias_w, key_h, key_w, backend):
    B, H, N, D = q.shape
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_compute_dtype(q.dtype)))


@torch.library.custom_op("pm_kernels::attention_bwd", mutates_args=("score",))
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, scale: float, score: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], bias_h: Optional[torch.Tensor], bias_w: Optional[torch.Tensor],
                   key_h: Optional[torch.Tensor], key_w: Optional[torch.Tensor], bias_grad: bool,
                   rel_pos_grad: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d bias, d bias_h, d bias_w); adds Σ_{b,h,q} P ⊙ dP per key into ``score`` when given. The bias
    gradients are empty tensors unless asked for (``bias_grad``, ``rel_pos_grad``)."""
    if backend == "triton":
        from .kernels.attention_triton import attention_bwd
        dq, dk, dv, d_logits, d_h, d_w = attention_bwd(grad_out, q, k, v, out, lse, scale, score, bias, bias_h,
                                                       bias_w, key_h, key_w, bias_grad, rel_pos_grad)
    else:
        total_bias = attention_bias_reference(bias, bias_h, bias_w, key_h, key_w, _compute_dtype(q.dtype))
        dq, dk, dv, d_logits = attention_backward_logits_reference(grad_out, q, k, v, out, lse, scale, score,
                                                                   total_bias)
        if rel_pos_grad:
            d_h, d_w = rel_pos_bias_backward_reference(d_logits, key_h, key_w, bias_h.shape[3], bias_w.shape[3])
    d_bias = _sum_to_shape(d_logits, bias.shape).to(bias.dtype) if bias_grad else q.new_empty(0)
    if rel_pos_grad:
        return dq, dk, dv, d_bias, d_h.to(bias_h.dtype), d_w.to(bias_w.dtype)
    return dq, dk, dv, d_bias, q.new_empty(0), q.new_empty(0)  # separate empties: outputs may not alias


def _sum_to_shape(d_logits: torch.Tensor, shape) -> torch.Tensor:
    """The gradient of a bias broadcast from ``shape`` (B|1, H|1, N, N) to (B, H, N, N): summed over b and / or h."""
    dims = [i for i in (0, 1) if shape[i] == 1 and d_logits.shape[i] != 1]
    return d_logits.sum(dim=dims, keepdim=True) if dims else d_logits


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, score, bias, bias_h, bias_w, key_h, key_w, bias_grad, rel_pos_grad,
      backend):
    d_bias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    if rel_pos_grad:
        d_h, d_w = bias_h.new_empty(bias_h.shape), bias_w.new_empty(bias_w.shape)
    else:
        d_h, d_w = q.new_empty(0), q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_bias, d_h, d_w)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, score, bias, bias_h, bias_w, key_h, key_w, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, bias_h, bias_w, key_h, key_w)
    ctx.score = score
    ctx.scale = scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, bias, bias_h, bias_w, key_h, key_w = ctx.saved_tensors
    needs = ctx.needs_input_grad  # q, k, v, scale, score, bias, bias_h, bias_w, key_h, key_w, backend
    bias_grad = bias is not None and needs[5]
    rel_pos_grad = bias_h is not None and (needs[6] or needs[7])
    dq, dk, dv, d_bias, d_h, d_w = _attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.score, bias, bias_h,
                                                  bias_w, key_h, key_w, bias_grad, rel_pos_grad, ctx.backend)
    return (dq, dk, dv, None, None, d_bias if bias_grad else None, d_h if rel_pos_grad and needs[6] else None,
            d_w if rel_pos_grad and needs[7] else None, None, None, None)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- public op

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              score: Optional[torch.Tensor] = None, dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None,
              bias_h: Optional[torch.Tensor] = None, bias_w: Optional[torch.Tensor] = None,
              key_h: Optional[torch.Tensor] = None, key_w: Optional[torch.Tensor] = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v for q, k, v of shape (B, H, N, D); returns (B, H, N, D).

    score: optional float32 (N,) tensor; the backward pass **adds** Σ_{b,h,q} P[q,k]·dP[q,k] to it.
    scale: finite and > 0, defaults to D ** -0.5. dropout_p: attention-probability dropout (torch backend only;
    no score).
    bias: optional additive logit bias in q's dtype, shape (B|1, H|1, N, N) (a size-1 dim broadcasts); −inf
    masks a key out. Differentiable.
    bias_h, bias_w, key_h, key_w: the decomposed relative-position bias (SAM's image encoder), all four or none:
    bias[b,h,i,j] += bias_h[b,h,i,key_h[j]] + bias_w[b,h,i,key_w[j]], with bias_h (B, H, N, Gh) and bias_w
    (B, H, N, Gw) in q's dtype (per query: its dot product with the relative-position table row of every grid
    row / column, ``einsum(q, Rh[h_q])``) and key_h, key_w int64 of shape (N,) or (B, N) (each key's grid row and
    column, in [0, Gh) and [0, Gw); (B, N) when the batch holds windows with different token positions).
    Differentiable w.r.t. bias_h and bias_w; never materialised by the Triton backend. The module docstring says
    why this form.
    backend: "auto" (Triton on CUDA tensors where it supports the input, else torch), "triton"
    (fp32/fp16/bf16, head dim 32, 64 or 128; CUDA tensors, or CPU under TRITON_INTERPRET=1) or "torch".
    q, k, v may be strided views (e.g. timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``): no copy is made.

    inf / NaN in q, k, v and the bias propagate the same way on every backend (docs/architecture.md, "Non-finite
    input"): P = exp(S − logsumexp(S)) row by row, so a +inf logit gives P = NaN at its key only (and a NaN output
    row), a row of all −inf logits a NaN row. Exceptions: the torch backend without a score (SDPA) gives 0 for the
    latter, and with fp16 / bf16 on the CPU also for a row with a +inf logit (SDPA's CPU flash kernel).
    """
    _check_inputs(q, k, v, scale, score, dropout_p)
    _check_bias(q, bias, bias_h, bias_w, key_h, key_w)
    features = attention_features(score, dropout_p, bias is not None, bias_h is not None)
    name = dispatch.select("attention", backend, q.device, q.dtype, head_dim=q.shape[-1], features=features, arg="q")
    return run_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale), score, dropout_p, name,
                         bias=bias, bias_h=bias_h, bias_w=bias_w, key_h=key_h, key_w=key_w)


def run_attention(q, k, v, scale: float, score: Optional[torch.Tensor], dropout_p: float, name: str, *,
                  bias: Optional[torch.Tensor] = None, bias_h: Optional[torch.Tensor] = None,
                  bias_w: Optional[torch.Tensor] = None, key_h: Optional[torch.Tensor] = None,
                  key_w: Optional[torch.Tensor] = None):
    """``attention`` on the resolved backend ``name``, no checks (callers that resolved it once call this).

    The torch backend runs SDPA (the bias materialised as its ``attn_mask``) unless a score is asked for, or a bias
    needs a gradient without dropout: SDPA then runs its math kernel, whose softmax turns a whole row NaN for one
    +inf logit (docs/architecture.md, "Non-finite input"), so the reference custom op runs instead (which also keeps
    no N×N attention matrix for the backward)."""
    if name == "torch" and score is None and (dropout_p > 0 or not _bias_needs_grad(bias, bias_h, bias_w)):
        mask = attention_bias_reference(bias, bias_h, bias_w, key_h, key_w)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return _attention_fwd(q, k, v, scale, score, bias, bias_h, bias_w, key_h, key_w, name)[0]


def _bias_needs_grad(*biases: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in biases)


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
