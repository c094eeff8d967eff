"""transformers' SAM image encoder (``SamVisionEncoder``, alone, in ``SamVisionModel``, in ``SamModel``) as a
Prune-and-Merge model (docs/windowed_attention.md).

Each ``SamVisionLayer`` becomes a ``PMSamVisionLayer`` (``WindowedPMBlockMixin``: SPEC §1 per window) and its
attention (eager or SDPA class) a ``PMSamVisionAttention`` (q, k, v, the relative-position tables and the
projection where transformers has them; attention through ``pm_kernels.attention``). The encoder keeps looping
over its layers on (B, H, W, C) tokens (``output_hidden_states``, gradient checkpointing), its neck and SamModel's
prompt encoder and mask decoder run unchanged on the reconstructed grid. ``optimize`` replaces the layer list by
one ``FoldedRunner`` (a shallow copy: same call, same output type). A forward pre-hook on the encoder refuses
``output_attentions`` (no attention maps are formed, as transformers' SDPA attention forms none) and per-layer
outputs from the optimize form.
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import SamModel, SamVisionModel
from transformers.models.sam.modeling_sam import (SamVisionAttention, SamVisionEncoder, SamVisionLayer,
                                                  SamVisionSdpaAttention)

from ...windowed import WindowedAttentionMixin, WindowedPMBlockMixin, grid_attention
from ..folded_copy import folded_copy, module_at, runner_of
from ..windowed import WindowedHostMixin, neck_macs, structure_window

__all__ = ["PMSamVisionAttention", "PMSamVisionLayer", "patch_sam", "TransformersSamHostMixin", "ENCODER_PATHS"]

# model class → path of its SamVisionEncoder
ENCODER_PATHS: Dict[type, str] = {SamVisionEncoder: "", SamVisionModel: "vision_encoder", SamModel: "vision_encoder"}


class PMSamVisionAttention(WindowedAttentionMixin, SamVisionAttention):
    """transformers' SAM vision attention whose core is ``pm_kernels.attention``."""

    def pm_qkv(self, x: torch.Tensor):
        B_, n, _ = x.shape
        qkv = self.qkv(x).reshape(B_, n, 3, self.num_attention_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def pm_rel_pos(self, size_h: int, size_w: int):
        if not self.use_rel_pos:
            return None
        return self.get_rel_pos(size_h, size_h, self.rel_pos_h), self.get_rel_pos(size_w, size_w, self.rel_pos_w)

    def pm_project(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj(out)

    def pm_scale(self) -> float:
        return self.scale

    def pm_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> Tuple[torch.Tensor, None]:
        """(B_, h, w, C) → ((B_, h, w, C), None): attention over every position (no score: the layer scores)."""
        return grid_attention(self, hidden_states), None


class PMSamVisionLayer(WindowedPMBlockMixin, SamVisionLayer):
    """``SamVisionLayer`` (windowed or global) as a PM layer on (B, H, W, C) tokens."""

    @property
    def pm_attention(self) -> PMSamVisionAttention:
        return self.attn

    def pm_norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm1(x)

    def pm_attention_branch(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def pm_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.layer_norm2(x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pm_forward(hidden_states)


def encoder_of(model: nn.Module) -> Optional[Tuple[str, SamVisionEncoder]]:
    """(path, encoder) of a supported SAM model, else None."""
    for cls in type(model).__mro__:
        if cls in ENCODER_PATHS:
            encoder = module_at(model, ENCODER_PATHS[cls])
            return (ENCODER_PATHS[cls], encoder) if isinstance(encoder, SamVisionEncoder) else None
    return None


def _encoder(model: nn.Module) -> SamVisionEncoder:
    found = encoder_of(model)
    if found is None:
        raise TypeError(f"model: expected a SamVisionEncoder, SamVisionModel or SamModel, got {type(model).__name__}")
    return found[1]


def encoder_layers(encoder: SamVisionEncoder) -> List[nn.Module]:
    runner = runner_of(encoder.layers)
    return list(runner.layers if runner is not None else encoder.layers)


def is_sam_patched(model: nn.Module) -> bool:
    encoder = _encoder(model)
    return runner_of(encoder.layers) is None and all(isinstance(l, PMSamVisionLayer) for l in encoder.layers)


def check_sam_call(encoder: SamVisionEncoder, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched encoder (and of its optimize form, which shares it)."""
    name = type(encoder).__name__

    def asked(flag: str) -> bool:
        value = kwargs.get(flag)
        return bool(value if value is not None else getattr(encoder.config, flag, False))

    if asked("output_attentions"):
        raise ValueError(f"output_attentions: a Prune-and-Merge {name} attends through pm_kernels.attention and "
                         "forms no attention maps (as transformers' SDPA attention forms none)")
    if runner_of(encoder.layers) is not None and asked("output_hidden_states"):
        raise ValueError(f"output_hidden_states: the pm_kernels.optimize form of {name} folds the layer boundaries "
                         "and forms no per-layer tokens; ask the PM model (the optimize form's .pm_source)")


def patch_sam(model: nn.Module) -> nn.Module:
    """Make a transformers SAM model (its image encoder) Prune-and-Merge in place, with the identity structure (the
    dense encoder), and return it."""
    encoder = _encoder(model)
    if runner_of(encoder.layers) is not None:
        raise TypeError(f"model: this {type(model).__name__} is a pm_kernels.optimize form (inference only); "
                        "patch its .pm_source")
    if is_sam_patched(model):
        return model
    for i, layer in enumerate(encoder.layers):
        if type(layer) is not SamVisionLayer or type(layer.attn) not in (SamVisionAttention, SamVisionSdpaAttention):
            raise TypeError(f"model: layers[{i}] of {type(encoder).__name__}: expected a SamVisionLayer with "
                            f"SamVisionAttention, got {type(layer).__name__} with {type(layer.attn).__name__}")
    window = structure_window([layer.window_size for layer in encoder.layers], type(model).__name__)
    for layer in encoder.layers:
        layer.__class__ = PMSamVisionLayer
        layer.attn.__class__ = PMSamVisionAttention
        layer.attn.init_pm()
        layer.init_pm(0, layer.window_size, window)
    encoder.register_forward_pre_hook(check_sam_call, with_kwargs=True)
    return model


class TransformersSamHostMixin(WindowedHostMixin):
    """The transformers host's methods for SAM's image encoder (mixed before ``TransformersHost``)."""

    def supports(self, model: nn.Module) -> bool:
        return encoder_of(model) is not None

    def patch(self, model: nn.Module) -> nn.Module:
        return patch_sam(model)

    def is_patched(self, model: nn.Module) -> bool:
        return is_sam_patched(model)

    def layers(self, model: nn.Module) -> List[nn.Module]:
        return encoder_layers(_encoder(model))

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def num_heads(self, layer: nn.Module) -> int:
        return layer.attn.num_attention_heads

    def attention_width(self, layer: nn.Module) -> int:
        return layer.attn.qkv.out_features // 3

    def layer_body(self, layer: nn.Module):
        return None

    def window(self, layer: nn.Module) -> int:
        return layer.window_size

    def attention_macs_per_token(self, layer: nn.Module) -> int:
        return self.layer_macs_per_token(layer.attn)

    def uses_rel_pos(self, layer: nn.Module) -> bool:
        return bool(layer.attn.use_rel_pos)

    def patch_size(self, model: nn.Module) -> Tuple[int, int]:
        return tuple(_encoder(model).patch_embed.projection.kernel_size)

    def grid(self, model: nn.Module) -> Tuple[int, int]:
        size, (ph, pw) = _encoder(model).config.image_size, self.patch_size(model)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h // ph, w // pw

    def in_chans(self, model: nn.Module) -> int:
        return _encoder(model).patch_embed.projection.in_channels

    def embed_dim(self, model: nn.Module) -> int:
        return _encoder(model).config.hidden_size

    def any_size(self, model: nn.Module) -> bool:
        return False  # SamPatchEmbeddings takes its configured image size only

    def forward_images(self, model: nn.Module, images: torch.Tensor):
        return model(pixel_values=images)

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        encoder = _encoder(model)  # the neck's output on the grid, as (B, N, channels) tokens
        return lambda images: encoder(pixel_values=images).last_hidden_state.flatten(2).transpose(1, 2)

    def remove_head(self, model: nn.Module) -> None:
        pass  # the encoder ends in its neck: no classifier

    def check_compressible(self, model: nn.Module) -> None:
        pass

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        path = ".".join(filter(None, (encoder_of(model)[0], "layers")))
        return folded_copy(model, path, folded, self.layers(model), False)

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        return False

    def embed_macs(self, model: nn.Module, num_patches: int) -> int:
        conv = _encoder(model).patch_embed.projection
        return num_patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels

    def head_macs(self, model: nn.Module) -> int:
        """The neck (SamModel's prompt encoder and mask decoder depend on the prompts: not counted)."""
        h, w = self.grid(model)
        return neck_macs(_encoder(model).neck, h * w)

    def reference_tensor(self, model: nn.Module) -> torch.Tensor:
        return _encoder(model).patch_embed.projection.weight
