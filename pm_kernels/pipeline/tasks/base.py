"""What a task is, as data: the ``Task`` interface that the commands, the demo, the evaluation and export are
written against once, and the demo's configuration.

A task says how to read its data, build or load its model (through the one family table, ``families``), which
loss trains it, which metrics judge it (the ``headline`` one leads tables, plots and logs), which structure
search compresses it by default, which command-line options only it takes, which pictures it draws, and what
its demo does. Everything else (argument checks, output claims and locks, atomic writes, DDP, checkpoint
metadata checks, timing, MAC counts, export) is the pipeline's, the same for every task.
"""
import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..data import DataBundle, make_loader
from ..io import PipelineError

__all__ = ["Task", "DemoConfig"]


@dataclass
class DemoConfig:
    """One demo run: the model and data, the dense training, the calibration, the structure search, the
    fine-tune with distillation, the timing. A task's ``demo_defaults`` (and ``demo_quick``) fill it."""
    seed: int = 0
    model: str = ""
    model_kwargs: Dict[str, Any] = field(default_factory=dict)    # the backbone's arguments (families)
    model_options: Dict[str, Any] = field(default_factory=dict)   # the task's own (a segmentation decoder)
    data_options: Dict[str, Any] = field(default_factory=dict)    # the task's data (canvas count, noise)
    batch_size: int = 32
    dense_epochs: float = 16.0
    dense_lr: float = 2e-3
    dense_weight_decay: float = 0.05
    warmup_iters: int = 40
    calib_iters: int = 20
    keep_rates: Tuple[float, ...] = (0.6, 0.4)
    prune_rate: Optional[float] = None       # None: the structure search's default for ``thresholds``
    thresholds: str = "global"
    layers: Optional[Tuple[int, ...]] = None
    ft_epochs: float = 4.0
    ft_lr: float = 5e-4
    alpha: float = 0.8
    tau: float = 20.0
    speed_repeats: int = 5
    speed_min_time: float = 0.2
    n_pictures: int = 1


class Task:
    """The interface; ``classification`` and ``segmentation`` implement it, ``tasks.TASKS`` lists them."""

    name: str = ""
    headline: str = ""                     # the metric (a percentage) of tables, plots, logs
    headline_label: str = ""               # its column title
    extra_columns: Tuple[Tuple[str, str, str], ...] = ()   # more metric columns: (key, title, format spec)
    exact_classes: bool = False            # the data's classes must equal the model's (else: at most)
    loads: Tuple[str, ...] = ()            # checkpoints of these tasks load (this task's own first)
    thresholds: str = "global"             # the default structure search (SPEC §4 global, §8 per_layer)
    meta_keys: Mapping[str, Tuple[Callable[[Any], bool], str]] = {}   # its checkpoints' own pm_meta keys
    options: Tuple[str, ...] = ()          # argparse dests of the options only this task takes
    demo_defaults: Mapping[str, Any] = {}
    demo_quick: Mapping[str, Any] = {}
    demo_folder: str = "runs/demo"

    # ---------------------------------------------------------------- command line
    def add_arguments(self, command: str, parser: argparse.ArgumentParser) -> None:
        """Add the options only this task takes to ``command``'s parser (their dests listed in ``options``)."""

    def model_options(self, args) -> Dict[str, Any]:
        """The task's model options from the command line (e.g. the decoder of a fresh segmenter)."""
        return {}

    def evaluate_options(self, args) -> Dict[str, Any]:
        """Keyword arguments of ``metrics`` from the command line (e.g. a sliding window)."""
        return {}

    def compress_options(self, args) -> Dict[str, Any]:
        """``compress`` keyword arguments besides the rates (``thresholds``, ``layers``)."""
        return {"thresholds": self.thresholds}

    # ---------------------------------------------------------------- data
    def load_data(self, spec: str, seed: int = 0, img_size: Optional[int] = None, **options) -> DataBundle:
        raise NotImplementedError

    def default_model(self, spec: str) -> Optional[str]:
        """The model a fresh run builds on data ``spec`` when no ``--model`` is given (None: ask for one)."""
        return None

    def eval_loader(self, data: DataBundle, batch_size: int, workers: int = 0):
        return make_loader(data.test, batch_size, train=False, workers=workers)

    # ---------------------------------------------------------------- model
    def load(self, checkpoint: Optional[str], name: Optional[str] = None, num_classes: Optional[int] = None,
             extra_kwargs: Optional[Dict[str, Any]] = None, options: Optional[Dict[str, Any]] = None
             ) -> Tuple[nn.Module, Dict[str, Any]]:
        """(model, meta): from ``checkpoint`` (checked against the family table and the weights), or fresh."""
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int:
        raise NotImplementedError

    def check_data(self, model: nn.Module, data: DataBundle, spec: str) -> None:
        """The data fits the model: classes (equal, or at most the model's) and image channels."""
        from .. import host
        classes = self.num_classes(model)
        if data.num_classes > classes or (self.exact_classes and data.num_classes != classes):
            raise PipelineError(f"data {spec}: {data.num_classes} classes, but the model has {classes}")
        channels = host.input_shape(model)[0]
        if data.in_chans != channels:
            raise PipelineError(f"data {spec}: {data.in_chans}-channel images, the model takes {channels}")

    # ---------------------------------------------------------------- training and evaluation
    def train_options(self, args, data: DataBundle) -> Dict[str, Any]:
        """``TrainConfig`` fields that depend on the task and data (augmentation)."""
        return {}

    def loss(self, model: nn.Module) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The base loss on the labels (``train``'s ``base_loss``); None: cross-entropy."""
        return None

    def metrics(self, model: nn.Module, loader, device=None, progress: bool = False, **options) -> Dict[str, Any]:
        """Metrics on ``loader``; the ``headline`` key among them (a percentage)."""
        raise NotImplementedError

    def summary(self, metrics: Mapping[str, Any], n_images: int) -> str:
        return f"{self.headline_label} {metrics[self.headline]:.2f} on {n_images} test images"

    # ---------------------------------------------------------------- pictures
    def pictures(self, models: Mapping[str, nn.Module], data: DataBundle, folder: str, n: int) -> List[str]:
        """The demo's pictures beyond the structure ones (e.g. predictions); their paths."""
        return []

    def visualize_extra(self, model: nn.Module, image: torch.Tensor, target, out: str,
                        data: DataBundle) -> List[str]:
        """``visualize``'s pictures beyond the structure (e.g. ``<out>_prediction.png``); their paths."""
        return []

    # ---------------------------------------------------------------- demo
    def demo_config(self, quick: bool = False, **overrides) -> DemoConfig:
        values = dict(self.demo_defaults)
        if quick:
            values.update(self.demo_quick)
        values.update(overrides)
        return DemoConfig(**values)

    def demo_data(self, cfg: DemoConfig) -> DataBundle:
        return self.load_data("digits", seed=cfg.seed, **cfg.data_options)

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def refuse_options(args, chosen: "Task", tasks: Sequence["Task"]) -> None:
    """An option of another task given on this one's run is an error (never silently ignored)."""
    for task in tasks:
        if task is chosen:
            continue
        for dest in task.options:
            if dest not in chosen.options and getattr(args, dest, None) is not None:
                raise PipelineError(f"--{dest.replace('_', '-')}: a {task.name} option (add --task {task.name})")
