"""What a row of the timm host's one model table (``model.FAMILIES``) holds, and the readers of timm weights.

One row per timm model class (subclasses included) says everything pm_kernels knows about that family:
- how it is patched (the PM model mixin; per timm block class, its PM block, its attention and the PM attention);
- its ``pm_*`` timm registry entries (``registry``: ``timm.create_model("pm_<name>")``);
- the model names a checkpoint may give to the command line (``CheckpointNames``), the constructor arguments a
  checkpoint may carry (``Arg``: valid values and, where the weights determine one, how to read it from them).
The pipeline (``pm_kernels.pipeline.families``) and the registry read this table; nothing else lists families.
"""
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

__all__ = ["Arg", "Registered", "CheckpointNames", "TimmFamily", "VIT_ARGS", "heads_divide_width", "DIGITS_VIT",
           "DIGITS_VIT_KWARGS", "DIGITS_SEG_VIT", "DIGITS_SEG_VIT_KWARGS"]

StateDict = Dict[str, torch.Tensor]

DIGITS_VIT = "digits_vit"
# The digits demo's ViT: 32×32 grey digits, 4×4 patches → 64 patches + CLS.
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


class Registered(NamedTuple):
    """A ``pm_*`` timm registry entry: the timm model it is, with PM blocks."""
    base: str                    # the timm model name
    cls: type                    # the PM class timm builds
    checkpoint_filter: Callable  # timm's filter for the base model's checkpoints
    args: dict                   # the base's model arguments, as timm 1.0 gives them


@dataclass(frozen=True)
class CheckpointNames:
    """Model names (fnmatch ``patterns``, less ``exclude``) a checkpoint may give the command line. With
    ``defaults``, the names are architectures of pm_kernels' own (the demo ViTs: the family's PM class built with
    these arguments under the given ones); without, timm names (``timm.create_model``)."""
    name: str
    patterns: Tuple[str, ...]
    exclude: Tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimmFamily:
    """One row of the table (see the module docstring). ``check(kwargs)``: an error message for argument
    combinations no single ``Arg`` can judge, else None."""
    base: type                                    # the timm model class
    mixin: type                                   # the PM model mixin (the model's class becomes PM<class>)
    blocks: Mapping[type, Tuple[type, type, type]]  # timm block → (PM block, timm attention, PM attention)
    pm_class: type                                # the PM class of ``base`` itself
    registered: Mapping[str, Registered] = field(default_factory=dict)
    checkpoint_names: Tuple[CheckpointNames, ...] = ()
    args: Mapping[str, Arg] = field(default_factory=dict)
    check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None


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


def heads_divide_width(kwargs: Dict[str, Any]) -> Optional[str]:
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
                     of_model=lambda m: int(m.blocks[0].attn.num_heads)),
    "mlp_ratio": Arg(_number(0, 64), "a number in (0, 64]", _vit_mlp_ratio),
    "qkv_bias": Arg(_bool, "true or false", lambda sd: "blocks.0.attn.qkv.bias" in sd),
}
