"""Building and loading models for the pipeline: any timm ViT/DeiT name, or ``digits_vit`` (the small ViT of
the embedded demo), always patched with Prune-and-Merge blocks (identity structure until compressed)."""
import copy
from typing import Any, Dict, Optional, Tuple

import torch

from ..patch import is_patched, patch_timm
from .io import PipelineError, load_checkpoint

__all__ = ["DIGITS_VIT", "build_model", "load_model", "model_meta"]

DIGITS_VIT = "digits_vit"
# 32×32 grey digits, 4×4 patches → 64 patches + CLS.
DIGITS_VIT_KWARGS = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                         num_heads=4, mlp_ratio=2.0)


def build_model(name: str, model_kwargs: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """A patched (PM, identity structure) model. ``model_kwargs`` go to the constructor / ``timm.create_model``."""
    import timm

    from ..models import PMVisionTransformer

    kwargs = dict(model_kwargs or {})
    try:
        if name == DIGITS_VIT:
            model = PMVisionTransformer(**dict(DIGITS_VIT_KWARGS, **kwargs))
        else:
            if not timm.is_model(name):
                raise PipelineError(f"model {name!r}: not a timm model name (e.g. deit_small_patch16_224, "
                                    f"pm_deit_small_patch16_224, or {DIGITS_VIT})")
            model = timm.create_model(name, pretrained=False, **kwargs)
        if not is_patched(model):
            model = patch_timm(model)
    except PipelineError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        hint = "" if "VisionTransformer" in str(err) else " (expected a timm ViT/DeiT)"
        raise PipelineError(f"model {name!r}: {str(err).splitlines()[0]}{hint}") from None
    return model


def model_meta(model: torch.nn.Module) -> Dict[str, Any]:
    return dict(getattr(model, "pm_pipeline_meta", {}))


def _head_classes(state_dict) -> Optional[int]:
    w = state_dict.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def load_model(checkpoint: Optional[str], name: Optional[str] = None, num_classes: Optional[int] = None,
               extra_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(model, meta): build the model named by the checkpoint's meta (or ``name``) and load the weights.

    A PM checkpoint brings its structure (M, R, keep_mask shapes); a dense timm/DeiT checkpoint loads as the
    identity structure. Without a checkpoint, a freshly initialised model.
    """
    ckpt = load_checkpoint(checkpoint) if checkpoint else {"state_dict": None, "meta": {}}
    meta = copy.deepcopy(ckpt["meta"])
    arch = meta.get("model") or name
    if not arch:
        raise PipelineError("model: give --model (a timm ViT/DeiT name or digits_vit); "
                            f"checkpoint {checkpoint} does not name one")
    if name and meta.get("model") and name != meta["model"]:
        raise PipelineError(f"model {name!r}: checkpoint {checkpoint} is of model {meta['model']!r}")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(extra_kwargs or {})
    state_dict = ckpt["state_dict"]
    classes = _head_classes(state_dict) if state_dict is not None else None
    if classes is None and num_classes is not None:
        classes = num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    model = build_model(arch, kwargs)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise PipelineError(f"checkpoint {checkpoint}: does not fit model {arch!r} ({detail[:200]})") from None
    meta.update(model=arch, model_kwargs=kwargs)
    model.pm_pipeline_meta = meta
    return model, meta
