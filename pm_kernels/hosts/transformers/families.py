"""The transformers model classes pm_kernels supports, and where their parts are (transformers 5.x).

A *tower* is the model that embeds the image and loops over the layers (``ViTModel``, ``CLIPVisionModel``,
``Dinov2Model``, ...); a supported *model* is a tower or a model holding one (a classifier, a projection, a
two-tower CLIP). ``TOWERS`` and ``MODELS`` say where the parts are; ``REFUSED`` why some look alike but cannot run
a Prune-and-Merge structure. Paths are dotted attribute names from the model (``""``: the model itself).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn
from transformers import (CLIPForImageClassification, CLIPModel, CLIPVisionModel,
                          CLIPVisionModelWithProjection, DeiTForImageClassification,
                          DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Backbone,
                          Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersBackbone,
                          Dinov2WithRegistersForImageClassification, Dinov2WithRegistersModel, SiglipForImageClassification,
                          SiglipModel, SiglipVisionModel, ViTForImageClassification, ViTModel)
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer

__all__ = ["Tower", "Model", "TOWERS", "MODELS", "tower_spec", "model_spec", "refusal"]


@dataclass(frozen=True)
class Tower:
    layers: str                     # the layer list (an nn.ModuleList the tower's forward loops over)
    layer: type                     # the class of its layers
    attention: str                  # the attention module of a layer
    patch_conv: str                 # the patch-embedding convolution
    prefix: Callable[[object], int]  # config → P, the tokens before the patches
    any_size: bool = False          # always interpolates its position embedding (runs any image size)


@dataclass(frozen=True)
class Model:
    tower: str = ""                 # path of the tower
    image_features: bool = False    # a two-tower model: images go through ``get_image_features``
    prefix_heads: Tuple[str, ...] = ()  # classifiers reading only the prefix tokens (the optimize exit may
    #                                     reconstruct only those); empty: the output exposes every token
    heads: Tuple[str, ...] = ()     # modules after the tower, for the MAC count
    foldable: bool = True           # False: the output is built from every layer's tokens (a *Backbone)


_ONE = lambda config: 1  # noqa: E731  (CLS)
TOWERS: Dict[type, Tower] = {
    ViTModel: Tower("layers", ViTLayer, "attention", "embeddings.patch_embeddings.projection", _ONE),
    DeiTModel: Tower("layers", DeiTLayer, "attention", "embeddings.patch_embeddings.projection",
                     lambda config: 2),  # CLS + distillation token
    CLIPVisionModel: Tower("encoder.layers", CLIPEncoderLayer, "self_attn", "embeddings.patch_embedding", _ONE),
    SiglipVisionModel: Tower("encoder.layers", SiglipEncoderLayer, "self_attn", "embeddings.patch_embedding",
                             lambda config: 0),
    Dinov2Model: Tower("encoder.layer", Dinov2Layer, "attention", "embeddings.patch_embeddings.projection", _ONE,
                       any_size=True),
    Dinov2WithRegistersModel: Tower("encoder.layer", Dinov2WithRegistersLayer, "attention",
                                    "embeddings.patch_embeddings.projection",
                                    lambda config: 1 + config.num_register_tokens, any_size=True),
}
TOWERS[Dinov2Backbone] = TOWERS[Dinov2Model]
TOWERS[Dinov2WithRegistersBackbone] = TOWERS[Dinov2WithRegistersModel]

MODELS: Dict[type, Model] = {
    ViTModel: Model(heads=("pooler",)),
    ViTForImageClassification: Model("vit", prefix_heads=("classifier",), heads=("classifier",)),
    DeiTModel: Model(heads=("pooler",)),
    DeiTForImageClassification: Model("deit", prefix_heads=("classifier",), heads=("classifier",)),
    DeiTForImageClassificationWithTeacher: Model("deit", prefix_heads=("cls_classifier", "distillation_classifier"),
                                                 heads=("cls_classifier", "distillation_classifier")),
    CLIPVisionModel: Model(),
    CLIPVisionModelWithProjection: Model("vision_model", heads=("visual_projection",)),
    CLIPModel: Model("vision_model", image_features=True, heads=("visual_projection",)),
    CLIPForImageClassification: Model("vision_model", heads=("classifier",)),
    SiglipVisionModel: Model(heads=("head",)),
    SiglipModel: Model("vision_model", image_features=True, heads=("vision_model.head",)),
    SiglipForImageClassification: Model("vision_model", heads=("vision_model.head", "classifier")),
    Dinov2Model: Model(),
    Dinov2ForImageClassification: Model("dinov2", heads=("classifier",)),
    Dinov2Backbone: Model(foldable=False),
    Dinov2WithRegistersModel: Model(),
    Dinov2WithRegistersForImageClassification: Model("dinov2_with_registers", heads=("classifier",)),
    Dinov2WithRegistersBackbone: Model(foldable=False),
}


def _lookup(table: dict, model: nn.Module):
    for cls in type(model).__mro__:  # a user's subclass of a supported class is that class
        if cls in table:
            return table[cls]
    return None


def model_spec(model: nn.Module) -> Optional[Model]:
    return _lookup(MODELS, model)


def tower_spec(tower: nn.Module) -> Optional[Tower]:
    return _lookup(TOWERS, tower)


def _vit_mae(model: nn.Module) -> str:
    ratio = getattr(getattr(model, "config", None), "mask_ratio", None)
    if ratio:
        return (f"random masking (config.mask_ratio={ratio}) keeps a different random subset of the patches in "
                "every image, so there is no fixed token layout for a per-layer structure")
    return ("even at mask_ratio=0 its embedding shuffles the patches in a random order per image "
            "(random_masking), so there is no fixed patch grid for a per-layer structure")


# library module family (transformers.models.<family>) → why its models are refused
REFUSED: Dict[str, Callable[[nn.Module], str]] = {
    "sam": lambda model: "of the SAM family, Prune-and-Merge supports SAM's ViT image encoder (SamVisionEncoder, "
                         "SamVisionModel, SamModel); SAM 2 / 3 (Hiera and other backbones) and SAM-HQ (an encoder "
                         "whose output includes its windowed stages' tokens) are not supported",
    "siglip2": lambda model: "Siglip2's NaFlex vision tower takes a different patch grid per image (pixel "
                             "attention masks and spatial shapes), while a Prune-and-Merge structure is built "
                             "for one fixed grid",
    "vit_mae": _vit_mae,
}


def refusal(model: nn.Module) -> Optional[str]:
    """Why ``model`` (a transformers model) is refused, for the families that look supported but are not."""
    family = (type(model).__module__ or "").split(".")
    family = family[2] if len(family) > 2 and family[1] == "models" else ""
    for key, why in REFUSED.items():
        if family == key or key == "sam" and family.startswith("sam"):
            return why(model)
    return None


def supported_names() -> str:
    return ", ".join(cls.__name__ for cls in MODELS)
