"""``--task`` on the ``pm-kernels`` subcommands: the segmentation options and which commands module runs.

Kept apart from ``pm_kernels.cli`` (two hooks there: ``add_task_args`` on every subparser, ``commands_for`` in
``main``) and light (argparse only) so that ``pm-kernels --help`` stays fast.
"""
import argparse

__all__ = ["TASKS", "add_task_args", "commands_for"]

TASKS = ("classification", "segmentation")
_SEG_ONLY = ("decoder", "thresholds", "layers", "window")


def add_task_args(command: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (default) or segmentation (Segmenter: data 'digits' = the embedded "
                        "digits-segmentation task, or an ADE20K folder)")
    if command in ("train", "calibrate", "finetune", "evaluate", "visualize"):
        p.add_argument("--decoder", choices=("mask", "linear"),
                       help="segmentation: the decoder of a fresh model (default mask; a checkpoint brings its own)")
    if command == "compress":
        p.add_argument("--thresholds", choices=("global", "per_layer"),
                       help="segmentation: structure search, SPEC §4 global or §8 per-layer (default per_layer)")
        p.add_argument("--layers", type=int, nargs="+", help="segmentation: blocks to compress (default all)")
        # Resolved by task: classification 0.1 (SPEC §4), segmentation 0.1 (global) or 0 (per_layer, SPEC §8).
        p.set_defaults(prune_rate=None)
    if command == "evaluate":
        p.add_argument("--window", type=int, help="segmentation: sliding-window size for images larger than it "
                                                  "(default the model's image size)")


def commands_for(args):
    """The module whose ``cmd_<command>`` runs ``args``; segmentation-only options on a classification run are an
    error (never silently ignored)."""
    from .io import PipelineError

    if getattr(args, "task", "classification") == "segmentation":
        from . import seg_commands
        return seg_commands
    given = [name for name in _SEG_ONLY if getattr(args, name, None) is not None]
    if given:
        raise PipelineError(f"--{given[0]}: a segmentation option (add --task segmentation)")
    if args.command == "compress" and args.prune_rate is None:
        args.prune_rate = 0.1
    from . import commands
    return commands
