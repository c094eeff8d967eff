"""Building and loading models for the pipeline: the families of ``families.FAMILIES`` (timm ViT/DeiT names and
the demo ViTs), always patched with Prune-and-Merge blocks (identity structure until compressed). A checkpoint's
metadata is checked against that table and the weights before anything is built (see ``families``).

``read_checkpoint`` is every task's way in: the state dict, and the ``pm_meta`` keys the pipeline knows (common
ones here, a task's own from its ``meta_keys``), each checked; ``load_model`` builds a classifier from it, the
segmentation task a Segmenter's backbone.
"""
import copy
import math
import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..hosts import patch
from ..pm_model import is_patched
from .families import DIGITS_VIT, DIGITS_VIT_KWARGS, find_family, recorded_kwargs, resolve_kwargs
from .hf import is_hf_source, load_hf
from .io import PipelineError, load_checkpoint, load_weights

__all__ = ["DIGITS_VIT", "DIGITS_VIT_KWARGS", "build_model", "load_model", "model_meta", "clean_meta",
           "read_checkpoint", "model_name", "META_KEYS"]


def build_model(name: str, model_kwargs: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """A patched (PM, identity structure) model. ``model_kwargs`` are checked against the family's table."""
    family = find_family(name)
    kwargs = resolve_kwargs(family, name, dict(model_kwargs or {}), None, f"model {name!r}")
    try:
        model = family.build(name, kwargs)
        if not is_patched(model):
            model = patch(model)
    except PipelineError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        hint = "" if "VisionTransformer" in str(err) else " (expected a timm ViT/DeiT)"
        raise PipelineError(f"model {name!r}: {(str(err).splitlines() or [type(err).__name__])[0]}{hint}") from None
    return model


def model_meta(model: torch.nn.Module) -> Dict[str, Any]:
    return dict(getattr(model, "pm_pipeline_meta", {}))


def _text(v) -> bool:
    return isinstance(v, str) and len(v) <= 4096


def _rate(low_open: bool):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return 0 < v <= 1 if low_open else 0 <= v < 1
    return ok


# What a checkpoint's pm_meta may hold besides model / model_kwargs (read by the pipeline for reports and carried
# into the files it writes). Other keys are dropped; a known key with a bad value refuses the file.
META_KEYS = {
    "format": (_text, "a string"),
    "stage": (lambda v: v in ("dense", "compressed", "finetuned"), "dense, compressed or finetuned"),
    "data": (_text, "a string"),
    "scores": (_text, "a string"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "keep_rate": (_rate(low_open=True), "a number in (0, 1]"),
    "prune_rate": (_rate(low_open=False), "a number in [0, 1)"),
    "K": (lambda v: isinstance(v, list) and all(isinstance(k, int) and not isinstance(k, bool) for k in v),
          "a list of ints"),
    "train": (lambda v: isinstance(v, dict), "a dict (the training history)"),
    "task": (lambda v: isinstance(v, str) and v.isidentifier(), "a task name"),
    "thresholds": (lambda v: v in ("global", "per_layer"), "global or per_layer"),
    "hf_config": (lambda v: isinstance(v, dict), "a dict (a transformers model's config)"),
    "layers": (lambda v: v is None or (isinstance(v, list) and all(isinstance(k, int) and not isinstance(k, bool)
                                                                   for k in v)), "null or a list of block indices"),
}


def clean_meta(meta: Dict[str, Any], source: str, extra_keys: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The known keys of a checkpoint's ``pm_meta`` (``model`` and ``model_kwargs`` are checked by the caller);
    ``extra_keys``: a task's own keys, in the form of ``META_KEYS``."""
    kept = {}
    for key, (ok, expected) in dict(META_KEYS, **(extra_keys or {})).items():
        if key in meta:
            if not ok(meta[key]):
                raise PipelineError(f"{source}: pm_meta {key} = {str(meta[key])[:60]!r}: expected {expected}")
            kept[key] = meta[key]
    if "model" in meta:
        kept["model"] = meta["model"]
    kwargs = meta.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise PipelineError(f"{source}: pm_meta model_kwargs: expected a dict, got {type(kwargs).__name__}")
    kept["model_kwargs"] = dict(kwargs or {})
    return kept


def read_checkpoint(checkpoint: Optional[str], task: str = "classification", loads: Tuple[str, ...] = (),
                    extra_keys: Optional[Dict[str, Any]] = None) -> Tuple[Optional[Dict[str, torch.Tensor]],
                                                                          Dict[str, Any]]:
    """(state dict, checked meta) of ``checkpoint`` (``(None, {})`` without one). The checkpoint's task (its
    ``pm_meta.task``, classification when absent) must be one of ``loads`` (default: ``task`` itself)."""
    if not checkpoint:
        return None, clean_meta({}, "model")
    if os.path.isdir(checkpoint):
        raise PipelineError(f"checkpoint {checkpoint}: a model folder (transformers' save_pretrained); this run "
                            "takes a checkpoint file (model folders load with --task classification)")
    ckpt = load_checkpoint(checkpoint)
    meta = clean_meta(copy.deepcopy(ckpt["meta"]), f"checkpoint {checkpoint}", extra_keys)
    written_for = meta.get("task", "classification")
    if written_for not in (loads or (task,)):
        raise PipelineError(f"checkpoint {checkpoint}: a {written_for} checkpoint, this run is --task {task} "
                            f"(add --task {written_for})")
    return ckpt["state_dict"], meta


def model_name(meta: Dict[str, Any], name: Optional[str], checkpoint: Optional[str], hint: str) -> str:
    """The architecture: the checkpoint's ``model``, which a given ``name`` must agree with, else ``name``."""
    arch = meta.get("model") or name
    if not arch:
        raise PipelineError(f"model: give --model ({hint}); checkpoint {checkpoint} does not name one")
    if name and meta.get("model") and name != meta["model"]:
        raise PipelineError(f"model {name!r}: checkpoint {checkpoint} is of model {meta['model']!r}")
    return arch


def load_model(checkpoint: Optional[str], name: Optional[str] = None, num_classes: Optional[int] = None,
               extra_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(model, meta): build the classifier named by the checkpoint's meta (or ``name``) and load the weights.

    The constructor arguments are those the weights' shapes imply (the file's ``model_kwargs`` and
    ``extra_kwargs`` must agree with them; see ``families``). A PM checkpoint brings its structure (M, R,
    keep_mask shapes); a dense timm/DeiT checkpoint loads as the identity structure. Without a checkpoint, a
    freshly initialised model (``num_classes`` outputs). A transformers model folder, or a checkpoint written
    from one, gives a ``hf.HostClassifier`` (see ``hf``).
    """
    if checkpoint and os.path.isdir(checkpoint):
        return load_hf(checkpoint, None, clean_meta({}, f"checkpoint {checkpoint}"), name, extra_kwargs)
    state_dict, meta = read_checkpoint(checkpoint)
    if is_hf_source(checkpoint, meta):
        return load_hf(checkpoint, state_dict, meta, name, extra_kwargs)
    arch = model_name(meta, name, checkpoint, "a timm ViT/DeiT name or digits_vit")
    family = find_family(arch)
    given = dict(meta["model_kwargs"])
    given.update(extra_kwargs or {})
    source = f"checkpoint {checkpoint}"
    if state_dict is None:
        source = f"model {arch!r}"
        if num_classes is not None:
            given["num_classes"] = num_classes
    kwargs = resolve_kwargs(family, arch, given, state_dict, source)
    model = build_model(arch, kwargs)
    if state_dict is not None:
        load_weights(model, state_dict, checkpoint, arch)
    meta.update(task="classification", model=arch, model_kwargs=recorded_kwargs(family, kwargs, model))
    model.pm_pipeline_meta = meta
    return model, meta
