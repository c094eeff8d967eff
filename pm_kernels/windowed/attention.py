"""Attention of a windowed-attention ViT (SAM) with its decomposed relative-position bias, through
``pm_kernels.attention`` (fused kernels, the SPEC §3 score).

A host's SAM attention module derives from ``WindowedAttentionMixin`` and says where its parts are (``pm_qkv``,
``pm_rel_pos``, ``pm_project``, ``pm_scale``, ``pm_dropout``). Two ways to attend:

- ``grid_attention``: the dense block's attention over every position of a ``gh × gw`` grid (a window with its
  padding, or the image), the bias formed as the library forms it (q · Rh[h_q, h_k], q · Rw[w_q, w_k]); the SPEC
  §3 score, when asked for, is kept per window (``windows_score``).
- ``positional_attention``: a compressed block's attention over K slots at arbitrary positions (each merged token
  at its centre's, docs/windowed_attention.md §1), empty slots masked as keys. The bias of query i and key j is
  T_h[h_i − h_j + G − 1]: one product of q with the table T_h (2G − 1 rows) and a gather, instead of a table per
  query position.
"""
from typing import Optional, Tuple

import torch

from .. import dispatch
from ..attention import attention_features, run_attention
from ..layers import PMAttentionMixin
from .layout import WindowLayout

__all__ = ["WindowedAttentionMixin", "grid_attention", "positional_attention"]


class WindowedAttentionMixin(PMAttentionMixin):
    """The state of a PM SAM attention (``score_accumulator``, ``backend``) and the parts a host says where they
    are. ``score_queries``: the queries that see a key (w² in a windowed block: calibration normalises by it)."""

    score_queries: Optional[int] = None

    def pm_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B_, n, C) → q, k, v (B_, heads, n, head dim), q unscaled (as the bias terms take it)."""
        raise NotImplementedError

    def pm_rel_pos(self, size_h: int, size_w: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(Rh (size_h, size_h, D), Rw (size_w, size_w, D)) as the library forms them (Rh[h_q, h_k]), or None
        without relative position."""
        raise NotImplementedError

    def pm_project(self, out: torch.Tensor) -> torch.Tensor:
        """(B_, n, heads · head dim) → (B_, n, C): the output projection."""
        raise NotImplementedError

    def pm_scale(self) -> float:
        raise NotImplementedError

    def pm_dropout(self) -> float:
        """Attention dropout of this call (0 in eval mode)."""
        raise NotImplementedError


def _attend(attn, q, k, v, score, bias_h=None, bias_w=None, key_h=None, key_w=None) -> torch.Tensor:
    dropout = attn.pm_dropout()
    name = dispatch.select("attention", attn.backend, q.device, q.dtype, head_dim=q.shape[-1],
                           features=attention_features(score, dropout, rel_pos_bias=bias_h is not None), arg="q")
    return run_attention(q, k, v, float(attn.pm_scale()), score, dropout, name, bias_h=bias_h, bias_w=bias_w,
                         key_h=key_h, key_w=key_w)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    B_, heads, n, d = out.shape
    return out.transpose(1, 2).reshape(B_, n, heads * d)


def grid_attention(attn: WindowedAttentionMixin, x: torch.Tensor, score: Optional[torch.Tensor] = None,
                   layout: Optional[WindowLayout] = None) -> torch.Tensor:
    """SAM's dense attention over x (B_, gh, gw, C): every position attends to every position, with the library's
    decomposed bias. ``layout``: x holds the windows of that layout (B_ = images · n_W, image-major); ``score``
    then gets each window's score at its real tokens (raster order), else (x the whole grid) every position's."""
    B_, gh, gw, C = x.shape
    n = gh * gw
    q, k, v = attn.pm_qkv(x.reshape(B_, n, C))
    heads, d = q.shape[1], q.shape[3]
    tables = attn.pm_rel_pos(gh, gw)
    bias = {}
    if tables is not None:
        rh, rw = (t.to(q.dtype) for t in tables)
        grid_q = q.reshape(B_, heads, gh, gw, d)
        positions = torch.arange(n, device=q.device)
        bias = dict(bias_h=torch.einsum("bnywd,ygd->bnywg", grid_q, rh).reshape(B_, heads, n, gh),
                    bias_w=torch.einsum("bnywd,wgd->bnywg", grid_q, rw).reshape(B_, heads, n, gw),
                    key_h=positions // gw, key_w=positions % gw)
    if score is None or layout is None:
        out = _attend(attn, q, k, v, score, **bias)
    else:
        out = _windows_with_score(attn, x, q, k, v, bias, score, layout)
    return attn.pm_project(_merge_heads(out)).view(B_, gh, gw, -1)


def _windows_with_score(attn, x, q, k, v, bias, score, layout: WindowLayout) -> torch.Tensor:
    """One attention call per window (the fused score sums over its batch: here the images), each window's keys
    scored into its own row; a hook on x (reached in backward after every window's attention) adds the rows into
    ``score`` at the windows' real tokens, the padding dropped."""
    n_w = layout.num_windows
    split = lambda t: t.view(t.shape[0] // n_w, n_w, *t.shape[1:])  # noqa: E731  (image, window, ...)
    rows = torch.zeros(n_w, layout.slots, dtype=torch.float32, device=score.device)
    outs = []
    for window in range(n_w):
        pick = lambda t: split(t)[:, window]  # noqa: E731
        window_bias = {name: (pick(t).contiguous() if name.startswith("bias") else t) for name, t in bias.items()}
        outs.append(_attend(attn, pick(q), pick(k), pick(v), rows[window], **window_bias))
    if x.requires_grad:
        slots = layout.token_slot().to(score.device)

        def add_rows(grad: torch.Tensor) -> None:
            score.add_(rows.view(-1)[slots])
        x.register_hook(add_rows)
    return torch.stack(outs, dim=1).flatten(0, 1)


def _relative_bias(q: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """bias[b, h, i, g] = q_i · table[p_i, g] with table[p, g] = T[p − g + G − 1] (the library's relative table,
    G × G × D): q times T (2G − 1 rows) once, then each query's G entries gathered. positions (P, n), P dividing
    the batch (image-major), entries in [0, G)."""
    size = table.shape[0]
    T = torch.cat([table[0].flip(0), table[1:, 0]])  # T[G − 1 + d] = table[i, j] with i − j = d
    products = torch.matmul(q, T.to(q.dtype).t())     # (B_, heads, n, 2G − 1)
    B_, heads, n, _ = products.shape
    P = positions.shape[0]
    index = positions.unsqueeze(-1) + (size - 1 - torch.arange(size, device=q.device))  # (P, n, G)
    index = index.unsqueeze(1).unsqueeze(0).expand(B_ // P, P, heads, n, size)
    return torch.gather(products.view(B_ // P, P, heads, n, 2 * size - 1), -1, index).view(B_, heads, n, size)


def positional_attention(attn: WindowedAttentionMixin, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         grid: Tuple[int, int]) -> torch.Tensor:
    """Attention over x (B_, n, C) whose token i sits at (rows[p, i], cols[p, i]) of a ``grid`` (Gh, Gw) of
    relative positions; rows, cols (P, n) int64 with P dividing B_ (batch entries image-major: P = 1 the same
    positions for all, P = n_W one set per window); −1 marks an empty slot, which no query attends to."""
    B_, n, _ = x.shape
    q, k, v = attn.pm_qkv(x)
    heads = q.shape[1]
    P = rows.shape[0]
    empty = rows < 0
    q_rows, q_cols = rows.clamp_min(0), cols.clamp_min(0)
    tables = attn.pm_rel_pos(*grid)
    if tables is not None:
        bias_h, bias_w = _relative_bias(q, tables[0], q_rows), _relative_bias(q, tables[1], q_cols)
        key_h, key_w = q_rows, q_cols
    else:  # no relative position: one zero column, only to mask the empty slots
        bias_h = bias_w = q.new_zeros(B_, heads, n, 1)
        key_h = key_w = torch.zeros_like(rows)
    # empty slots read an extra column of −inf: masked as keys, whatever their query rows hold
    bias_h = torch.cat([bias_h, bias_h.new_full((B_, heads, n, 1), float("-inf"))], dim=-1)
    key_h = torch.where(empty, bias_h.shape[-1] - 1, key_h)
    if P == 1:
        key_h, key_w = key_h[0], key_w[0]
    else:
        key_h, key_w = (t.unsqueeze(0).expand(B_ // P, P, n).reshape(B_, n) for t in (key_h, key_w))
    out = _attend(attn, q, k, v, None, bias_h=bias_h, bias_w=bias_w, key_h=key_h, key_w=key_w)
    return attn.pm_project(_merge_heads(out))
