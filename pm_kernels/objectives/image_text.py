"""``ImageText``: the CLIP / SigLIP image–text loss as a calibration objective; the text tower stays dense.

Written against a generic pair: the scored model's pooled image embedding (optionally ``project``-ed into the
joint space, e.g. a CLIP tower's visual projection) and ``encode_text(list of str) → (T, D)`` text features,
which run under ``no_grad``: only the image tower is scored. See ``pm_kernels.objectives``.
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Objective, model_view, positive_float

__all__ = ["ImageText", "IMAGE_TEXT_LOSSES"]

IMAGE_TEXT_LOSSES = ("clip", "siglip")


def _strings(name: str, value, count: Optional[int] = None) -> list:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{name}: expected a non-empty list of strings, got {type(value).__name__}")
    if count is not None and len(value) != count:
        raise ValueError(f"{name}: expected one caption per image ({count}), got {len(value)}")
    return list(value)


class ImageText(Objective):
    """The image–text loss with captions the user gives.

    ``prompts=None``: batches are ``(images, captions)``, ``captions`` one string per image; the in-batch loss
    pairs image i with caption i (every batch needs ≥ 2 images: with one there is nothing to contrast).
    ``prompts=[...]`` (class prompts, e.g. "a photo of a dog"): batches are images alone; each image's target is
    its nearest prompt under the dense model (zero-shot pseudo-labels) and the loss runs over all prompts.
    ``loss="clip"``: cross-entropy on ``logit_scale · cos`` (symmetric, images → captions and back, in the
    in-batch case); ``"siglip"``: −Σ_captions log σ(z · (logit_scale · cos + logit_bias)), averaged over images,
    z = +1 on the matching pair and −1 elsewhere.
    """

    name = "image_text"

    def __init__(self, encode_text: Callable[[Sequence[str]], torch.Tensor], prompts: Optional[Sequence[str]] = None,
                 loss: str = "clip", logit_scale: float = 100.0, logit_bias: float = -10.0,
                 project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if not callable(encode_text):
            raise TypeError(f"encode_text: expected a callable (list of str) -> (T, D) tensor, got "
                            f"{type(encode_text).__name__}")
        if loss not in IMAGE_TEXT_LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(map(repr, IMAGE_TEXT_LOSSES))}, got {loss!r}")
        if project is not None and not callable(project):
            raise TypeError(f"project: expected a callable (B, C) -> (B, D), got {type(project).__name__}")
        if isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float)):
            raise ValueError(f"logit_bias: expected a number, got {logit_bias!r}")
        self.encode_text, self.kind, self.project = encode_text, loss, project
        self.prompts = None if prompts is None else _strings("prompts", prompts)
        self.logit_scale, self.logit_bias = positive_float("logit_scale", logit_scale), float(logit_bias)
        self.takes_targets = self.prompts is None
        self._prompt_features: Optional[torch.Tensor] = None

    def _text(self, captions: list, device) -> torch.Tensor:
        with torch.no_grad():  # the text tower stays dense: no gradient, no score
            text = self.encode_text(captions)
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[0] != len(captions):
            got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"encode_text: expected a ({len(captions)}, D) tensor for {len(captions)} strings, "
                             f"got {got}")
        return F.normalize(text.detach().float(), dim=1).to(device)

    def _image(self, pooled: torch.Tensor) -> torch.Tensor:
        image = pooled if self.project is None else self.project(pooled)
        return F.normalize(image.float(), dim=1)

    def _cosines(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if image.shape[1] != text.shape[1]:
            raise ValueError(f"encode_text: text features of width {text.shape[1]}, image features of width "
                             f"{image.shape[1]} (pass project= to map the image embedding into the joint space)")
        return image @ text.T

    def targets(self, view, images, given):
        if self.prompts is None:  # in-batch pairs: the captions' features are the targets
            captions = _strings("batches: captions", given, images.shape[0])
            if len(captions) < 2:
                raise ValueError("batches: the in-batch image–text loss needs at least 2 images per batch, got 1")
            return self._text(captions, images.device)
        if self._prompt_features is None:
            self._prompt_features = self._text(self.prompts, images.device)
        return self._cosines(self._image(view.pooled(images)), self._prompt_features).argmax(dim=1)

    def forward(self, model, inputs):
        return self._image(model_view(model).pooled(inputs))

    def loss(self, outputs, targets):
        if self.prompts is None:
            cos, match = self._cosines(outputs, targets), torch.arange(len(targets), device=outputs.device)
        else:
            cos, match = self._cosines(outputs, self._prompt_features), targets
        logits = self.logit_scale * cos
        if self.kind == "clip":
            loss = F.cross_entropy(logits, match)
            return (loss + F.cross_entropy(logits.T, match)) / 2 if self.prompts is None else loss
        signs = 2 * F.one_hot(match, cos.shape[1]).float() - 1
        return -F.logsigmoid(signs * (logits + self.logit_bias)).sum(dim=1).mean()
