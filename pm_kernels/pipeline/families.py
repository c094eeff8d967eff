"""The model families the pipeline builds, and what a checkpoint may say about them: one table, ``FAMILIES``.

A checkpoint's ``pm_meta`` is data from a file; none of it reaches a constructor unchecked:
- ``model`` must be a name that a family covers (``Family.patterns``);
- ``model_kwargs`` may hold only that family's arguments (``Family.args``), each of an accepted type and range;
- every argument the weights determine (``Arg.read``: width, depth, patch, image size, channels, classes, MLP
  width, qkv bias) is read from the weights' shapes, and a value in the file (or on the command line) that
  disagrees is an error.
So the model is built from what the weights say: a small file cannot ask for a large model, and no key such as
``checkpoint_path`` or ``pretrained`` can make the constructor open another file or the network.

A new family is one ``Family`` entry: the names it covers, its accepted arguments (with a reader for each
argument its weights determine), a builder and the defaults of its own architectures. The table covers every
task: a segmentation model's backbone (``digits_seg_vit`` or a timm ViT) is built and checked through it as a
classifier is.
"""
import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .io import PipelineError

__all__ = ["Arg", "Family", "FAMILIES", "DIGITS_VIT", "DIGITS_VIT_KWARGS", "DIGITS_SEG_VIT", "DIGITS_SEG_VIT_KWARGS",
           "find_family", "resolve_kwargs", "recorded_kwargs"]

StateDict = Dict[str, torch.Tensor]

DIGITS_VIT = "digits_vit"
# 32×32 grey digits, 4×4 patches → 64 patches + CLS.
DIGITS_VIT_KWARGS = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                         num_heads=4, mlp_ratio=2.0)
DIGITS_SEG_VIT = "digits_seg_vit"
# The segmentation demo's backbone: the same grid, 2 heads, no classifier head (the Segmenter's decoder is).
DIGITS_SEG_VIT_KWARGS = dict(DIGITS_VIT_KWARGS, num_classes=0, num_heads=2)


@dataclass(frozen=True)
class Arg:
    """One accepted constructor argument: ``valid(value)`` says whether a value is acceptable (``expected``
    in words); ``read(state_dict)``, where the weights determine it, returns the value they imply; else
    ``of_model(model)`` returns the value a built model has, to be recorded in the checkpoints it is saved to
    (the weights cannot tell it later)."""
    valid: Callable[[Any], bool]
    expected: str
    read: Optional[Callable[[StateDict], Any]] = None
    of_model: Optional[Callable[[torch.nn.Module], Any]] = None


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


# ---------------------------------------------------------------- value checks

def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number(low: float, high: float) -> Callable[[Any], bool]:
    """A finite number in (low, high]."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and low < v <= high)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


# ---------------------------------------------------------------- timm VisionTransformer: read from the weights

def _tensor(sd: StateDict, key: str, ndim: int) -> torch.Tensor:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ValueError(f"no {ndim}-D tensor {key!r}")
    return t


def _patch_weight(sd: StateDict) -> torch.Tensor:
    w = _tensor(sd, "patch_embed.proj.weight", 4)
    if w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight {tuple(w.shape)}: expected square patches")
    return w


def _vit_depth(sd: StateDict) -> int:
    found = {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in sd) if m}
    if not found or found != set(range(len(found))):
        raise ValueError("expected blocks numbered 0 .. L-1")
    return len(found)


def _vit_img_size(sd: StateDict) -> int:
    positions = _tensor(sd, "pos_embed", 3).shape[1] - 1  # one CLS token
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        raise ValueError(f"pos_embed: {positions + 1} positions, expected 1 + a square patch grid")
    return grid * int(_patch_weight(sd).shape[2])


def _vit_classes(sd: StateDict) -> int:
    return int(_tensor(sd, "head.weight", 2).shape[0]) if "head.weight" in sd else 0


def _vit_mlp_ratio(sd: StateDict) -> float:
    return int(_tensor(sd, "blocks.0.mlp.fc1.weight", 2).shape[0]) / int(_patch_weight(sd).shape[0])


def _model_heads(model: torch.nn.Module) -> int:
    from .host import num_heads  # the model's host knows its heads
    return num_heads(model)


def _heads_divide_width(kwargs: Dict[str, Any]) -> Optional[str]:
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        return f"num_heads {heads} does not divide embed_dim {dim}"
    return None


VIT_ARGS: Dict[str, Arg] = {
    "img_size": Arg(_int(1, 8192), "an int in [1, 8192]", _vit_img_size),
    "patch_size": Arg(_int(1, 1024), "an int in [1, 1024]", lambda sd: int(_patch_weight(sd).shape[2])),
    "in_chans": Arg(_int(1, 64), "an int in [1, 64]", lambda sd: int(_patch_weight(sd).shape[1])),
    "num_classes": Arg(_int(0, 1_000_000), "an int in [0, 1000000]", _vit_classes),
    "embed_dim": Arg(_int(1, 16384), "an int in [1, 16384]", lambda sd: int(_patch_weight(sd).shape[0])),
    "depth": Arg(_int(1, 1024), "an int in [1, 1024]", _vit_depth),
    "num_heads": Arg(_int(1, 1024), "an int in [1, 1024]",  # the weights do not tell: checked against embed_dim
                     of_model=lambda m: _model_heads(m)),
    "mlp_ratio": Arg(_number(0, 64), "a number in (0, 64]", _vit_mlp_ratio),
    "qkv_bias": Arg(_bool, "true or false", lambda sd: "blocks.0.attn.qkv.bias" in sd),
}


def _build_demo_vit(defaults: Mapping[str, Any]) -> Callable[[str, Dict[str, Any]], torch.nn.Module]:
    def build(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
        from ..hosts.timm import PMVisionTransformer
        return PMVisionTransformer(**dict(defaults, **kwargs))
    return build


def _build_timm(name: str, kwargs: Dict[str, Any]) -> torch.nn.Module:
    import timm
    if not timm.is_model(name):
        raise PipelineError(f"model {name!r}: not a timm model name (e.g. deit_small_patch16_224, "
                            f"pm_deit_small_patch16_224, {DIGITS_VIT} or {DIGITS_SEG_VIT})")
    return timm.create_model(name, pretrained=False, **kwargs)


FAMILIES: Tuple[Family, ...] = (
    Family("the digits demo ViT", (DIGITS_VIT,), VIT_ARGS, _build_demo_vit(DIGITS_VIT_KWARGS),
           check=_heads_divide_width, defaults=DIGITS_VIT_KWARGS),
    Family("the digits segmentation demo's backbone ViT", (DIGITS_SEG_VIT,), VIT_ARGS,
           _build_demo_vit(DIGITS_SEG_VIT_KWARGS), check=_heads_divide_width, defaults=DIGITS_SEG_VIT_KWARGS),
    Family("timm ViT/DeiT (one CLS token, pre-norm blocks)", ("vit_*", "deit_*", "pm_deit_*"), VIT_ARGS,
           _build_timm, exclude=("*distilled*",), check=_heads_divide_width),
)


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
