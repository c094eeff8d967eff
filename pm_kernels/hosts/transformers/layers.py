"""transformers' Prune-and-Merge layers, attention and call checks, and ``patch_transformers`` (class swap, in place).

- Each layer of the tower becomes ``PM<LayerClass>`` (``PMLayerMixin`` + the library's class, made once per
  class): its ``forward`` is SPEC §1 (merge → ``body`` → reconstruct) and its ``body`` is the library layer's own
  forward on the K merged tokens, so LayerScale, SwiGLU, quick-GELU, drop-path need no code here. The tower's own
  loop keeps calling the layers (its output-capture hooks, ``output_hidden_states`` with N tokens per layer,
  gradient checkpointing), each layer exposes ``M``, ``R``, ``keep_mask`` like a timm block.
- Attention goes through transformers' registry: the implementation ``"pm_kernels"`` (registered in
  ``AttentionInterface`` and, passing masks through to be refused, ``AttentionMaskInterface``) is set on the
  tower's config; it calls ``pm_kernels.layers.attend`` with the attention module, whose ``score_accumulator``
  and ``backend`` (``PMAttentionMixin.init_pm``) it reads: the fused kernels and the SPEC §3 score.
- One forward pre-hook on the tower (``check_call``) refuses what a PM model cannot do, naming the model: an
  ``attention_mask``, ``output_attentions`` on a compressed model (its layers attend among K merged tokens), per
  layer outputs from the optimize form, an image whose patch grid is not the structure's.

State-dict keys stay the library's, plus ``<layers>.i.M / .R / .keep_mask`` where a layer has a structure.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ...layers import PMAttentionMixin, PMBlockMixin, attend
from ..base import check_grid_matches, structure_grid
from ..folded_copy import module_at, runner_of
from .families import model_spec, supported_names, tower_spec

__all__ = ["IMPLEMENTATION", "PMLayerMixin", "pm_layer_class", "patch_transformers", "is_patched", "parts",
           "tower_layers", "grid", "check_call"]

IMPLEMENTATION = "pm_kernels"  # the attention implementation a patched tower's config names


# ----------------------------------------------------------------------------------------------- attention

def _wants_attentions(module: nn.Module, kwargs: dict) -> bool:
    requested = kwargs.get("output_attentions")
    return bool(requested if requested is not None else getattr(module.config, "output_attentions", False))


def pm_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                 **kwargs):
    """transformers' attention-function signature → ``pm_kernels.attention`` (q, k, v: (B, H, N, D)); returns
    ((B, N, H, D), None), or the probabilities too when ``output_attentions`` asks for them (a dense layer: the
    call hook refuses it on a compressed model)."""
    if attention_mask is not None or kwargs.get("is_causal"):
        raise ValueError(f"attention_mask: a Prune-and-Merge {type(module).__name__} attends over all tokens of "
                         "an image; it takes no attention mask and no causal flag")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if _wants_attentions(module, kwargs):  # the dense layer, as transformers' eager attention computes it
        probs = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * scale, dim=-1)
        out = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
        return out.transpose(1, 2).contiguous(), probs
    out = attend(module, query, key, value, scale, dropout)
    return out.transpose(1, 2).contiguous(), None


def _pass_mask_through(*args, attention_mask=None, **kwargs):
    """The mask a ``"pm_kernels"`` tower builds: the user's mask unchanged (None without one), so that the layers
    refuse it; transformers would otherwise drop a mask for an implementation it does not know."""
    return attention_mask


AttentionInterface.register(IMPLEMENTATION, pm_attention)
AttentionMaskInterface.register(IMPLEMENTATION, _pass_mask_through)


# -------------------------------------------------------------------------------------------------- layers

class PMLayerMixin(PMBlockMixin):
    """A transformers encoder layer as a PM layer: SPEC §1 around the layer's own forward (``pm_base``)."""

    pm_base: type  # the library's layer class (set on each PM class)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if attention_mask is not None:
            raise ValueError(f"attention_mask: a Prune-and-Merge {self.pm_base.__name__} takes no attention mask")
        return self.pm_forward(hidden_states, kwargs)

    def body(self, z: torch.Tensor, layer_kwargs: Optional[dict] = None) -> torch.Tensor:
        """The library layer on the K merged tokens (``layer_kwargs``: the tower's per-call flags)."""
        return self.pm_base.forward(self, z, None, **(layer_kwargs or {}))


_PM_LAYERS: Dict[type, type] = {}


def pm_layer_class(cls: type) -> type:
    """``PM<cls>``: the PM class of a transformers layer class (made once; transformers wraps its ``forward``
    for gradient checkpointing, as it does for every subclass of a checkpointing layer)."""
    if cls not in _PM_LAYERS:
        _PM_LAYERS[cls] = type(f"PM{cls.__name__}", (PMLayerMixin, cls), {"pm_base": cls, "__module__": __name__})
    return _PM_LAYERS[cls]


# ---------------------------------------------------------------------------------------------- the model

def parts(model: nn.Module):
    """(model spec, tower, tower spec) of a supported model; TypeError naming the class otherwise."""
    spec = model_spec(model)
    tower = None if spec is None else module_at(model, spec.tower)
    tspec = None if tower is None else tower_spec(tower)
    if tspec is None:
        raise TypeError(f"model: {type(model).__name__} is not a transformers model pm_kernels supports: expected "
                        f"one of {supported_names()}")
    return spec, tower, tspec


def tower_layers(tower: nn.Module, tspec) -> list:
    """The tower's PM layers (through the ``FoldedRunner`` of an optimize form)."""
    layer_list = module_at(tower, tspec.layers)
    runner = runner_of(layer_list)
    return list(runner.layers if runner is not None else layer_list)


def grid(tower: nn.Module, tspec):
    conv = module_at(tower, tspec.patch_conv)
    size = tower.config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h // conv.kernel_size[0], w // conv.kernel_size[1]


def is_patched(model: nn.Module) -> bool:
    spec, tower, tspec = parts(model)
    layers = module_at(tower, tspec.layers)
    return runner_of(layers) is None and len(layers) > 0 and all(isinstance(l, PMLayerMixin) for l in layers)


def check_call(tower: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a patched tower (and of its optimize form, which shares it)."""
    tspec = tower_spec(tower)
    name = type(tower).__name__
    if kwargs.get("attention_mask") is not None:
        raise ValueError(f"attention_mask: a Prune-and-Merge {name} takes no attention mask (every image keeps all "
                         "its tokens; the structure is per layer, the same for every image)")
    if tower.config._attn_implementation != IMPLEMENTATION:
        raise ValueError(f"model: {name}'s config._attn_implementation was set to "
                         f"{tower.config._attn_implementation!r} after pm_kernels.patch: its layers would attend "
                         f"without pm_kernels (no calibration score, no kernels); "
                         f"model.set_attn_implementation({IMPLEMENTATION!r}) sets it back")
    layers = tower_layers(tower, tspec)
    optimized = runner_of(module_at(tower, tspec.layers)) is not None
    compressed = any(layer.M is not None for layer in layers)
    config = tower.config

    def asked(flag: str) -> bool:
        value = kwargs.get(flag)
        return bool(value if value is not None else getattr(config, flag, False))

    for flag in ("output_hidden_states", "output_attentions"):
        if optimized and asked(flag):
            raise ValueError(f"{flag}: the pm_kernels.optimize form of {name} folds the layer boundaries and forms "
                             "no per-layer tokens; ask the PM model (the optimize form's .pm_source)")
    if compressed and asked("output_attentions"):
        raise ValueError(f"output_attentions: a compressed {name} attends among the K merged tokens of each layer, "
                         "not the N tokens of the image: there is no N×N attention map to return")
    images = args[0] if args else kwargs.get("pixel_values")
    if compressed and isinstance(images, torch.Tensor) and images.dim() == 4:
        conv = module_at(tower, tspec.patch_conv)
        patch = tuple(conv.kernel_size)
        want = structure_grid(layers, tspec.prefix(config), grid(tower, tspec))
        check_grid_matches(want, (images.shape[-2] // patch[0], images.shape[-1] // patch[1]), patch)


def patch_transformers(model: nn.Module) -> nn.Module:
    """Make a supported transformers model (``families.MODELS``) a Prune-and-Merge model in place, with the
    identity structure (the dense model: outputs equal the model's), and return it. A patched model is
    returned as it is."""
    spec, tower, tspec = parts(model)
    layer_list = module_at(tower, tspec.layers)
    if runner_of(layer_list) is not None:
        raise TypeError(f"model: this {type(model).__name__} is a pm_kernels.optimize form (inference only); "
                        "patch its .pm_source")
    if is_patched(model):
        return model
    for i, layer in enumerate(layer_list):
        if type(layer) is not tspec.layer:
            raise TypeError(f"model: {tspec.layers}[{i}] of {type(tower).__name__}: expected a "
                            f"{tspec.layer.__name__}, got {type(layer).__name__}")
    prefix = tspec.prefix(tower.config)
    configs = {id(tower.config): tower.config}
    for layer in layer_list:
        layer.__class__ = pm_layer_class(type(layer))
        layer.init_pm(prefix)
        attention = getattr(layer, tspec.attention)
        PMAttentionMixin.init_pm(attention)  # score_accumulator and backend on the library's module
        configs[id(attention.config)] = attention.config
    for config in configs.values():
        config._attn_implementation = IMPLEMENTATION
    tower.register_forward_pre_hook(check_call, with_kwargs=True)
    return model
