"""Multiply-accumulates (MACs) of one image: analytic from a model's structure, or traced from what runs.

1 MAC = 1 FLOP of the token-compression literature (the paper's "GFLOPs": DeiT-S 4.6) = ``FlopCounterMode``'s
FLOPs / 2. The analytic count (``pm_macs``) covers the patch embedding, every linear map of a layer on its K
tokens, the attention products 2·K²·(heads · head dim), the merge and reconstruct products 2·K·N·C of a compressed
layer, and the head on the token(s) it reads; norms, activations, softmax and rotary embeddings are not counted.
The model's host (``pm_kernels.hosts``) says what each part is (``Host.layer_macs``: a windowed layer of SAM counts
its windows, their padding and its relative-position products, docs/windowed_attention.md §4). The traced
count (``traced_macs``) is whatever ``FlopCounterMode`` sees in one forward, with the formulas pm_kernels registers
for its attention ops: use it for what actually runs (an ``optimize``d model folds its boundaries and does fewer
MACs than its structure says; a Segmenter adds its decoder).
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..hosts import host_of

__all__ = ["pm_macs", "grid_of_count", "kept_tokens", "analytic_macs", "traced_macs"]


def pm_macs(model: nn.Module, kept: Sequence[int], num_patches: Optional[int] = None) -> int:
    """MACs of one image through a PM-compressed ViT of any supported host whose layer ``l`` works on
    ``kept[l]`` tokens, merged from and reconstructed to all N tokens; a layer with ``kept[l]`` = N is the
    identity (a plain layer). ``num_patches``: the patch count of the image size (default the model's)."""
    host = host_of(model)
    layers = host.layers(model)
    if len(kept) != len(layers):
        raise ValueError(f"kept: expected one token count per layer ({len(layers)}), got {len(kept)}")
    grid = grid_of_count(model, num_patches)
    n = grid[0] * grid[1] + host.num_prefix(model)
    macs = host.embed_macs(model, grid[0] * grid[1])
    for layer, k in zip(layers, kept):
        k = int(k)
        if not 0 < k <= n:
            raise ValueError(f"kept: expected counts in [1, {n}], got {k}")
        macs += host.layer_macs(model, layer, k, grid)  # a windowed layer (SAM) counts its windows
    return macs + host.head_macs(model)


def grid_of_count(model: nn.Module, num_patches: Optional[int] = None) -> Tuple[int, int]:
    """The patch grid of ``num_patches`` patches: the model's own when the count is its (or None), else the
    square one (a windowed layer's MACs depend on the grid's shape, not only its count: windows, padding)."""
    own = tuple(host_of(model).grid(model))
    if num_patches is None or int(num_patches) == own[0] * own[1]:
        return own
    side = math.isqrt(int(num_patches))
    return (side, side) if side * side == int(num_patches) else (1, int(num_patches))


def kept_tokens(model: nn.Module) -> List[int]:
    """K per layer of a ViT of any host: the tokens a compressed layer attends over, N for a plain or identity
    layer."""
    host = host_of(model)
    h, w = host.grid(model)
    n = h * w + host.num_prefix(model)
    return [int(layer.num_kept(n)) if hasattr(layer, "num_kept") else n for layer in host.layers(model)]


def analytic_macs(model: nn.Module) -> int:
    """``pm_macs`` of a ViT at its own structure (a plain or identity model: the dense MACs)."""
    return pm_macs(model, kept_tokens(model))


@torch.no_grad()
def traced_macs(run: Callable[[torch.Tensor], object], example: torch.Tensor) -> float:
    """MACs per item of ``run(example)`` (a module or any function of a batch), counted by ``FlopCounterMode``
    on one call and divided by the batch size ``example.shape[0]``."""
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"example: expected a batch tensor with at least one item, got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
    if isinstance(run, nn.Module):
        run.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        run(example)
    return counter.get_total_flops() / 2 / example.shape[0]
