"""timm registry entries: ``timm.create_model("pm_deit_small_patch16_224", ...)`` after ``import pm_kernels``.

The model starts with the identity structure (outputs equal DeiT's). Weights never download: pass
``checkpoint_path=...`` or ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``. A PM checkpoint brings
its own structure (M, R, keep_mask shapes); a dense DeiT checkpoint loads as the identity structure.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import checkpoint_filter_fn

from .patch import PMVisionTransformer

__all__ = ["PMVisionTransformer"]


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "pm_deit_tiny_patch16_224": _cfg(),
    "pm_deit_small_patch16_224": _cfg(),
    "pm_deit_base_patch16_224": _cfg(),
})


def _create_pm_deit(variant: str, pretrained: bool = False, **kwargs) -> PMVisionTransformer:
    kwargs.pop("out_indices", None)
    return build_model_with_cfg(PMVisionTransformer, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def pm_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> PMVisionTransformer:
    """PM-ViT-T: DeiT-Tiny/16 at 224 with Prune-and-Merge blocks."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_pm_deit("pm_deit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def pm_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> PMVisionTransformer:
    """PM-ViT-S: DeiT-Small/16 at 224 with Prune-and-Merge blocks."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_pm_deit("pm_deit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def pm_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> PMVisionTransformer:
    """PM-ViT-B: DeiT-Base/16 at 224 with Prune-and-Merge blocks."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_pm_deit("pm_deit_base_patch16_224", pretrained, **dict(args, **kwargs))
