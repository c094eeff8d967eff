"""The objective's base class, the model view it reads, and the objectives that need a head (labels,
pseudo-labels) or none of the dense model (a user's ``loss_fn``). See ``pm_kernels.objectives``."""
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..hosts import resolve

__all__ = ["ModelView", "model_view", "Objective", "Labels", "CustomLoss", "PseudoLabels", "LEVELS", "check_level",
           "positive_int", "positive_float"]

LEVELS = ("pooled", "tokens")


@dataclass
class ModelView:
    """What an objective reads of a model, all through its host (``pm_kernels.hosts``)."""

    output: Callable[[torch.Tensor], Any]            # images → what calibrate scores with labels (the model's output)
    labelled_loss: Callable[[Any, torch.Tensor], torch.Tensor]   # calibrate's default loss on ``output``
    logits: Optional[Callable[[torch.Tensor], torch.Tensor]]  # images → (B, K) or (B, K, H, W); None: no head
    pooled: Callable[[torch.Tensor], torch.Tensor]   # images → (B, C): the model's embedding
    tokens: Callable[[torch.Tensor], torch.Tensor]   # images → (B, P, C): final patch tokens, prefix tokens dropped
    img_size: Optional[Tuple[int, int]]              # None: any size
    patch_size: Tuple[int, int]
    in_chans: int

    def features(self, images: torch.Tensor, level: str) -> torch.Tensor:
        return self.pooled(images) if level == "pooled" else self.tokens(images)


def model_view(model, probe: Optional[torch.Tensor] = None) -> ModelView:
    """The ``ModelView`` of a ViT of any host (patched or not, head or not) or of a task model (``Segmenter``).

    ``logits``: a task model's output (a Segmenter's pixel logits), or the class logits of a host model with a
    head (``host.loss_input`` of its output); with ``probe`` images, a host model whose output has no class
    logits (e.g. an open_clip tower's embedding) is found to have none by one no-grad forward.
    ``pooled``: the backbone's output when it is one vector per image (a head-less timm model: its pooled
    embedding; an open_clip tower: its image embedding; a model with a head: its logits), else the mean of the
    final patch tokens.
    """
    host, backbone = resolve(model)  # a TypeError naming ``model`` when no host supports it
    task = model if backbone is not model else None
    features, prefix = host.dense_features(backbone), host.num_prefix(backbone)
    tokens = lambda x: features(x)[:, prefix:]  # noqa: E731

    def pooled(images):
        out = host.forward_images(backbone, images)
        return out if isinstance(out, torch.Tensor) and out.dim() == 2 else tokens(images).mean(dim=1)

    if task is not None:  # calibrate's forward and default loss, for a task model and for a host model
        output, logits = task, task
        labelled_loss = getattr(task, "pm_calibration_loss", None) or (lambda out, t: F.cross_entropy(out, t))
    else:
        output = lambda x: host.forward_images(backbone, x)  # noqa: E731
        labelled_loss = lambda out, t: F.cross_entropy(host.loss_input(out), t)  # noqa: E731
        logits = (lambda x: host.loss_input(output(x))) if host.head_macs(backbone) > 0 else None
        if logits is not None and probe is not None:
            try:
                logits(probe)
            except TypeError:  # a projection head (an embedding), not a classifier
                logits = None
    (h, w), (ph, pw) = host.grid(backbone), host.patch_size(backbone)
    return ModelView(output=output, labelled_loss=labelled_loss, logits=logits, pooled=pooled, tokens=tokens,
                     img_size=None if host.any_size(backbone) else (h * ph, w * pw), patch_size=(ph, pw),
                     in_chans=host.in_chans(backbone))


class Objective:
    """A calibration loss. Subclasses set ``name`` and ``takes_targets`` (True: batches are (images, targets);
    False: images alone; None: either) and override what differs from labelled cross-entropy."""

    name = "objective"
    takes_targets: Optional[bool] = False
    fit_images = 0   # images ``prepare`` sees before scoring starts (0: nothing to fit)

    def check(self, view: ModelView) -> None:
        """Raise a ValueError naming ``objective`` when the model lacks what this objective needs."""

    def prepare(self, view: ModelView, images: torch.Tensor) -> None:
        """Fit on the dense model (eval mode, no grad) with the first ``fit_images`` images."""

    def targets(self, view: ModelView, images: torch.Tensor, given: Any) -> Any:
        """What ``loss`` compares the scored output against (no grad, dense model). ``given``: the batch's."""
        return given

    def inputs(self, view: ModelView, images: torch.Tensor) -> torch.Tensor:
        """The images the scored forward sees."""
        return images

    def forward(self, model, inputs: torch.Tensor) -> Any:
        """The scored forward (with grad); by default what calibrate scores: the model's output."""
        return model_view(model).output(inputs)

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Labels(Objective):
    """calibrate's labelled loss: a task model's own (a Segmenter: per-pixel CE without unlabelled pixels), else
    the cross-entropy on the class logits."""

    name = "labels"
    takes_targets = True

    def check(self, view):
        if view.logits is None:
            raise ValueError("objective: 'labels' (the default for (images, targets) batches) needs a model with a "
                             "classifier head or a task model (Segmenter); this model has none: pass images alone "
                             "(the label-free default), a label-free objective, or loss_fn")
        self.labelled_loss = view.labelled_loss

    def loss(self, outputs, targets):
        return self.labelled_loss(outputs, targets)


class CustomLoss(Objective):
    """``loss_fn(outputs, targets)`` on the model's output (what calibrate scores); targets are None for
    image-only batches."""

    name = "loss_fn"
    takes_targets = None

    def __init__(self, loss_fn: Callable):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def loss(self, outputs, targets):
        return self.loss_fn(outputs, targets)


class PseudoLabels(Objective):
    """Cross-entropy to the dense model's own argmax (per pixel for a Segmenter): labels without labels."""

    name = "pseudo_labels"

    def check(self, view):
        if view.logits is None:
            raise ValueError("objective: 'pseudo_labels' needs a model with a classifier head or a task model "
                             "(Segmenter); this model has none (use e.g. 'kmeans')")

    def targets(self, view, images, given):
        return view.logits(images).argmax(dim=1)

    def forward(self, model, inputs):
        return model_view(model).logits(inputs)

    def loss(self, outputs, targets):
        return F.cross_entropy(outputs.float(), targets)


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(map(repr, LEVELS))}, got {level!r}")
    return level


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return float(value)
