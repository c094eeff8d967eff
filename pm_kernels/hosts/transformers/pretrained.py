"""A compressed transformers model through ``save_pretrained`` and back.

``model.save_pretrained(folder)`` on a PM model writes its weights and its structure (``<layers>.i.M / .R /
.keep_mask``, plain tensors of the state dict) to the folder's safetensors, under the library's checkpoint names
(transformers 5 saves some models under their older key names, e.g. ``vit.encoder.layer.i`` for ``vit.layers.i``).
The library's ``from_pretrained`` builds the dense model and reports those keys as unexpected; ``from_pretrained``
here then patches the model and loads them into layer i of its layer list (i: the index their key ends with): a
compressed model again, structure and fine-tuned M, R included.
"""
import glob
import os
from typing import Dict

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from .. import host_of

__all__ = ["from_pretrained", "STRUCTURE_KEYS"]

STRUCTURE_KEYS = ("M", "R", "keep_mask", "centre_slot")  # centre_slot: a SAM layer's (windowed structure)


def _structure_tensors(folder: str) -> Dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"folder: no .safetensors file in {folder!r} (model.save_pretrained(folder) writes one)")
    found = {}
    for path in files:
        with safe_open(path, framework="pt") as weights:
            for key in weights.keys():
                if key.rsplit(".", 1)[-1] in STRUCTURE_KEYS:
                    found[key] = weights.get_tensor(key)
    return found


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
    model = model_class.from_pretrained(folder, **kwargs)
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
    return model
