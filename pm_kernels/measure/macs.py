"""Multiply-accumulates (MACs) of one image: analytic from a model's structure, or traced from what runs.

1 MAC = 1 FLOP of the token-compression literature (the paper's "GFLOPs": DeiT-S 4.6) = ``FlopCounterMode``'s
FLOPs / 2. The analytic count (``pm_macs``) covers the patch embedding, every ``nn.Linear`` of a block on its K
tokens, the attention products 2·K²·(heads · head dim), the merge and reconstruct products 2·K·N·C of a compressed
block, and the head on one token; norms, activations, softmax and rotary embeddings are not counted. The traced
count (``traced_macs``) is whatever ``FlopCounterMode`` sees in one forward, with the formulas pm_kernels registers
for its attention ops: use it for what actually runs (an ``optimize``d model folds its boundaries and does fewer
MACs than its structure says; a Segmenter adds its decoder).
"""
import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["pm_macs", "kept_tokens", "analytic_macs", "traced_macs"]


def _linear_macs_per_token(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def pm_macs(model: nn.Module, kept: Sequence[int], num_patches: Optional[int] = None) -> int:
    """MACs of one image through a PM-compressed timm ViT (or EVA) whose block ``l`` works on ``kept[l]`` tokens,
    merged from and reconstructed to all N tokens; a block with ``kept[l]`` = N is the identity (a plain block).
    ``num_patches``: the patch count of the image size (default the model's)."""
    blocks = list(model.blocks)
    if len(kept) != len(blocks):
        raise ValueError(f"kept: expected one token count per block ({len(blocks)}), got {len(kept)}")
    pe = model.patch_embed
    n_patches = pe.num_patches if num_patches is None else int(num_patches)
    n = n_patches + getattr(model, "num_prefix_tokens", 1)
    c = model.embed_dim
    conv = pe.proj
    macs = n_patches * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels // conv.groups
    for blk, k in zip(blocks, kept):
        k = int(k)
        if not 0 < k <= n:
            raise ValueError(f"kept: expected counts in [1, {n}], got {k}")
        attn_dim = blk.attn.num_heads * blk.attn.head_dim
        macs += k * _linear_macs_per_token(blk) + 2 * k * k * attn_dim + (2 * k * n * c if k < n else 0)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        macs += _linear_macs_per_token(head)
    return macs


def kept_tokens(model: nn.Module) -> List[int]:
    """K per block of a timm ViT: the tokens a compressed block attends over, N for a plain or identity block."""
    n = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    return [int(blk.num_kept(n)) if hasattr(blk, "num_kept") else n for blk in model.blocks]


def analytic_macs(model: nn.Module) -> int:
    """``pm_macs`` of a timm ViT at its own structure (a plain or identity model: the dense MACs)."""
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
