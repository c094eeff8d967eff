"""The tasks the pipeline runs, as data: ``TASKS`` (name → ``Task``); ``pm-kernels --task NAME`` picks one.

A new task is a module here with a ``Task`` subclass (data, model loading through ``families``, loss, metrics,
pictures, compress defaults, its own options, its demo) and one entry below; commands, demo, evaluation, export
and every command-line guarantee then hold for it as they do for the others (``docs/architecture.md``).
"""
from typing import Dict

from ..io import PipelineError
from .base import DemoConfig, Task, refuse_options
from .classification import CLASSIFICATION
from .segmentation import SEGMENTATION

__all__ = ["TASKS", "Task", "DemoConfig", "get_task", "refuse_options"]

TASKS: Dict[str, Task] = {task.name: task for task in (CLASSIFICATION, SEGMENTATION)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise PipelineError(f"task {name!r}: expected one of {', '.join(TASKS)}") from None
