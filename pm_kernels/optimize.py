"""``optimize``: the inference fast path of a PM model: every block boundary folded into one small matmul.

Between blocks l and l+1 (SPEC §1, D_l = diag(1 − m_l) keeps the tokens pruned at l):

    x_{l+1} = R_l z_l + D_l x_l            z_{l+1} = M_{l+1} x_{l+1}

Only the pruned rows of x are ever read again (by the next shortcut), so carry the state
y_l = [z_l ; x_l[P_l]] (K_l + p_l tokens, P_l = tokens pruned at l) instead of all N tokens:

    z_{l+1}      = (M_{l+1} R_l) z_l + M_{l+1}[:, P_l] x_l[P_l]
    x_{l+1}[P'] =  R_l[P'] z_l      + [P' ∩ P_l] x_l[P_l]          (P' = P_{l+1})

that is y_{l+1} = W_l y_l with a precomputed (K_{l+1} + p_{l+1}) × (K_l + p_l) matrix W_l. Entry: y_0 = W_in x,
W_in = [M_0 ; rows of I at P_0]. Exit: x_L = [R_{L−1} | I[:, P_{L−1}]] y, or only its prefix rows (the CLS, or
CLS + distillation token) when the head reads them — decided at each forward from ``model.global_pool``, so
``reset_classifier(global_pool=...)`` after ``optimize`` is followed. A block with the identity structure is
M = R = I with nothing pruned; a W that comes out as the identity is skipped. Every shape is static and every op a
dense product: ready for torch.compile and CUDA graphs. It costs (K'+p')(K+p)C multiply-adds per boundary
instead of 2NKC, and never writes the N-token x. ``forward_features`` returns all N tokens (dense heads).
"""
from typing import List, Optional

import torch
from torch import nn

from . import token_ops
from .patch import is_patched
from .segmenter import OptimizedSegmenter, Segmenter

__all__ = ["optimize", "OptimizedPM"]


def _rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Selection matrix (len(index) × n) picking rows ``index``."""
    sel = torch.zeros(index.numel(), n, dtype=torch.float64)
    sel[torch.arange(index.numel()), index] = 1.0
    return sel


class OptimizedPM(nn.Module):
    """Inference-only PM model with folded boundaries; shares the weights of the model it was made from."""

    def __init__(self, model, backend: str = "auto", dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.backend = backend
        blocks = list(model.blocks)
        grid = model.structure_grid()
        n = model.num_prefix_tokens + (grid[0] * grid[1] if grid else model.patch_embed.num_patches)
        eye = torch.eye(n, dtype=torch.float64)
        Ms = [eye if b.is_identity else b.M.detach().double().cpu() for b in blocks]
        Rs = [eye if b.is_identity else b.R.detach().double().cpu() for b in blocks]
        pruned = [torch.zeros(0, dtype=torch.long) if b.is_identity else torch.nonzero(~b.keep_mask.cpu()).flatten()
                  for b in blocks]
        self.kept: List[int] = [M.shape[0] for M in Ms]
        self.num_prefix: int = model.num_prefix_tokens

        weights = [torch.cat([Ms[0], _rows(pruned[0], n)])]  # entry: x → y_0
        for layer in range(len(blocks) - 1):
            M_next, R, P, P_next = Ms[layer + 1], Rs[layer], pruned[layer], pruned[layer + 1]
            carry = (P_next.unsqueeze(1) == P.unsqueeze(0)).double()  # [P' ∩ P]: x_l[P] rows that survive
            top = torch.cat([M_next @ R, M_next[:, P]], dim=1)
            bottom = torch.cat([R[P_next], carry], dim=1)
            weights.append(torch.cat([top, bottom]))
        exit_full = torch.cat([Rs[-1], _rows(pruned[-1], n).t()], dim=1)  # y_{L-1} → x_L (N tokens)
        weights.append(exit_full)
        ref = model.patch_embed.proj.weight
        dtype = ref.dtype if dtype is None else dtype
        self.folded_dtype = dtype
        for i, w in enumerate(weights):  # a W equal to I costs a product and does nothing: skip it
            skip = w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
            self.register_buffer(f"W{i}", None if skip else w.to(ref.device, dtype), persistent=False)
        exit_prefix = None if getattr(self, f"W{len(weights) - 1}") is None else exit_full[:self.num_prefix]
        self.register_buffer("W_exit_prefix", None if exit_prefix is None else exit_prefix.to(ref.device, dtype),
                             persistent=False)

    def _head_reads_prefix_only(self) -> bool:
        m = self.model
        return self.num_prefix > 0 and m.global_pool == "token" and getattr(m, "attn_pool", None) is None

    def _folded(self, images: torch.Tensor, exit_weight: Optional[torch.Tensor]) -> torch.Tensor:
        m = self.model
        x, rope = m.embed(images)
        y = x if self.W0 is None else token_ops.run_merge(x, self.W0, self.backend)
        last = len(self.kept) - 1
        for layer, blk in enumerate(m.blocks):
            k = self.kept[layer]
            z = blk.body(y[:, :k], rope)
            y = torch.cat([z, y[:, k:]], dim=1) if y.shape[1] > k else z
            w = exit_weight if layer == last else getattr(self, f"W{layer + 1}")
            if w is not None:
                y = token_ops.run_merge(y, w, self.backend)
        return m.norm(y)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All N tokens after the last block and the final norm (what a dense-prediction head reads)."""
        return self._folded(images, getattr(self, f"W{len(self.kept)}"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._head_reads_prefix_only() and self.W_exit_prefix is not None:
            return self.model.forward_head(self._folded(images, self.W_exit_prefix))
        return self.model.forward_head(self.forward_features(images))


@torch.no_grad()
def optimize(model, backend: str = "auto", dtype: Optional[torch.dtype] = None):
    """Fold a (compressed) PM model for inference; returns an ``OptimizedPM`` sharing its weights (for a
    ``pm_kernels.Segmenter``: an ``OptimizedSegmenter``, whose folded backbone returns every patch token).

    Call it after the model is on its device and dtype (or pass ``dtype`` for the folded matrices); call it again
    after M or R change. Works under ``torch.compile(mode="max-autotune")`` and CUDA-graph capture.
    """
    if isinstance(model, Segmenter):
        return OptimizedSegmenter(model, optimize(model.backbone, backend=backend, dtype=dtype)).eval()
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch_timm / compress), got {type(model).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    return OptimizedPM(model, backend=backend, dtype=dtype).eval()
