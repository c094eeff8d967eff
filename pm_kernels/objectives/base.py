"""The objective's base class, the model view it reads, and the objectives that need a head (labels,
pseudo-labels) or none of the dense model (a user's ``loss_fn``). See ``pm_kernels.objectives``."""
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..segmenter import Segmenter, pixel_cross_entropy

__all__ = ["ModelView", "model_view", "Objective", "Labels", "CustomLoss", "PseudoLabels", "LEVELS", "check_level",
           "positive_int", "positive_float"]

LEVELS = ("pooled", "tokens")


@dataclass
class ModelView:
    """What an objective reads of a model (the only place that knows timm / Segmenter attributes)."""

    pooled: Callable[[torch.Tensor], torch.Tensor]   # images → (B, C): the pre-logits embedding
    tokens: Callable[[torch.Tensor], torch.Tensor]   # images → (B, P, C): final patch tokens, prefix tokens dropped
    logits: Optional[Callable[[torch.Tensor], torch.Tensor]]  # images → (B, K) or (B, K, H, W); None: no head
    pixel_labels: bool                               # a Segmenter: labels per pixel, ``ignore_index`` skipped
    ignore_index: Optional[int]
    img_size: Optional[Tuple[int, int]]              # None: any size (dynamic_img_size)
    patch_size: Tuple[int, int]
    in_chans: int

    def features(self, images: torch.Tensor, level: str) -> torch.Tensor:
        return self.pooled(images) if level == "pooled" else self.tokens(images)


def model_view(model) -> ModelView:
    """The ``ModelView`` of a timm ViT (patched or not, head or not) or a ``pm_kernels.Segmenter``."""
    seg = isinstance(model, Segmenter)
    bb = model.backbone if seg else model
    needed = ("patch_embed", "blocks", "forward_features", "forward_head", "num_prefix_tokens")
    if not isinstance(bb, torch.nn.Module) or any(not hasattr(bb, a) for a in needed):
        raise TypeError(f"model: expected a timm ViT (patch_embed, blocks, forward_features, forward_head) or a "
                        f"pm_kernels.Segmenter, got {type(model).__name__}")
    pooled = lambda x: bb.forward_head(bb.forward_features(x), pre_logits=True)  # noqa: E731
    if seg:
        tokens = lambda x: model.patch_tokens(bb.forward_features(x))  # noqa: E731  (fc_norm models: normed there)
        logits = model
    else:
        tokens = lambda x: bb.forward_features(x)[:, bb.num_prefix_tokens:]  # noqa: E731
        logits = model if getattr(model, "num_classes", 0) else None
    pe = bb.patch_embed
    dynamic = getattr(bb, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False)
    return ModelView(pooled=pooled, tokens=tokens, logits=logits, pixel_labels=seg,
                     ignore_index=model.ignore_index if seg else None,
                     img_size=None if dynamic else tuple(pe.img_size), patch_size=tuple(pe.patch_size),
                     in_chans=pe.proj.in_channels)


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

    def forward(self, model, inputs: torch.Tensor) -> torch.Tensor:
        """The scored forward (with grad)."""
        return model(inputs)

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def scored_as_call(self, model):
        """Inside the block, ``model(x)`` runs ``self.forward(model, x)``: today's ``calibrate`` calls
        ``model(images)``. A call of ``model`` from inside ``self.forward`` runs the model's own forward."""
        own = type(model).forward.__get__(model)
        inside = [False]

        def scored(x):
            if inside[0]:
                return own(x)
            inside[0] = True
            try:
                return self.forward(model, x)
            finally:
                inside[0] = False

        model.forward = scored
        try:
            yield model
        finally:
            del model.forward

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Labels(Objective):
    """The labelled cross-entropy (a Segmenter: per pixel, ``ignore_index`` pixels skipped)."""

    name = "labels"
    takes_targets = True

    def check(self, view):
        if view.logits is None:
            raise ValueError("objective: 'labels' needs a model with a classifier head (num_classes > 0) or a "
                             "Segmenter; for a head-less model pass loss_fn or a label-free objective")
        self.ignore_index = view.ignore_index if view.pixel_labels else None

    def loss(self, outputs, targets):
        # the losses today's calibrate uses by default: per-pixel CE without unlabelled pixels, or CE
        if self.ignore_index is not None:
            return pixel_cross_entropy(outputs, targets, self.ignore_index)
        return F.cross_entropy(outputs, targets)


class CustomLoss(Objective):
    """``loss_fn(model(images), targets)``; targets are None for image-only batches."""

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
            raise ValueError("objective: 'pseudo_labels' needs a model with a classifier head (num_classes > 0) "
                             "or a Segmenter; this model has none (use e.g. 'kmeans')")

    def targets(self, view, images, given):
        return view.logits(images).argmax(dim=1)

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
