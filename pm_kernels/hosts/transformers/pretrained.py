"""A compressed transformers model through ``save_pretrained`` and back.

``model.save_pretrained(folder)`` on a PM model writes its weights and its structure (``<layers>.i.M / .R /
.keep_mask``, plain tensors of the state dict) to the folder's safetensors, under the library's checkpoint names
(transformers 5 saves some models under their older key names, e.g. ``vit.encoder.layer.i`` for ``vit.layers.i``).
The library's ``from_pretrained`` builds the dense model (told to expect those keys, which it does not load);
``from_pretrained`` here then patches the model and loads them into layer i of its layer list (i: the index
their key ends with): a compressed model again, structure and fine-tuned M, R included.

``load_folder`` is the same for a folder given by a user who did not choose the class (the ``pm-kernels``
command's ``--checkpoint``): the class comes from ``config.json``'s ``architectures`` and must be one this host
supports, no code from the folder ever runs (a config asking for remote code, ``auto_map``, is refused;
``trust_remote_code`` is never set), nothing downloads, and the config must not ask for a model larger than the
weights hold (checked on the meta device before anything is allocated). ``build_from_config`` does the same
checks for a config that travels inside a pipeline checkpoint.
"""
import glob
import json
import os
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from .. import host_of
from .families import MODELS, supported_names

__all__ = ["from_pretrained", "load_folder", "build_from_config", "model_class", "read_config", "check_config",
           "num_labels", "STRUCTURE_KEYS"]

MAX_CONFIG_BYTES = 1 << 20  # a vision model's config.json is a few kB

STRUCTURE_KEYS = ("M", "R", "keep_mask", "centre_slot")  # centre_slot: a SAM layer's (windowed structure)
_STRUCTURE_PATTERN = r"\.(" + "|".join(STRUCTURE_KEYS) + r")$"
_UNSET = object()


def _structure_tensors(folder: str) -> Dict[str, torch.Tensor]:
    found = {}
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                if key.rsplit(".", 1)[-1] in STRUCTURE_KEYS:
                    found[key] = weights.get_tensor(key)
    return found


def _weight_files(folder: str):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"folder: no .safetensors file in {folder!r} (model.save_pretrained(folder) writes one)")
    return files


def from_pretrained(model_class: type, folder, **kwargs) -> PreTrainedModel:
    """``model_class.from_pretrained(folder, **kwargs)`` as a PM model with the structure saved in ``folder``
    (the identity structure for a dense checkpoint). Local folders only: ``local_files_only=True`` unless
    ``kwargs`` says otherwise (nothing downloads)."""
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise TypeError(f"model_class: expected a transformers model class (e.g. ViTForImageClassification), "
                        f"got {model_class!r}")
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise ValueError(f"folder: expected the folder model.save_pretrained wrote, got {folder!r}")
    folder = os.fspath(folder)
    structure = _structure_tensors(folder)
    kwargs.setdefault("local_files_only", True)
    # the structure tensors are read below, not by transformers: its load report would call them unexpected
    # (``post_init`` copies the class's patterns into the instance, so the class is restored right after)
    ignored = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
    model_class._keys_to_ignore_on_load_unexpected = [*(getattr(model_class, "_keys_to_ignore_on_load_unexpected",
                                                                None) or []), _STRUCTURE_PATTERN]
    try:
        model = model_class.from_pretrained(folder, **kwargs)
    finally:
        if ignored is _UNSET:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = ignored
    info = None
    if kwargs.get("output_loading_info"):
        model, info = model
    host = host_of(model)  # the transformers host, or its SAM host
    host.patch(model)
    layers = host.layers(model)
    by_layer = {}
    for key, tensor in structure.items():
        owner, leaf = key.rsplit(".", 1)
        index = owner.rsplit(".", 1)[-1]
        if not index.isdigit() or int(index) >= len(layers):
            raise ValueError(f"folder: the structure tensor {key!r} belongs to no layer of {model_class.__name__} "
                             f"({len(layers)} layers)")
        by_layer.setdefault(int(index), {})[leaf] = tensor
    for index, state in by_layer.items():  # each layer checks and installs the structure it is given
        layers[index].load_state_dict(state, strict=False)
    return model if info is None else (model, info)


# ------------------------------------------------------------------- a folder or config nobody vetted

def model_class(name: Any) -> type:
    """The supported transformers model class called ``name`` (e.g. "ViTForImageClassification")."""
    by_name = {cls.__name__: cls for cls in MODELS}
    if not isinstance(name, str) or name not in by_name:
        raise ValueError(f"model: {str(name)[:80]!r} is not a transformers class pm_kernels supports "
                         f"({supported_names()})")
    return by_name[name]


def read_config(folder: str) -> Tuple[type, Dict[str, Any]]:
    """(model class, config dict) of a saved model folder, checked (see the module docstring)."""
    path = os.path.join(folder, "config.json")
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"config.json: {size} bytes, more than a model config ({MAX_CONFIG_BYTES}) holds")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"folder {folder!r}: no config.json (a folder model.save_pretrained wrote)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config.json: not readable as JSON ({str(err).splitlines()[0][:120]})") from None
    return check_config(config)


def check_config(config: Any, name: Optional[str] = None) -> Tuple[type, Dict[str, Any]]:
    """(class, config) after the checks that need no weights: a dict, no remote code, one supported class
    (``name``, or the config's ``architectures``) whose model type the config has."""
    if not isinstance(config, dict):
        raise ValueError(f"config: expected a JSON object, got {type(config).__name__}")
    if "auto_map" in config:
        raise ValueError("config: asks for code from the model folder (auto_map); pm_kernels never runs it")
    if name is None:
        archs = config.get("architectures")
        if not (isinstance(archs, list) and len(archs) == 1):
            raise ValueError(f"config: expected 'architectures' naming one model class, got {str(archs)[:80]}")
        name = archs[0]
    cls = model_class(name)
    if config.get("model_type") != cls.config_class.model_type:
        raise ValueError(f"config: model_type {str(config.get('model_type'))[:40]!r} is not that of {name} "
                         f"({cls.config_class.model_type!r})")
    return cls, config


def _numel_in_files(folder: str) -> int:
    total = 0
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                if key.rsplit(".", 1)[-1] not in STRUCTURE_KEYS:
                    total += int(torch.Size(weights.get_slice(key).get_shape()).numel())
    return total


def _probe(cls: type, config: Dict[str, Any], holds: Optional[int]):
    """The config object, after building the model on the meta device (no memory) and checking that its
    parameters fit in the ``holds`` values the weights have."""
    try:
        cfg = cls.config_class.from_dict(dict(config))
        with torch.device("meta"):
            probe = cls(cfg)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, AssertionError) as err:
        raise ValueError(f"config: cannot build {cls.__name__} from it ({str(err).splitlines()[0][:160]})") from None
    need = sum(p.numel() for p in probe.parameters())
    if holds is not None and need > holds:
        raise ValueError(f"config: describes a {cls.__name__} of {need} parameters, but the weights hold {holds} "
                         "values: the config does not belong to these weights")
    return cfg


def build_from_config(name: str, config: Dict[str, Any], holds: Optional[int] = None) -> PreTrainedModel:
    """A fresh (dense, unpatched) ``name`` model from a config dict, after the checks of ``load_folder``
    (``holds``: how many values the weights to be loaded into it have)."""
    cls, config = check_config(config, name)
    return cls(_probe(cls, config, holds))


def load_folder(folder) -> Tuple[PreTrainedModel, Dict[str, Any]]:
    """(PM model, config dict) of a folder ``save_pretrained`` wrote (a dense or a compressed model), checked
    before anything is allocated; every weight of the model must be in the folder (none missing or resized)."""
    if not isinstance(folder, (str, os.PathLike)) or not os.path.isdir(folder):
        raise ValueError(f"folder: expected a model folder (config.json + .safetensors), got {folder!r}")
    folder = os.fspath(folder)
    cls, config = read_config(folder)
    _probe(cls, config, _numel_in_files(folder))
    model, info = from_pretrained(cls, folder, output_loading_info=True)
    unexpected = [k for k in info.get("unexpected_keys") or [] if k.rsplit(".", 1)[-1] not in STRUCTURE_KEYS]
    bad = (list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
           + unexpected)
    if bad:  # a weight left out or one too many (e.g. layers the config does not have): not this model
        raise ValueError(f"folder {folder!r}: the weights do not fit its config.json ({len(bad)} missing, resized "
                         f"or unexpected, e.g. {bad[0][:120]})")
    return model, config


def num_labels(model: PreTrainedModel) -> int:
    return int(model.config.num_labels)
