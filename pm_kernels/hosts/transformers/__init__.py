"""The transformers host: HuggingFace transformers' Vision Transformers for pm_kernels (``pip install pm-kernels[hf]``).

ViT, DeiT (CLS + distillation token), CLIP and SigLIP vision towers (alone, with a projection, inside the
two-tower ``CLIPModel`` / ``SiglipModel``: their vision tower), DINOv2 with and without registers, and their
``*ForImageClassification`` / ``*Backbone`` heads (``families``); SAM's image encoder (``sam``: its own host). The only place of the package that reads
transformers' names: the tables (``families``), the PM layers, attention and call checks (``layers``), the
``save_pretrained`` round trip (``pretrained``) and ``TransformersHost`` below.

    model = ViTForImageClassification(config)               # or .from_pretrained(...)
    pm_kernels.patch(model)                                  # identity structure: the dense model
    scores = pm_kernels.calibrate(model, batches)            # default loss: cross-entropy on .logits
    pm_kernels.compress(model, scores, keep_rate=0.6)
    fast = pm_kernels.optimize(model)                        # same call, same ModelOutput type
    model.save_pretrained(folder)                            # the structure rides along in the safetensors
    model = from_pretrained(ViTForImageClassification, folder)   # back as a compressed model
"""
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..base import Host
from ..folded_copy import folded_copy, head_macs, module_at, runner_of
from .families import TOWERS, model_spec, refusal, supported_names
from .layers import PMLayerMixin, grid, is_patched, parts, patch_transformers, tower_layers
from .pretrained import from_pretrained
from .sam import TransformersSamHostMixin

__all__ = ["HOST", "HOSTS", "TransformersHost", "TransformersSamHost", "PMLayerMixin", "from_pretrained", "patch_transformers"]


class TransformersHost(Host):
    name = "transformers"
    package = "transformers"

    def supports(self, model: nn.Module) -> bool:
        try:
            parts(model)
        except TypeError:
            return False
        return True

    def explain_unsupported(self, model: nn.Module) -> str:
        why = refusal(model)
        if why is not None:
            return f"{type(model).__name__} is not supported by Prune-and-Merge: {why}"
        return (f"{type(model).__name__} is not a transformers model pm_kernels supports: expected one of "
                f"{supported_names()}")

    def patch(self, model: nn.Module) -> nn.Module:
        return patch_transformers(model)

    def is_patched(self, model: nn.Module) -> bool:
        return is_patched(model)

    # ---- the layers

    def layers(self, model: nn.Module) -> List[nn.Module]:
        _, tower, tspec = parts(model)
        return tower_layers(tower, tspec)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self._layer_tower(layer).attention)

    def num_heads(self, layer: nn.Module) -> int:
        return self.attention(layer).config.num_attention_heads

    def attention_width(self, layer: nn.Module) -> int:
        attention = self.attention(layer)
        return attention.config.num_attention_heads * attention.head_dim

    def layer_body(self, layer: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if any(type(layer) is t.layer for t in TOWERS.values()):
            return lambda z: type(layer).forward(layer, z, None)
        return None

    @staticmethod
    def _layer_tower(layer: nn.Module):
        for tspec in TOWERS.values():
            if isinstance(layer, tspec.layer):
                return tspec
        raise TypeError(f"layer: expected a layer of a supported transformers tower, got {type(layer).__name__}")

    # ---- tokens and grid

    def num_prefix(self, model: nn.Module) -> int:
        _, tower, tspec = parts(model)
        return tspec.prefix(tower.config)

    def patch_size(self, model: nn.Module) -> Tuple[int, int]:
        _, tower, tspec = parts(model)
        return tuple(module_at(tower, tspec.patch_conv).kernel_size)

    def grid(self, model: nn.Module) -> Tuple[int, int]:
        _, tower, tspec = parts(model)
        return grid(tower, tspec)

    def in_chans(self, model: nn.Module) -> int:
        return self.reference_tensor(model).shape[1]

    def embed_dim(self, model: nn.Module) -> int:
        return parts(model)[1].config.hidden_size

    def any_size(self, model: nn.Module) -> bool:
        return parts(model)[2].any_size

    def hook_tokens(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        first = self.layers(model)[0]
        return first.register_forward_pre_hook(lambda _layer, args: (fn(args[0]),) + tuple(args[1:]))

    # ---- running

    def forward_images(self, model: nn.Module, images: torch.Tensor) -> Any:
        if parts(model)[0].image_features:
            return model.get_image_features(pixel_values=images)
        return model(pixel_values=images)

    def loss_input(self, outputs: Any) -> torch.Tensor:
        logits = outputs.get("logits") if isinstance(outputs, ModelOutput) else None
        if logits is None:
            fields = ", ".join(outputs.keys()) if isinstance(outputs, ModelOutput) else type(outputs).__name__
            raise TypeError(f"loss_fn: this model returns no class logits ({fields}): the default cross-entropy "
                            "has nothing to read; pass calibrate(model, batches, loss_fn=lambda outputs, targets: "
                            "...) with a loss of your own on these outputs")
        return logits

    def dense_features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        spec, tower, tspec = parts(model)
        runner = runner_of(module_at(tower, tspec.layers))
        if runner is not None and runner.prefix_only:
            raise ValueError(f"model: this optimize form of {type(model).__name__} reconstructs only the prefix "
                             "tokens for its classifier; remove the head (a Segmenter does) before optimize")
        return lambda images: tower(pixel_values=images).last_hidden_state

    def remove_head(self, model: nn.Module) -> None:
        # every module after the tower's last norm (classifiers, pooler, projection, attention pool) becomes an
        # identity: a task head reads the tokens, and the MAC count and the optimize exit follow
        for path in model_spec(model).heads:
            owner, _, name = path.rpartition(".")
            if isinstance(module_at(model, path), nn.Module):
                setattr(module_at(model, owner), name, nn.Identity())

    # ---- compressing, deploying, counting

    def optimize(self, model: nn.Module, folded: nn.Module) -> nn.Module:
        spec, tower, tspec = parts(model)
        if not spec.foldable:
            raise TypeError(f"model: {type(model).__name__} builds its output from every layer's tokens (feature "
                            "maps); optimize folds the layer boundaries and forms none: run the PM model itself")
        path = ".".join(filter(None, (spec.tower, tspec.layers)))
        return folded_copy(model, path, folded, self.layers(model), self.head_reads_prefix_only(model))

    def head_reads_prefix_only(self, model: nn.Module) -> bool:
        spec = model_spec(model)
        return bool(spec.prefix_heads) and not any(
            isinstance(module_at(model, path), nn.Identity) for path in spec.prefix_heads)

    def embed_macs(self, model: nn.Module, num_patches: int) -> int:
        _, tower, tspec = parts(model)
        conv = module_at(tower, tspec.patch_conv)
        return num_patches * conv.in_channels * math.prod(conv.kernel_size) * conv.out_channels // conv.groups

    def head_macs(self, model: nn.Module) -> int:
        h, w = self.grid(model)
        n = self.num_prefix(model) + h * w
        return sum(head_macs(module_at(model, path), n) for path in model_spec(model).heads)

    def export_outputs(self, outputs: Any) -> Any:
        """A ``ModelOutput``'s tensors in field order, nested tuples and outputs flattened (the file's outputs)."""
        if isinstance(outputs, torch.Tensor):
            return outputs
        return tuple(_flat_tensors(outputs))

    def reference_tensor(self, model: nn.Module) -> torch.Tensor:
        _, tower, tspec = parts(model)
        return module_at(tower, tspec.patch_conv).weight


def _flat_tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, ModelOutput):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


class TransformersSamHost(TransformersSamHostMixin, TransformersHost):
    """SAM's image encoder (``SamVisionEncoder``, ``SamVisionModel``, ``SamModel``): windowed and global layers
    (``sam``)."""


HOST = TransformersHost()
HOSTS = (HOST, TransformersSamHost())
