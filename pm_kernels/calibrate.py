"""``calibrate``: the gradient-weighted attention score of SPEC §3, from inside the fused attention backward.

Per batch and layer, with A the attention probabilities and dA = ∂L/∂A:
    v_k = (1 / (B·H·N)) · Σ_{b,h,q} A[b,h,q,k] · dA[b,h,q,k]        (patch keys k: prefix tokens dropped)
(a windowed attention: over the queries of the key's window, 1 / (B·H·w²); docs/windowed_attention.md §2)
    S_k ← S_k + |v_k|                                                 (absolute value after the sum)
``pm_kernels.attention`` adds Σ P ⊙ dP per key into a buffer during backward: no N×N matrix is kept.
The model's weights are not updated (the authors' lr of 1e-6 is a measurement, not training).
"""
from typing import Callable, Iterable, Optional, Union

import torch

from .hosts import resolve
from .objectives import Objective, resolve_objective

__all__ = ["calibrate"]


def _check_dense(host, backbone) -> None:
    for i, layer in enumerate(host.layers(backbone)):
        if not layer.is_identity:
            raise ValueError(f"model: layer {i}: calibration runs on the dense model (the identity structure); "
                             f"this layer keeps K = {layer.M.shape[0]} of N = {layer.M.shape[1]} tokens. "
                             "Calibrate before compress.")


def calibrate(model, batches: Iterable, loss_fn: Optional[Callable] = None,
              objective: Union[None, str, Objective] = None) -> torch.Tensor:
    """Sum the SPEC §3 score over ``batches``; returns float32 (L, num_patches) on the CPU.

    ``model``: a ViT of any supported host (timm, transformers, open_clip), patched or not (patching changes
    nothing it computes), head or not, or a task model that names its backbone (``pm_kernels.Segmenter``: the
    backbone is scored through the whole task model). Prefix tokens (CLS, distillation token, registers) are not
    scored: they are never pruned or merged. Runs in eval mode (no dropout / drop-path), restores the mode after.

    ``batches``: (images, targets) pairs, or images alone (a (B, C, H, W) tensor or a 1-tuple), all of one size.
    ``objective`` (``pm_kernels.objectives``): the loss whose gradient the score reads. None: ``"labels"`` when the
    batches carry targets (a task model's own loss, e.g. a Segmenter's per-pixel cross-entropy without the
    unlabelled pixels, else the cross-entropy on the class logits, ``.logits`` of a transformers output); for
    images alone ``"pseudo_labels"`` (the dense model's own argmax) where the model has a head, else ``"kmeans"``
    (k-means classes of the pooled embedding) -- the label-free defaults measured in
    bench/results/calibration_objectives/. ``loss_fn(outputs, targets)`` overrides the objective: it gets the
    model's raw output (targets None for images alone) and must return a scalar.
    """
    host, backbone = resolve(model)
    if not host.is_patched(backbone):
        host.patch(backbone)
    _check_dense(host, backbone)
    # fits what the objective needs on the dense model (k-means centroids) and checks the first batch, before
    # any hook is in place; later batches are checked as they are read
    chosen, scoring = resolve_objective(model, batches, objective, loss_fn)
    layers = host.layers(backbone)
    attentions = [host.attention(layer) for layer in layers]
    prefix = host.num_prefix(backbone)
    state = {"scores": None}

    def _start_batch(tokens: torch.Tensor) -> torch.Tensor:
        # Differentiate w.r.t. the first layer's input only: attention backward runs, weight grads do not.
        # The token count is known here (dynamic image sizes included): one score buffer per layer.
        patches = tokens.shape[1] - prefix
        if state["scores"] is None:
            state["scores"] = torch.zeros(len(layers), patches, dtype=torch.float64)
        state["n"] = tokens.shape[1]
        state["buffers"] = [torch.zeros(state["n"], dtype=torch.float32, device=tokens.device) for _ in layers]
        for attn, buf in zip(attentions, state["buffers"]):
            attn.score_accumulator = buf
        state["x"] = tokens.detach().requires_grad_(True)
        return state["x"]

    was_training = model.training
    hook = host.hook_tokens(backbone, _start_batch)
    model.eval()
    try:
        for inputs, targets in scoring:  # the targets' own forward (no grad) ran before this point
            state["x"] = None
            with torch.enable_grad():
                outputs = chosen.forward(model, inputs)
                if state["x"] is None:
                    raise RuntimeError("model: its first layer did not run on this batch (no tokens to score)")
                loss = chosen.loss(outputs, targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn: expected a scalar loss tensor")
                torch.autograd.grad(loss, state["x"])
            for layer, (layer_module, attn, buf) in enumerate(zip(layers, attentions, state["buffers"])):
                # B·H·(queries that see a key: all N, or a windowed attention's window)
                norm = inputs.shape[0] * host.num_heads(layer_module) * (getattr(attn, "score_queries", None)
                                                                         or state["n"])
                state["scores"][layer] += (buf[prefix:].double().cpu() / norm).abs()
    finally:
        hook.remove()
        for attn in attentions:
            attn.score_accumulator = None
        model.train(was_training)
    return state["scores"].float()
