"""timm registry entries: ``timm.create_model("pm_<timm name>", ...)`` after ``import pm_kernels``.

Each ``pm_*`` model is the timm model of the same name (same arguments, default config, feature config and
``out_indices``, as timm builds its ViTs) with Prune-and-Merge blocks and the identity structure (outputs equal
the dense model's). Weights never download: pass ``checkpoint_path=...`` or ``pretrained=True,
pretrained_cfg_overlay=dict(file=...)``. A PM checkpoint brings its own structure (M, R, keep_mask shapes); a
dense timm checkpoint of the base model loads as the identity structure.
"""
import sys
from typing import Dict

from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model

from .families import Registered
from .model import FAMILIES, PMEva, PMVisionTransformer, PMVisionTransformerDistilled

__all__ = ["PM_MODELS", "PMVisionTransformer", "PMVisionTransformerDistilled", "PMEva"]

# pm name → (timm base model, PM class, checkpoint filter, the base's model arguments): the table's entries
PM_MODELS: Dict[str, Registered] = {name: entry for family in FAMILIES for name, entry in family.registered.items()}


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
