"""timm registry entries: ``timm.create_model("pm_<timm name>", ...)`` after ``import pm_kernels``.

Each ``pm_*`` model is the timm model of the same name (same arguments, default config, feature config and
``out_indices``, as timm builds its ViTs) with Prune-and-Merge blocks and the identity structure (outputs equal
the dense model's). Weights never download: pass ``checkpoint_path=...`` or ``pretrained=True,
pretrained_cfg_overlay=dict(file=...)``. A PM checkpoint brings its own structure (M, R, keep_mask shapes); a
dense timm checkpoint of the base model loads as the identity structure.
"""
import sys
from functools import partial
from typing import Callable, Dict, Tuple

from timm.layers import LayerNorm
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter

from .model import PMEva, PMVisionTransformer, PMVisionTransformerDistilled

__all__ = ["PM_MODELS", "PMVisionTransformer", "PMVisionTransformerDistilled", "PMEva"]

_DEIT_FILTER = partial(vit_checkpoint_filter, adapt_layer_scale=True)
_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))

# pm name → (timm base model, PM class, checkpoint filter, the base's model arguments as timm 1.0 gives them)
PM_MODELS: Dict[str, Tuple[str, type, Callable, dict]] = {
    "pm_deit_tiny_patch16_224": ("deit_tiny_patch16_224", PMVisionTransformer, _DEIT_FILTER,
                                 dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "pm_deit_small_patch16_224": ("deit_small_patch16_224", PMVisionTransformer, _DEIT_FILTER,
                                  dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "pm_deit_base_patch16_224": ("deit_base_patch16_224", PMVisionTransformer, _DEIT_FILTER,
                                 dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    "pm_deit_tiny_distilled_patch16_224": ("deit_tiny_distilled_patch16_224", PMVisionTransformerDistilled,
                                           _DEIT_FILTER, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "pm_deit_small_distilled_patch16_224": ("deit_small_distilled_patch16_224", PMVisionTransformerDistilled,
                                            _DEIT_FILTER, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "pm_deit_base_distilled_patch16_224": ("deit_base_distilled_patch16_224", PMVisionTransformerDistilled,
                                           _DEIT_FILTER, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    "pm_vit_small_patch14_dinov2": ("vit_small_patch14_dinov2", PMVisionTransformer, vit_checkpoint_filter,
                                    dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)),
    "pm_vit_small_patch14_reg4_dinov2": ("vit_small_patch14_reg4_dinov2", PMVisionTransformer, vit_checkpoint_filter,
                                         dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5,
                                              reg_tokens=4, no_embed_class=True)),
    "pm_vit_base_patch14_reg4_dinov2": ("vit_base_patch14_reg4_dinov2", PMVisionTransformer, vit_checkpoint_filter,
                                        dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                                             reg_tokens=4, no_embed_class=True)),
    "pm_vit_base_patch16_clip_224": ("vit_base_patch16_clip_224", PMVisionTransformer, vit_checkpoint_filter,
                                     dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
                                          norm_layer=partial(LayerNorm, eps=1e-5))),
    "pm_vit_medium_patch16_gap_256": ("vit_medium_patch16_gap_256", PMVisionTransformer, vit_checkpoint_filter,
                                      dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, class_token=False,
                                           global_pool="avg", qkv_bias=False, init_values=1e-6, fc_norm=False)),
    "pm_vit_little_patch16_reg1_gap_256": ("vit_little_patch16_reg1_gap_256", PMVisionTransformer,
                                           vit_checkpoint_filter,
                                           dict(patch_size=16, embed_dim=320, depth=14, num_heads=5, init_values=1e-5,
                                                mlp_ratio=5.6, class_token=False, no_embed_class=True, reg_tokens=1,
                                                global_pool="avg")),
    "pm_eva02_tiny_patch14_224": ("eva02_tiny_patch14_224", PMEva, eva_checkpoint_filter,
                                  dict(_EVA02, img_size=224, embed_dim=192, depth=12, num_heads=3)),
    "pm_eva02_small_patch14_224": ("eva02_small_patch14_224", PMEva, eva_checkpoint_filter,
                                   dict(_EVA02, img_size=224, embed_dim=384, depth=12, num_heads=6)),
}


def _default_cfg(base: str) -> dict:
    """The base model's default config, with nothing to download."""
    cfg = get_pretrained_cfg(base).to_dict()
    for key in ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "state_dict", "source",
                "tag", "architecture", "license", "origin_url", "paper_ids", "paper_name", "notes"):
        cfg.pop(key, None)
    return dict(cfg, url="")


default_cfgs = {name: _default_cfg(base) for name, (base, _, _, _) in PM_MODELS.items()}


def _create(name: str, pretrained: bool = False, **kwargs):
    _, cls, checkpoint_filter, args = PM_MODELS[name]
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(cls, name, pretrained, pretrained_filter_fn=checkpoint_filter,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **dict(args, **kwargs))


def _entry(name: str):
    def entry(pretrained: bool = False, **kwargs):
        return _create(name, pretrained, **kwargs)
    base = PM_MODELS[name][0]
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm's {base} with Prune-and-Merge blocks (identity structure)."
    return entry


for _name in PM_MODELS:
    setattr(sys.modules[__name__], _name, register_model(_entry(_name)))
