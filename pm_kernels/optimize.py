"""``optimize``: the inference fast path of a PM model: every layer boundary folded into one small matmul.

Between layers l and l+1 (SPEC §1, D_l = diag(1 − m_l) keeps the tokens pruned at l):

    x_{l+1} = R_l z_l + D_l x_l            z_{l+1} = M_{l+1} x_{l+1}

Only the pruned rows of x are ever read again (by the next shortcut), so carry the state
y_l = [z_l ; x_l[P_l]] (K_l + p_l tokens, P_l = tokens pruned at l) instead of all N tokens:

    z_{l+1}      = (M_{l+1} R_l) z_l + M_{l+1}[:, P_l] x_l[P_l]
    x_{l+1}[P'] =  R_l[P'] z_l      + [P' ∩ P_l] x_l[P_l]          (P' = P_{l+1})

that is y_{l+1} = W_l y_l with a precomputed (K_{l+1} + p_{l+1}) × (K_l + p_l) matrix W_l. Entry: y_0 = W_in x,
W_in = [M_0 ; rows of I at P_0]. Exit: x_L = [R_{L−1} | I[:, P_{L−1}]] y, or only its prefix rows (the CLS, or
CLS + distillation token) when the host says the head reads only those. A layer with the identity structure is
M = R = I with nothing pruned; a W that comes out as the identity is skipped. Every shape is static and every op a
dense product: ready for torch.compile and CUDA graphs. It costs (K'+p')(K+p)C multiply-adds per boundary
instead of 2NKC, and never writes the N-token x.

``FoldedLayers`` holds the folded matrices and runs the layers' bodies between them; the model's host wraps it in
a model with the original call and output type (timm: ``OptimizedPM``).
"""
from typing import List, Optional, Sequence

import torch
from torch import nn

from . import token_ops
from .hosts import resolve
from .hosts.base import structure_grid

__all__ = ["optimize", "FoldedLayers"]


def _rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Selection matrix (len(index) × n) picking rows ``index``."""
    sel = torch.zeros(index.numel(), n, dtype=torch.float64)
    sel[torch.arange(index.numel()), index] = 1.0
    return sel


class FoldedLayers(nn.Module):
    """The folded boundaries of a chain of PM layers (buffers ``W0`` … ``W{L}``, ``W_exit_prefix``): tokens
    entering the first layer → tokens after the last, the layers' ``body`` between the folded products.

    Holds no layer: ``forward`` is given them (the model that owns them registers them once)."""

    def __init__(self, layers: Sequence[nn.Module], n_tokens: int, num_prefix: int, like: torch.Tensor,
                 backend: str = "auto", dtype: Optional[torch.dtype] = None):
        super().__init__()
        n = n_tokens
        eye = torch.eye(n, dtype=torch.float64)
        Ms = [eye if b.is_identity else b.M.detach().double().cpu() for b in layers]
        Rs = [eye if b.is_identity else b.R.detach().double().cpu() for b in layers]
        pruned = [torch.zeros(0, dtype=torch.long) if b.is_identity else torch.nonzero(~b.keep_mask.cpu()).flatten()
                  for b in layers]
        self.kept: List[int] = [M.shape[0] for M in Ms]
        self.num_prefix: int = num_prefix
        self.backend = backend

        weights = [torch.cat([Ms[0], _rows(pruned[0], n)])]  # entry: x → y_0
        for layer in range(len(layers) - 1):
            M_next, R, P, P_next = Ms[layer + 1], Rs[layer], pruned[layer], pruned[layer + 1]
            carry = (P_next.unsqueeze(1) == P.unsqueeze(0)).double()  # [P' ∩ P]: x_l[P] rows that survive
            top = torch.cat([M_next @ R, M_next[:, P]], dim=1)
            bottom = torch.cat([R[P_next], carry], dim=1)
            weights.append(torch.cat([top, bottom]))
        exit_full = torch.cat([Rs[-1], _rows(pruned[-1], n).t()], dim=1)  # y_{L-1} → x_L (N tokens)
        weights.append(exit_full)
        dtype = like.dtype if dtype is None else dtype
        self.folded_dtype = dtype
        for i, w in enumerate(weights):  # a W equal to I costs a product and does nothing: skip it
            skip = w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
            self.register_buffer(f"W{i}", None if skip else w.to(like.device, dtype), persistent=False)
        exit_prefix = None if getattr(self, f"W{len(weights) - 1}") is None else exit_full[:num_prefix]
        self.register_buffer("W_exit_prefix", None if exit_prefix is None else exit_prefix.to(like.device, dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor, layers: Sequence[nn.Module], *extra, prefix_only: bool = False
                ) -> torch.Tensor:
        """x (B, N, C) entering the first layer → (B, N, C) after the last, or (B, P, C), the prefix rows only,
        with ``prefix_only`` (when the exit reconstructs anything); ``extra`` goes to every ``body``."""
        last = len(self.kept) - 1
        exit_weight = getattr(self, f"W{last + 1}")
        if prefix_only and self.num_prefix > 0 and self.W_exit_prefix is not None:
            exit_weight = self.W_exit_prefix
        y = x if self.W0 is None else token_ops.run_merge(x, self.W0, self.backend)
        for layer, blk in enumerate(layers):
            k = self.kept[layer]
            z = blk.body(y[:, :k], *extra)
            y = torch.cat([z, y[:, k:]], dim=1) if y.shape[1] > k else z
            w = exit_weight if layer == last else getattr(self, f"W{layer + 1}")
            if w is not None:
                y = token_ops.run_merge(y, w, self.backend)
        return y


@torch.no_grad()
def optimize(model, backend: str = "auto", dtype: Optional[torch.dtype] = None):
    """Fold a (compressed) PM model for inference; returns a model with the same call and output type that
    shares its weights (timm: an ``OptimizedPM``; a task model such as a ``pm_kernels.Segmenter``: its optimized
    form, whose folded backbone returns every patch token).

    Call it after the model is on its device and dtype (or pass ``dtype`` for the folded matrices); call it again
    after M or R change. Works under ``torch.compile(mode="max-autotune")`` and CUDA-graph capture.
    """
    host, backbone = resolve(model)
    if not host.is_patched(backbone):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch / compress), got {type(backbone).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    folded = host.fold_layers(backbone, backend, dtype)  # a host whose layers need their own folded form
    if folded is None:
        P = host.num_prefix(backbone)
        grid = structure_grid(host.layers(backbone), P, host.grid(backbone)) or host.grid(backbone)
        folded = FoldedLayers(host.layers(backbone), P + grid[0] * grid[1], P, host.reference_tensor(backbone),
                              backend=backend, dtype=dtype)
    fast = host.optimize(backbone, folded)
    if backbone is not model:  # a task model: its own optimized form around the folded backbone
        fast = model.pm_optimized(fast)
    return fast.eval()
