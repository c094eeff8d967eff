"""The open_clip host: open_clip's image towers for pm_kernels (``pip install pm-kernels[open_clip]``).

- The native ``VisionTransformer`` (alone, or the ``.visual`` of a ``CLIP`` / ``CustomTextCLIP``): each
  ``ResidualAttentionBlock`` becomes a ``PMResidualAttentionBlock`` (class swap) whose ``body`` is the block's
  own math on the K merged tokens, with q, k, v taken from ``nn.MultiheadAttention``'s packed ``in_proj`` and the
  attention run by ``pm_kernels.attention`` (fused kernels, the SPEC §3 score). The tower's transformer keeps
  looping over its blocks (gradient checkpointing included).
- A ``TimmModel`` tower: its trunk is a timm model, so the timm host does the work on the trunk; this host only
  finds it (``_trunk``) and keeps the CLIP model's call around it.

``calibrate`` / ``compress`` / ``optimize`` / ``export`` take the CLIP model or its ``.visual``. Their image
output is an embedding (``encode_image``), not class logits: calibration needs a ``loss_fn``. The only place of
the package that reads open_clip's names.
"""
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from ..layers import PMAttentionMixin, PMBlockMixin, attend
from .base import Host, check_grid_matches, structure_grid
from .folded_copy import copy_replacing, folded_copy, head_macs, runner_of
from .timm import HOST as TIMM_HOST

__all__ = ["HOST", "OpenClipHost", "PMResidualAttentionBlock"]

_CLIP_MODELS = (CLIP, CustomTextCLIP)  # two-tower models: the image tower is ``.visual``


def packed_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of a batch-first ``nn.MultiheadAttention`` on x (B, N, C) through ``pm_kernels.attention``:
    q, k, v from the packed ``in_proj``, the output projection after."""
    B, N, C = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = attend(attn, q, k, v, (C // heads) ** -0.5, attn.dropout if attn.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(B, N, C))


class PMResidualAttentionBlock(PMBlockMixin, ResidualAttentionBlock):
    """open_clip ``ResidualAttentionBlock`` (ln_1, attn, ls_1, ln_2, mlp, ls_2) as a PM layer (SPEC §1)."""

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("attn_mask: a Prune-and-Merge ResidualAttentionBlock is self-attention over all tokens "
                             "of an image: no mask, no separate keys or values")
        return self.pm_forward(q_x)

    def body(self, z: torch.Tensor, extra=None) -> torch.Tensor:
        z = z + self.ls_1(packed_attention(self.attn, self.ln_1(z)))
        return z + self.ls_2(self.mlp(self.ln_2(z)))


# ------------------------------------------------------------------------------------------- the towers

def _visual(model: nn.Module) -> Optional[nn.Module]:
    return model.visual if isinstance(model, _CLIP_MODELS) else model


def _path(model: nn.Module, inner: str) -> str:
    """Dotted path from ``model`` to ``inner`` (a path inside the image tower)."""
    return f"visual.{inner}" if isinstance(model, _CLIP_MODELS) else inner


def _trunk(model: nn.Module) -> Optional[nn.Module]:
    """The timm trunk of a ``TimmModel`` tower (the timm host handles it), else None."""
    visual = _visual(model)
    return visual.trunk if isinstance(visual, TimmModel) else None


def _why_unsupported(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    if not isinstance(model, _CLIP_MODELS + (VisionTransformer, TimmModel)):
        return (f"{name} is not an open_clip model pm_kernels supports: expected a CLIP / CustomTextCLIP (its "
                ".visual), a VisionTransformer or a TimmModel image tower")
    visual = _visual(model)
    if isinstance(visual, TimmModel):
        if not TIMM_HOST.supports(visual.trunk):
            return f"{name}'s TimmModel tower: {TIMM_HOST.explain_unsupported(visual.trunk)}"
        return None
    if not isinstance(visual, VisionTransformer):
        return f"{name}'s image tower is a {type(visual).__name__}, not a Vision Transformer: it has no tokens to merge"
    if not visual.transformer.batch_first:
        return (f"{name}'s VisionTransformer runs its transformer sequence-first (batch_first=False): its blocks see "
                "(N, B, C) tokens; build it with batch_first=True (open_clip's default)")
    if visual.attn_pool is not None:
        return f"{name}'s VisionTransformer pools with attentional pooling (CoCa), which is not supported yet"
    for i, blk in enumerate(visual.transformer.resblocks):
        if not isinstance(blk, ResidualAttentionBlock):
            return (f"{name}'s VisionTransformer block {i} is a {type(blk).__name__} (qk_norm / scaled cosine "
                    "attention / scaled heads): only ResidualAttentionBlock with nn.MultiheadAttention is supported")
        attn = blk.attn
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            return (f"{name}'s VisionTransformer block {i}: expected a batch-first nn.MultiheadAttention with a "
                    "packed in_proj and no bias_k / bias_v / add_zero_attn")
    return None


def _blocks(visual: nn.Module) -> nn.ModuleList:
    return visual.transformer.resblocks


def _check_grid(visual: nn.Module, args: tuple):
    """Forward pre-hook of a patched VisionTransformer: a compressed structure runs on its own patch grid only."""
    layers = HOST.layers(visual)
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and any(b.M is not None for b in layers):
        p = tuple(visual.patch_size)
        want = structure_grid(layers, 1, tuple(visual.grid_size))
        check_grid_matches(want, (args[0].shape[-2] // p[0], args[0].shape[-1] // p[1]), p)


class OpenClipHost(Host):
    name = "open_clip"
    package = "open_clip"

    def supports(self, model: nn.Module) -> bool:
        return _why_unsupported(model) is None

    def explain_unsupported(self, model: nn.Module) -> str:
        return _why_unsupported(model) or super().explain_unsupported(model)

    def patch(self, model: nn.Module) -> nn.Module:
        trunk = _trunk(model)
        if trunk is not None:
            TIMM_HOST.patch(trunk)
            return model
        visual = _visual(model)
        if runner_of(_blocks(visual)) is not None:
            raise TypeError(f"model: this {type(model).__name__} is a pm_kernels.optimize form (inference only); "
                            "patch its .pm_source")
        if not self.is_patched(model):
            for blk in _blocks(visual):
                blk.__class__ = PMResidualAttentionBlock
                blk.init_pm(1)  # the class token
                PMAttentionMixin.init_pm(blk.attn)
            visual.register_forward_pre_hook(_check_grid)
        return model

    def is_patched(self, model: nn.Module) -> bool:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.is_patched(trunk)
        blocks = _blocks(_visual(model))
        return len(blocks) > 0 and all(isinstance(b, PMResidualAttentionBlock) for b in blocks)

    # ---- the layers

    def layers(self, model: nn.Module) -> List[nn.Module]:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.layers(trunk)
        blocks = _blocks(_visual(model))
        runner = runner_of(blocks)
        return list(runner.layers if runner is not None else blocks)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn if isinstance(layer, ResidualAttentionBlock) else TIMM_HOST.attention(layer)

    def num_heads(self, layer: nn.Module) -> int:
        return layer.attn.num_heads if isinstance(layer, ResidualAttentionBlock) else \
            TIMM_HOST.num_heads(layer)

    def attention_width(self, layer: nn.Module) -> int:
        return layer.attn.embed_dim if isinstance(layer, ResidualAttentionBlock) else \
            TIMM_HOST.attention_width(layer)

    def layer_macs_per_token(self, layer: nn.Module) -> int:
        macs = super().layer_macs_per_token(layer)  # the nn.Linear maps: output projection, MLP
        if isinstance(layer, ResidualAttentionBlock):  # q, k, v: the packed in_proj, a parameter, not a Linear
            macs += layer.attn.in_proj_weight.numel()
        return macs

    def layer_body(self, layer: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if type(layer) is ResidualAttentionBlock and layer.attn.batch_first:
            return lambda z: layer(z)
        return None

    # ---- tokens and grid

    def num_prefix(self, model: nn.Module) -> int:
        trunk = _trunk(model)
        return TIMM_HOST.num_prefix(trunk) if trunk is not None else 1

    def patch_size(self, model: nn.Module) -> Tuple[int, int]:
        trunk = _trunk(model)
        return TIMM_HOST.patch_size(trunk) if trunk is not None else tuple(_visual(model).patch_size)

    def grid(self, model: nn.Module) -> Tuple[int, int]:
        trunk = _trunk(model)
        return TIMM_HOST.grid(trunk) if trunk is not None else tuple(_visual(model).grid_size)

    def in_chans(self, model: nn.Module) -> int:
        return self.reference_tensor(model).shape[1]

    def embed_dim(self, model: nn.Module) -> int:
        trunk = _trunk(model)
        return TIMM_HOST.embed_dim(trunk) if trunk is not None else _visual(model).transformer.width

    def any_size(self, model: nn.Module) -> bool:
        trunk = _trunk(model)
        return TIMM_HOST.any_size(trunk) if trunk is not None else False

    def hook_tokens(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.hook_tokens(trunk, fn)
        return self.layers(model)[0].register_forward_pre_hook(lambda _blk, args: (fn(args[0]),) + tuple(args[1:]))

    # ---- running

    def forward_images(self, model: nn.Module, images: torch.Tensor) -> Any:
        return model.encode_image(images) if isinstance(model, _CLIP_MODELS) else model(images)

    def loss_input(self, outputs: Any) -> torch.Tensor:
        raise TypeError("loss_fn: an open_clip image tower returns image embeddings, not class logits: the default "
                        "cross-entropy has nothing to read; pass calibrate(model, batches, loss_fn=lambda "
                        "embeddings, targets: ...) with a loss of your own on the embeddings")

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.dense_features(trunk)
        visual = _visual(model)
        runner = runner_of(_blocks(visual))

        def features(images: torch.Tensor) -> torch.Tensor:
            x = visual._embeds(images)
            x = runner.all_tokens(x) if runner is not None else visual.transformer(x)
            return visual.ln_post(x)
        return features

    def remove_head(self, model: nn.Module) -> None:
        trunk = _trunk(model)
        if trunk is not None:
            TIMM_HOST.remove_head(trunk)
        else:
            _visual(model).proj = None

    # ---- compressing, deploying, counting

    def check_compressible(self, model: nn.Module) -> None:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.check_compressible(trunk)
        prob = getattr(_visual(model).patch_dropout, "prob", 0.0)
        if prob > 0:
            raise ValueError(f"model: patch dropout (patch_dropout={prob}) changes the token count in training; a "
                             "compressed structure needs a fixed one (build the tower with patch_dropout=0)")

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        trunk = _trunk(model)
        if trunk is not None:  # the trunk's own optimize form stands in for it (same call: images → features)
            fast = copy_replacing(model, _path(model, "trunk"), TIMM_HOST.optimize(trunk, folded))
            object.__setattr__(fast, "pm_source", model)
            object.__setattr__(fast, "folded_dtype", folded.folded_dtype)
            return fast
        return folded_copy(model, _path(model, "transformer.resblocks"), folded, self.layers(model),
                           self.head_reads_prefix_only(model))

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.head_reads_prefix_only(trunk)
        visual = _visual(model)
        return visual.pool_type == "tok" and visual.attn_pool is None and not visual.output_tokens

    def embed_macs(self, model: nn.Module, num_patches: int) -> int:
        trunk = _trunk(model)
        if trunk is not None:
            return TIMM_HOST.embed_macs(trunk, num_patches)
        conv = _visual(model).conv1
        return num_patches * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels // conv.groups

    def head_macs(self, model: nn.Module) -> int:
        trunk = _trunk(model)
        visual = _visual(model)
        if trunk is not None:  # the trunk's head, then the tower's pooling / projection on the pooled vector
            h, w = TIMM_HOST.grid(trunk)
            return TIMM_HOST.head_macs(trunk) + head_macs(visual.head, TIMM_HOST.num_prefix(trunk) + h * w)
        return 0 if visual.proj is None else visual.proj.shape[0] * visual.proj.shape[1]

    def reference_tensor(self, model: nn.Module) -> torch.Tensor:
        trunk = _trunk(model)
        return TIMM_HOST.reference_tensor(trunk) if trunk is not None else _visual(model).conv1.weight


HOST = OpenClipHost()
