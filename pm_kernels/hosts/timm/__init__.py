"""The timm host: timm's ViTs (``VisionTransformer`` and subclasses, ``Eva``) for pm_kernels.

The only place of the package that reads timm's names (``patch_embed``, ``blocks``, ``num_prefix_tokens``,
``forward_head``, ...): the PM classes and ``patch_timm`` (``model``), EVA's rotary blocks (``eva``), SAM's image
encoder (``sam``: its own host, ``TimmSamHost``), the ``pm_*`` registry entries (``registry``) and ``TimmHost``
below.
"""
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from timm.models.vision_transformer import Block

from ..base import Host
from . import registry  # noqa: F401  (registers the pm_* timm models)
from .eva import PMEvaAttention, PMEvaBlock
from .sam import OptimizedSAM, PMSamAttention, PMSamBlock, TimmSamHostMixin, patch_sam
from .model import (FAMILIES, OptimizedPM, PMAttention, PMBlock, PMEva, PMModelMixin, PMVisionTransformer,
                    PMVisionTransformerDistilled, ViTBody, family_of, head_reads_prefix_only, is_patched, patch_timm)

__all__ = ["HOST", "HOSTS", "TimmHost", "TimmSamHost", "OptimizedSAM", "PMSamAttention", "PMSamBlock", "patch_sam",
           "FAMILIES", "OptimizedPM", "PMAttention", "PMBlock", "PMEva", "PMEvaAttention",
           "PMEvaBlock", "PMModelMixin", "PMVisionTransformer", "PMVisionTransformerDistilled", "patch_timm"]


class TimmHost(Host):
    name = "timm"
    package = "timm"

    def supports(self, model: nn.Module) -> bool:
        return family_of(model) is not None

    def explain_unsupported(self, model: nn.Module) -> str:
        names = ", ".join(family.base.__name__ for family in FAMILIES)
        return (f"{type(model).__name__} is not a timm model pm_kernels supports: expected a timm {names} (DeiT, "
                "ViT, DINOv2, CLIP, EVA, ...)")

    def patch(self, model: nn.Module) -> nn.Module:
        return patch_timm(model)

    def is_patched(self, model: nn.Module) -> bool:
        return is_patched(model)

    # ---- the layers

    def layers(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def num_heads(self, layer: nn.Module) -> int:
        return layer.attn.num_heads

    def attention_width(self, layer: nn.Module) -> int:
        return layer.attn.num_heads * layer.attn.head_dim

    def layer_body(self, layer: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if type(layer) is Block:
            return lambda z: ViTBody.body(layer, z)
        return None

    # ---- tokens and grid

    def num_prefix(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def patch_size(self, model: nn.Module) -> Tuple[int, int]:
        return tuple(model.patch_embed.patch_size)

    def grid(self, model: nn.Module) -> Tuple[int, int]:
        return tuple(model.patch_embed.grid_size)

    def in_chans(self, model: nn.Module) -> int:
        return model.patch_embed.proj.weight.shape[1]

    def embed_dim(self, model: nn.Module) -> int:
        return model.embed_dim

    def any_size(self, model: nn.Module) -> bool:
        return bool(getattr(model, "dynamic_img_size", False))

    def hook_tokens(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        # PMBlocks.forward(x, rope): x is the first block's input
        return model.blocks.register_forward_pre_hook(lambda _module, args: (fn(args[0]),) + tuple(args[1:]))

    # ---- running

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        source = model.model if isinstance(model, OptimizedPM) else model
        # models whose final norm sits in the head (fc_norm, GAP ViTs) get it here: the tokens a dense head reads
        fc_norm = getattr(source, "fc_norm", None)
        head_norm = isinstance(getattr(source, "norm", None), nn.Identity) and not isinstance(fc_norm, (
            nn.Identity, type(None)))

        def features(images: torch.Tensor) -> torch.Tensor:
            tokens = model.forward_features(images)
            return fc_norm(tokens) if head_norm else tokens
        return features

    def remove_head(self, model: nn.Module) -> None:
        model.reset_classifier(0)

    # ---- compressing, deploying, counting

    def check_compressible(self, model: nn.Module) -> None:
        patch_drop = getattr(getattr(model, "patch_drop", None), "prob", 0.0) or 0.0
        if patch_drop > 0:
            raise ValueError(f"model: patch dropout (patch_drop_rate={patch_drop}) changes the token count; a "
                             "compressed structure needs a fixed one (build the model with patch_drop_rate=0)")

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        return OptimizedPM(model, folded)

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        return head_reads_prefix_only(model)

    def embed_macs(self, model: nn.Module, num_patches: int) -> int:
        conv = model.patch_embed.proj
        return num_patches * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels // conv.groups

    def head_macs(self, model: nn.Module) -> int:
        head = getattr(model, "head", None)
        return self.layer_macs_per_token(head) if isinstance(head, nn.Module) else 0

    def reference_tensor(self, model: nn.Module) -> torch.Tensor:
        return model.patch_embed.proj.weight


class TimmSamHost(TimmSamHostMixin, TimmHost):
    """timm's SAM image encoder (``VisionTransformerSAM``): windowed and global blocks (``sam``)."""


HOST = TimmHost()
HOSTS = (HOST, TimmSamHost())
