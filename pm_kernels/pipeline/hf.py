"""HuggingFace transformers classifiers in the pipeline: a local model folder (``config.json`` + safetensors, as
``save_pretrained`` writes it) as ``--checkpoint`` / ``--teacher``, and the pipeline checkpoints written from one.

The folder's class must be one the transformers host supports, its config must fit its weights, nothing downloads
and no code from the folder runs (``pm_kernels.hosts.transformers.pretrained``). The tasks read logits as a
tensor: a transformers classifier returns a ``ModelOutput``, so the pipeline runs it as a ``HostClassifier``
(a task model naming the transformers model as its backbone: calibrate, compress, optimize and export act on that
model). A checkpoint the pipeline writes from it holds that wrapper's state dict and, in ``pm_meta``, the model
class (``model = "transformers:<class>"``) and its config (``hf_config``), checked again when it is read.
"""
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..hosts import host_of, patch
from .io import PipelineError, load_weights

__all__ = ["PREFIX", "HostClassifier", "is_hf_source", "load_hf"]

PREFIX = "transformers:"


class HostClassifier(nn.Module):
    """Logits (a tensor) of a host's classifier whose output is not one (a transformers ``ModelOutput``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def pm_backbone(self) -> nn.Module:
        return self.model

    @property
    def num_classes(self) -> int:
        from ..hosts.transformers.pretrained import num_labels
        return num_labels(self.model)

    def pm_optimized(self, fast: nn.Module) -> "OptimizedHostClassifier":
        return OptimizedHostClassifier(self, fast)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return host_of(self.model).loss_input(self.model(images))


class OptimizedHostClassifier(nn.Module):
    """A ``HostClassifier`` whose model runs as its ``optimize`` form ``fast`` (shares every weight)."""

    def __init__(self, classifier: HostClassifier, fast: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.fast = fast

    @property
    def pm_source(self) -> nn.Module:
        return self.classifier

    @property
    def folded_dtype(self) -> torch.dtype:
        return self.fast.folded_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return host_of(self.classifier.model).loss_input(self.fast(images))


def is_hf_source(checkpoint: Optional[str], meta: Dict[str, Any]) -> bool:
    """The checkpoint is a transformers model folder, or a pipeline checkpoint written from one."""
    return bool(checkpoint) and os.path.isdir(checkpoint) or str(meta.get("model", "")).startswith(PREFIX)


def _check_args(extra_kwargs: Optional[Dict[str, Any]], classifier: HostClassifier, source: str) -> None:
    """A transformers model's architecture is its config's: only ``img_size`` may be given, and must agree."""
    from . import host
    extra = dict(extra_kwargs or {})
    size = extra.pop("img_size", None)
    if extra:
        raise PipelineError(f"{source}: a transformers model takes its architecture from its config; argument "
                            f"{sorted(extra)[0]!r} is not accepted")
    if size is not None and size != host.img_size(classifier):
        raise PipelineError(f"{source}: img_size = {size}, but the model takes {host.img_size(classifier)} images")


def load_hf(checkpoint: str, state_dict: Optional[Dict[str, torch.Tensor]], meta: Dict[str, Any],
            name: Optional[str], extra_kwargs: Optional[Dict[str, Any]]) -> Tuple[nn.Module, Dict[str, Any]]:
    """(HostClassifier, meta) of a transformers model folder or of a pipeline checkpoint written from one."""
    try:
        from ..hosts.transformers import pretrained
    except ImportError:
        raise PipelineError(f"checkpoint {checkpoint}: a transformers model needs the package transformers "
                            "(pip install pm_kernels[hf])") from None
    source = f"checkpoint {checkpoint}"
    try:
        if state_dict is None:  # a model folder
            cls, config = pretrained.read_config(checkpoint)
        else:
            cls, config = pretrained.check_config(meta.get("hf_config"), str(meta["model"])[len(PREFIX):])
        arch = PREFIX + cls.__name__
        if name and name != arch:
            raise PipelineError(f"model {name!r}: checkpoint {checkpoint} is of model {arch!r}")
        if "ForImageClassification" not in cls.__name__:
            raise PipelineError(f"{source}: {cls.__name__} is not an image classifier (a *ForImageClassification "
                                "class); the classification task reads logits")
        if state_dict is None:
            model, config = pretrained.load_folder(checkpoint)
        else:
            keys = pretrained.STRUCTURE_KEYS
            holds = sum(t.numel() for k, t in state_dict.items() if k.rsplit(".", 1)[-1] not in keys)
            model = pretrained.build_from_config(cls.__name__, config, holds)
    except ValueError as err:
        raise PipelineError(f"{source}: {err}") from None
    classifier = HostClassifier(model)
    if state_dict is not None:
        patch(model)
        load_weights(classifier, state_dict, checkpoint, arch)
    _check_args(extra_kwargs, classifier, source)
    meta = dict(meta, task="classification", model=arch, model_kwargs={}, hf_config=config)
    classifier.pm_pipeline_meta = meta
    return classifier, meta
