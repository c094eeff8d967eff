"""``calibrate``: the gradient-weighted attention score of SPEC §3, from inside the fused attention backward.

Per batch and layer, with A the attention probabilities and dA = ∂L/∂A:
    v_k = (1 / (B·H·N)) · Σ_{b,h,q} A[b,h,q,k] · dA[b,h,q,k]        (patch keys k: prefix tokens dropped)
    S_k ← S_k + |v_k|                                                 (absolute value after the sum)
``pm_kernels.attention`` adds Σ P ⊙ dP per key into a buffer during backward: no N×N matrix is kept.
The model's weights are not updated (the authors' lr of 1e-6 is a measurement, not training).
"""
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .patch import is_patched, patch_timm
from .segmenter import Segmenter, pixel_cross_entropy

__all__ = ["calibrate"]


def _check_dense_pm(model) -> None:
    if not is_patched(model):
        raise TypeError("model: expected a model patched by pm_kernels.patch_timm (the dense, identity structure); "
                        f"got {type(model).__name__} with unpatched blocks")
    for i, blk in enumerate(model.blocks):
        if not blk.is_identity:
            raise ValueError(f"model.blocks[{i}]: calibration runs on the dense model (the identity structure); "
                             f"this block keeps K = {blk.M.shape[0]} of N = {blk.M.shape[1]} tokens. "
                             "Calibrate before compress.")


def calibrate(model, batches: Iterable, loss_fn: Optional[Callable] = None) -> torch.Tensor:
    """Sum the SPEC §3 score over ``batches`` of (images, targets); returns float32 (L, num_patches) on the CPU.

    Prefix tokens (CLS, distillation token, registers) are not scored: they are never pruned or merged.
    Runs in eval mode (no dropout / drop-path), restores the mode afterwards. ``loss_fn(logits, targets)``
    defaults to cross-entropy and must return a scalar. Every batch must have the same image size.
    ``model`` may be a ``pm_kernels.Segmenter``: its backbone is scored (patched first if it is not, which
    changes nothing it computes) through the whole segmenter, and the default loss is the per-pixel
    cross-entropy without the unlabelled pixels (``pixel_cross_entropy`` with the segmenter's ``ignore_index``).
    """
    if isinstance(model, Segmenter):
        backbone = model.backbone
        if not is_patched(backbone):
            patch_timm(backbone)
        if loss_fn is None:
            ignore = model.ignore_index
            loss_fn = lambda logits, targets: pixel_cross_entropy(logits, targets, ignore)  # noqa: E731
    else:
        backbone = model
    _check_dense_pm(backbone)
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    blocks = list(backbone.blocks)
    prefix = backbone.num_prefix_tokens
    state = {"scores": None}

    def _start_batch(_module, _inputs, out):
        # Differentiate w.r.t. the patch embeddings only: attention backward runs, weight grads do not.
        # The token count is known here (dynamic image sizes included): one score buffer per block.
        patches = out.shape[1] * out.shape[2] if out.dim() == 4 else out.shape[1]
        if state["scores"] is None:
            state["scores"] = torch.zeros(len(blocks), patches, dtype=torch.float64)
        elif state["scores"].shape[1] != patches:
            raise ValueError(f"batches: every batch must have the same image size ({state['scores'].shape[1]} "
                             f"patches so far, this batch has {patches})")
        state["n"] = prefix + patches
        state["buffers"] = [torch.zeros(state["n"], dtype=torch.float32, device=out.device) for _ in blocks]
        for blk, buf in zip(blocks, state["buffers"]):
            blk.attn.score_accumulator = buf
        state["x"] = out.detach().requires_grad_(True)
        return state["x"]

    was_training = model.training
    hook = backbone.patch_embed.register_forward_hook(_start_batch)
    model.eval()
    n_batches = 0
    try:
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("batches: expected an iterable of (images, targets) pairs")
            images, targets = batch
            with torch.enable_grad():
                loss = loss_fn(model(images), targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn: expected a scalar loss tensor")
                torch.autograd.grad(loss, state["x"])
            norm = images.shape[0] * state["n"]
            for layer, (blk, buf) in enumerate(zip(blocks, state["buffers"])):
                state["scores"][layer] += (buf[prefix:].double().cpu() / (norm * blk.attn.num_heads)).abs()
            n_batches += 1
    finally:
        hook.remove()
        for blk in blocks:
            blk.attn.score_accumulator = None
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("batches: expected at least one (images, targets) batch, got none")
    return state["scores"].float()
