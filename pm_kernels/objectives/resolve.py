"""``resolve_objective``: batches (images alone, or (images, targets)) + an objective choice → the objective,
fitted on the dense model, and the lazy stream of (inputs, targets) it scores. See ``pm_kernels.objectives``."""
import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple, Union

import torch

from .base import CustomLoss, Labels, ModelView, Objective, PseudoLabels, model_view
from .features import FeatureNorm, KMeansTargets, SelfDistillation

__all__ = ["resolve_objective", "default_objective", "OBJECTIVES", "DEFAULT_UNLABELLED"]

OBJECTIVES = {cls.name: cls for cls in (Labels, PseudoLabels, KMeansTargets, SelfDistillation, FeatureNorm)}
# Image-only batches, no objective chosen: the model's own head where it has one (a classifier, a Segmenter's
# decoder), else k-means classes of the pooled features. Measured on the digits tasks against labelled calibration
# (bench/results/calibration_objectives/README.md): the best agreement with a head, the best without one.
DEFAULT_UNLABELLED = {"head": "pseudo_labels", "headless": "kmeans"}


def default_objective(view: ModelView, carries_targets: bool) -> str:
    """The objective ``resolve_objective`` picks when none is given."""
    if carries_targets:
        return "labels"
    return DEFAULT_UNLABELLED["head" if view.logits is not None else "headless"]


def _split(batch, index: int) -> Tuple[torch.Tensor, Any, bool]:
    """(images, targets, carries_targets) of one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, False
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None), len(batch) == 2
    what = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(f"batches: batch {index}: expected images (B, C, H, W), a 1-tuple (images,) or a pair "
                    f"(images, targets), got {what}")


def _check_images(images, view: ModelView, index: int, size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point() \
            or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batches: batch {index}: expected a non-empty float image tensor (B, C, H, W), got {got}")
    hw = tuple(images.shape[-2:])
    if images.shape[1] != view.in_chans:
        raise ValueError(f"batches: batch {index}: images have {images.shape[1]} channels, the model takes "
                         f"{view.in_chans}")
    if view.img_size is not None and hw != view.img_size:
        raise ValueError(f"batches: batch {index}: images of size {hw[0]}x{hw[1]}, the model takes "
                         f"{view.img_size[0]}x{view.img_size[1]} (resize them, or use a model that runs any size)")
    if size is not None and hw != size:
        raise ValueError(f"batches: batch {index}: every batch must have the same image size ({size[0]}x{size[1]} "
                         f"so far, this one {hw[0]}x{hw[1]})")
    return hw


def _choose(objective, loss_fn, carries_targets: bool, view: ModelView) -> Objective:
    if loss_fn is not None:
        if objective is not None:
            raise TypeError("objective, loss_fn: give one of them (loss_fn is scored as model(images))")
        return CustomLoss(loss_fn)
    if objective is None:
        objective = default_objective(view, carries_targets)
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(map(repr, OBJECTIVES))} or an Objective, "
                             f"got {objective!r}")
        return OBJECTIVES[objective]()
    if not isinstance(objective, Objective):
        raise TypeError(f"objective: expected a name or a pm_kernels.objectives.Objective, got "
                        f"{type(objective).__name__}")
    return objective


@contextlib.contextmanager
def _dense_eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def resolve_objective(model, batches: Iterable, objective: Union[None, str, Objective] = None,
                      loss_fn: Optional[Callable] = None) -> Tuple[Objective, Iterator[Tuple[torch.Tensor, Any]]]:
    """(objective, scoring batches of (inputs, targets)) for ``model`` (the dense one) and ``batches``.

    See the module docstring. Errors name the argument: an empty ``batches``, a batch of another form, image
    size or channel count than the model's, targets given to an objective that takes none (or none given to one
    that needs them), an unknown ``objective``.
    """
    view = model_view(model)  # a TypeError naming ``model`` before the batches are read
    try:
        stream = iter(batches)
    except TypeError:
        raise TypeError(f"batches: expected an iterable of image batches, got {type(batches).__name__}") from None
    first = next(stream, None)
    if first is None:
        raise ValueError("batches: expected at least one batch of images, got none (an empty loader?)")
    first_images, _, carries = _split(first, 0)
    _check_images(first_images, view, 0, None)
    with _dense_eval(model):  # one forward tells a classifier head from a projection head
        view = model_view(model, probe=first_images)
    chosen = _choose(objective, loss_fn, carries, view)
    chosen.check(view)
    size = [None]

    def checked(index, batch):
        images, given, carries = _split(batch, index)
        size[0] = _check_images(images, view, index, size[0])
        if chosen.takes_targets is False and carries:
            raise ValueError(f"batches: batch {index} carries targets, but objective {chosen.name!r} takes images "
                             "alone (pass images or (images,), or objective='labels' to score with them)")
        if chosen.takes_targets and not carries:
            raise ValueError(f"batches: batch {index} is images alone, but objective {chosen.name!r} needs "
                             "(images, targets) pairs")
        return images, given

    counter = itertools.count()
    pending = [checked(next(counter), first)]  # checked now: a bad first batch fails here, not inside calibrate
    while chosen.fit_images and sum(len(x) for x, _ in pending) < chosen.fit_images:
        batch = next(stream, None)
        if batch is None:
            break
        pending.append(checked(next(counter), batch))
    if chosen.fit_images:
        with _dense_eval(model):
            chosen.prepare(view, torch.cat([x for x, _ in pending])[:chosen.fit_images])

    def scoring():
        for images, given in itertools.chain(pending, (checked(next(counter), b) for b in stream)):
            with _dense_eval(model):
                targets = chosen.targets(view, images, given)
            inputs = chosen.inputs(view, images)
            yield inputs, targets

    return chosen, scoring()
