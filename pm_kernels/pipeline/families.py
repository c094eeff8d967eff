"""The model families the command line builds, and what a checkpoint may say about them.

``FAMILIES`` is a view of the timm host's one model table (``pm_kernels.hosts.timm.model.FAMILIES``): one
``Family`` per group of names a checkpoint may give (``CheckpointNames`` of a row), with that row's arguments.
A checkpoint's ``pm_meta`` is data from a file; none of it reaches a constructor unchecked:
- ``model`` must be a name that a family covers (``Family.patterns``);
- ``model_kwargs`` may hold only that family's arguments (``Family.args``), each of an accepted type and range;
- every argument the weights determine (``Arg.read``: width, depth, patch, image size, channels, classes, MLP
  width, qkv bias) is read from the weights' shapes, and a value in the file (or on the command line) that
  disagrees is an error.
So the model is built from what the weights say: a small file cannot ask for a large model, and no key such as
``checkpoint_path`` or ``pretrained`` can make the constructor open another file or the network.

A new family, or new names of one, is a row (or ``CheckpointNames``) of the timm host's table, not a change
here. The table covers every task: a segmentation model's backbone (``digits_seg_vit`` or a timm ViT) is built
and checked through it as a classifier is. (transformers model folders: ``pipeline/hf.py`` and the transformers
host's own table.)
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ..hosts.timm.families import (DIGITS_SEG_VIT, DIGITS_SEG_VIT_KWARGS, DIGITS_VIT, DIGITS_VIT_KWARGS, VIT_ARGS,
                                   Arg, CheckpointNames)
from ..hosts.timm.model import FAMILIES as TIMM_FAMILIES
from .io import PipelineError

__all__ = ["Arg", "Family", "FAMILIES", "DIGITS_VIT", "DIGITS_VIT_KWARGS", "DIGITS_SEG_VIT", "DIGITS_SEG_VIT_KWARGS",
           "VIT_ARGS", "find_family", "resolve_kwargs", "recorded_kwargs"]

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """Model names (fnmatch ``patterns``, less ``exclude``), their accepted arguments, and how to build one.

    ``build(name, kwargs)`` returns the model (patched or not: the caller patches); ``check(kwargs)`` returns
    an error message for argument combinations no single ``Arg`` can judge, else None; ``defaults``: the
    arguments of a name the family defines itself (the demo ViTs), under the given ones.
    """
    name: str
    patterns: Tuple[str, ...]
    args: Mapping[str, Arg]
    build: Callable[[str, Dict[str, Any]], torch.nn.Module]
    exclude: Tuple[str, ...] = ()
    check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def covers(self, model: str) -> bool:
        return (any(fnmatch.fnmatchcase(model, p) for p in self.patterns)
                and not any(fnmatch.fnmatchcase(model, p) for p in self.exclude))


def _build_own(pm_class: type, defaults: Mapping[str, Any]) -> Callable[[str, Dict[str, Any]], torch.nn.Module]:
    def build(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
        return pm_class(**dict(defaults, **kwargs))
    return build


def _build_timm(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    import timm
    if not timm.is_model(name):
        raise PipelineError(f"model {name!r}: not a timm model name (e.g. deit_small_patch16_224, "
                            f"pm_deit_small_patch16_224, {DIGITS_VIT} or {DIGITS_SEG_VIT})")
    return timm.create_model(name, pretrained=False, **kwargs)


def _family(row, names: CheckpointNames) -> Family:
    build = _build_own(row.pm_class, names.defaults) if names.defaults else _build_timm
    return Family(names.name, names.patterns, row.args, build, exclude=names.exclude, check=row.check,
                  defaults=names.defaults)


FAMILIES: Tuple[Family, ...] = tuple(_family(row, names) for row in TIMM_FAMILIES for names in row.checkpoint_names)


def find_family(model: Any) -> Family:
    if not isinstance(model, str) or not model or len(model) > 200:
        raise PipelineError(f"model {str(model)[:60]!r}: expected a model name")
    for family in FAMILIES:
        if family.covers(model):
            return family
    names = "; ".join(f"{', '.join(f.patterns)} ({f.name})" for f in FAMILIES)
    raise PipelineError(f"model {model!r}: not a supported model (supported: {names})")


def resolve_kwargs(family: Family, model: str, given: Mapping[str, Any], state_dict: Optional[StateDict],
                   source: str) -> Dict[str, Any]:
    """The constructor arguments: ``given`` checked against the family's table, then every argument the weights
    determine read from ``state_dict`` (a given value that disagrees is an error). ``source`` names where
    ``given`` came from, for the error message."""
    unknown = sorted(set(given) - set(family.args), key=str)
    if unknown:
        raise PipelineError(f"{source}: argument {str(unknown[0])[:60]!r} is not accepted for model {model!r} "
                            f"(accepted: {', '.join(family.args)})")
    kwargs = {}
    for key, value in given.items():
        arg = family.args[key]
        if not arg.valid(value):
            raise PipelineError(f"{source}: {key} = {str(value)[:60]!r}: expected {arg.expected}")
        kwargs[key] = value
    if state_dict is not None:
        for key, arg in family.args.items():
            if arg.read is None:
                continue
            try:
                value = arg.read(state_dict)
            except (ValueError, KeyError) as err:
                raise PipelineError(f"{source}: the weights are not those of a {family.name} "
                                    f"(cannot read {key}: {err})") from None
            if key in kwargs and kwargs[key] != value:
                raise PipelineError(f"{source}: {key} = {kwargs[key]!r}, but the weights have {key} = {value!r}")
            kwargs[key] = value
    problem = family.check(dict(family.defaults, **kwargs)) if family.check else None
    if problem:
        raise PipelineError(f"{source}: {problem}")
    return kwargs


def recorded_kwargs(family: Family, kwargs: Mapping[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
    """``kwargs`` (over the family's ``defaults``) plus what the built ``model`` has for each argument its weights
    cannot tell (``Arg.of_model``), for the checkpoint's metadata."""
    out = dict(family.defaults, **kwargs)
    for key, arg in family.args.items():
        if key not in out and arg.of_model is not None:
            out[key] = arg.of_model(model)
    return out
