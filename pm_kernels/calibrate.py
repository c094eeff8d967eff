"""``calibrate``: the gradient-weighted attention score of SPEC §3, from inside the fused attention backward.

Per batch and layer, with A the attention probabilities and dA = ∂L/∂A:
    v_k = (1 / (B·H·N)) · Σ_{b,h,q} A[b,h,q,k] · dA[b,h,q,k]        (keys k ≥ 1: CLS dropped)
    S_k ← S_k + |v_k|                                                 (absolute value after the sum)
``pm_kernels.attention`` adds Σ P ⊙ dP per key into a buffer during backward: no N×N matrix is kept.
The model's weights are not updated (the authors' lr of 1e-6 is a measurement, not training).
"""
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .patch import is_patched, num_tokens

__all__ = ["calibrate"]


def _check_dense_pm(model) -> int:
    if not is_patched(model):
        raise TypeError("model: expected a model patched by pm_kernels.patch_timm (the dense, identity structure); "
                        f"got {type(model).__name__} with unpatched blocks")
    n = num_tokens(model)
    eye = None
    for i, blk in enumerate(model.blocks):
        if blk.M.shape[0] != n:
            raise ValueError(f"model.blocks[{i}]: calibration runs on the dense model (M = I, K = N = {n}); "
                             f"this block keeps K = {blk.M.shape[0]} tokens. Calibrate before compress.")
        eye = torch.eye(n, dtype=blk.M.dtype, device=blk.M.device) if eye is None else eye
        if not (torch.allclose(blk.M, eye) and torch.allclose(blk.R, eye) and bool(blk.keep_mask.all())):
            raise ValueError(f"model.blocks[{i}]: calibration runs on the dense model, but this block's M / R are "
                             "not the identity (were they trained?) or it prunes tokens; freeze M and R while "
                             "training the dense model (requires_grad_(False))")
    return n


def calibrate(model, batches: Iterable, loss_fn: Optional[Callable] = None) -> torch.Tensor:
    """Sum the SPEC §3 score over ``batches`` of (images, targets); returns float32 (L, N−1) on the CPU.

    Runs in eval mode (no dropout / drop-path), restores the mode afterwards. ``loss_fn(logits, targets)``
    defaults to cross-entropy and must return a scalar.
    """
    n = _check_dense_pm(model)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    blocks = list(model.blocks)
    scores = torch.zeros(len(blocks), n - 1, dtype=torch.float64)
    embedded = {}

    def _make_leaf(_module, _inputs, out):
        # Differentiate w.r.t. the patch embeddings only: attention backward runs, weight grads do not.
        embedded["x"] = out.detach().requires_grad_(True)
        return embedded["x"]

    was_training = model.training
    hook = model.patch_embed.register_forward_hook(_make_leaf)
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("batches: expected an iterable of (images, targets) pairs")
            images, targets = batch
            buffers = [torch.zeros(n, dtype=torch.float32, device=images.device) for _ in blocks]
            for blk, buf in zip(blocks, buffers):
                blk.attn.score_accumulator = buf
            with torch.enable_grad():
                loss = loss_fn(model(images), targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn: expected a scalar loss tensor")
                torch.autograd.grad(loss, embedded["x"])
            norm = images.shape[0] * n
            for layer, (blk, buf) in enumerate(zip(blocks, buffers)):
                scores[layer] += (buf[1:].double().cpu() / (norm * blk.attn.num_heads)).abs()
            n_batches += 1
    finally:
        hook.remove()
        for blk in blocks:
            blk.attn.score_accumulator = None
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("batches: expected at least one (images, targets) batch, got none")
    return scores.float()
