"""``pm-kernels``: the Prune-and-Merge pipeline on the command line (also ``python -m pm_kernels``).

    pm-kernels train      --model digits_vit --data digits --out dense.pth            (dense model, from scratch)
    pm-kernels calibrate  --checkpoint dense.pth --iters 250 --out scores.pt          (SPEC §3)
    pm-kernels calibrate  --checkpoint dense.pth --data images/ --out scores.pt       (images alone: no labels)
    pm-kernels compress   --checkpoint dense.pth --scores scores.pt --keep-rate 0.6 --out pm.pth   (SPEC §2, §4)
    pm-kernels finetune   --checkpoint pm.pth --teacher dense.pth --epochs 60 --out pm_ft.pth     (SPEC §5)
    pm-kernels evaluate   --dense dense.pth --checkpoint pm_ft.pth [more.pth ...] --out-dir runs/eval
    pm-kernels visualize  --checkpoint pm_ft.pth --out structure.png
    pm-kernels demo       [--out runs/demo] [--quick]
    pm-kernels export     --checkpoint pm_ft.pth --out pm.onnx [--format onnx|pt2] [--batch-size N] [--verify]
    pm-kernels demo --task segmentation [--out runs/seg_demo] [--quick]     (every subcommand takes --task:
                          classification, the default, or segmentation; pipeline/tasks/)

``--model`` is any timm ViT/DeiT name (or ``digits_vit``), needed only where a checkpoint does not name it;
``--data`` is ``digits`` (embedded, default) or an ImageFolder path (``calibrate`` also takes a folder of images
without class sub-folders and scores with a label-free objective, ``--objective``). Every run writes a results
JSON next to its output. Bad input ends with one ``error:`` line on stderr and exit status 2 (every numeric flag is checked
when parsed: finite, in range); SIGINT exits 130 and SIGTERM 143, leaving no temp file; outputs are written
atomically (nothing half-way) and locked against a second run writing them at the same time.
"""
import argparse
import math
import os
import re
import signal
import sys
import time
import warnings
from typing import List, Optional

__all__ = ["main", "build_parser"]

# pm_kernels.objectives.OBJECTIVES' names, written here so that parsing imports no torch (a test keeps them equal)
OBJECTIVE_NAMES = ("labels", "pseudo_labels", "kmeans", "self_distillation", "feature_norm")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _rate(name, low_open=True):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        from ._checks import check_rate  # the library's own range rule, so the CLI cannot drift from it
        try:
            return check_rate(name, value, low_open=low_open)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """A finite int/float in the range [low, high] (an end left open with ``*_open``; None: unbounded)."""
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    expected = f"{'an int' if kind is int else 'a finite number'}{' ' + lo if lo else ''}" \
               f"{' and ' if lo and hi else ' ' if hi else ''}{hi}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        in_range = (math.isfinite(value)
                    and (low is None or (value > low if low_open else value >= low))
                    and (high is None or (value < high if high_open else value <= high)))
        if not in_range:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _positive(kind=int):
    return _number(kind, low=0, low_open=True)


def _non_negative(kind=float):
    return _number(kind, low=0)


def _device(text):
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _common(p, data=True, model=True):
    if model:
        p.add_argument("--model", help="timm ViT/DeiT name or digits_vit (default: the checkpoint's)")
        p.add_argument("--checkpoint", help="local weights (.pth/.pt/.safetensors)")
        p.add_argument("--img-size", type=_positive(), help="input size (default: the model's)")
    if data:
        p.add_argument("--data", default="digits", help="'digits' (embedded) or an ImageFolder path")
        p.add_argument("--batch-size", type=_positive(), default=64)
        p.add_argument("--workers", type=_non_negative(int), default=0, help="data loader workers")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0)
    p.add_argument("--device", type=_device, default="auto", help="auto | cpu | cuda | cuda:N")
    # at most the machine's CPUs: torch.set_num_threads(100000) crashes the process (a segmentation fault)
    p.add_argument("--threads", type=_number(int, 1, os.cpu_count() or 1),
                   help="torch CPU threads, at most the machine's CPUs (default: free cores, at least 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# Upper bounds of the training numbers. An AdamW step moves each weight by about lr, so no run trains above 10
# (and 1e300 overflowed float32 inside the optimizer: a traceback); the others are far above any useful value.
_MAX_LR = 10.0


def _train_args(p, distill: bool):
    p.add_argument("--epochs", type=_number(float, 0, 1e6, low_open=True), default=60.0 if distill else 30.0)
    p.add_argument("--base-lr", type=_number(float, 0, _MAX_LR, low_open=True), default=1e-4,
                   help="lr = base-lr × global batch / 512")
    p.add_argument("--lr", type=_number(float, 0, _MAX_LR, low_open=True),
                   help="absolute lr (overrides --base-lr scaling)")
    p.add_argument("--min-lr", type=_number(float, 0, _MAX_LR), default=1e-6)
    p.add_argument("--weight-decay", type=_number(float, 0, 10), default=1e-3)
    p.add_argument("--warmup-iters", type=_non_negative(int), default=0)
    p.add_argument("--mixup", type=_number(float, 0, 100),
                   help="mixup alpha (default: 0.8 on ImageFolder, 0 on digits)")
    p.add_argument("--cutmix", type=_number(float, 0, 100),
                   help="cutmix alpha (default: 1.0 on ImageFolder, 0 on digits)")
    p.add_argument("--smoothing", type=_number(float, 0, 1, high_open=True),
                   help="label smoothing (default: 0.1 on ImageFolder, 0 on digits)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--max-iters", type=_positive(), help="stop after this many iterations")
    p.add_argument("--dist-timeout", type=_number(float, 0, 365 * 86400, low_open=True),
                   help="under torchrun: seconds a collective waits for the other ranks before the job fails "
                        "(default 600)")
    p.add_argument("--out", required=True, help="output checkpoint")
    if distill:
        p.add_argument("--teacher", help="dense checkpoint to distil from (default: none, unless --alpha 0)")
        p.add_argument("--alpha", type=_number(float, 0, 100), default=0.8,
                       help="distillation weight (0.8 Tiny, 1.0 Small)")
        p.add_argument("--tau", type=_number(float, 0, 1000, low_open=True), default=20.0,
                       help="distillation temperature T")
        p.add_argument("--authors-lr-quirk", action="store_true",
                       help="as the authors' script: every 2-D weight (M, R included) stays at lr 1e-6")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pm-kernels", description="Prune-and-Merge token compression for timm ViTs.")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train or fine-tune a dense model (no distillation)")
    _common(p)
    _train_args(p, distill=False)

    p = sub.add_parser("calibrate", help="gradient-weighted attention scores of a dense model (SPEC §3)")
    _common(p)
    p.add_argument("--iters", type=_positive(), default=250, help="calibration iterations (batches)")
    p.add_argument("--objective", choices=OBJECTIVE_NAMES,
                   help="the loss the scores read (default: labels when --data has classes; for a folder of "
                        "images without class sub-folders pseudo_labels with a head, else kmeans)")
    p.add_argument("--out", required=True, help="scores file (.pt)")

    p = sub.add_parser("compress", help="scores + rates → structure, initial M and R → checkpoint (SPEC §2, §4)")
    _common(p, data=False)
    p.add_argument("--scores", required=True, help="scores file from `pm-kernels calibrate`")
    p.add_argument("--keep-rate", type=_rate("keep rate"), default=0.6)
    p.add_argument("--prune-rate", type=_rate("prune rate", low_open=False),
                   help="default: the structure search's (0.1 global, 0 per-layer)")
    p.add_argument("--out", required=True, help="output checkpoint")

    p = sub.add_parser("finetune", help="train M, R and the weights with distillation from the dense model")
    _common(p)
    _train_args(p, distill=True)

    p = sub.add_parser("evaluate", help="top-1, GFLOPs, images/s: dense vs PM on the same data and device")
    _common(p, model=False)
    p.add_argument("--model", help="timm name, where the checkpoints do not name one")
    p.add_argument("--img-size", type=_positive())
    p.add_argument("--dense", help="dense checkpoint (the reference row)")
    p.add_argument("--checkpoint", nargs="+", default=[], help="PM checkpoints")
    p.add_argument("--repeats", type=_positive(), default=5, help="timed runs per model (median)")
    p.add_argument("--out-dir", default="runs/evaluate", help="results.json and accuracy_vs_keep.png go here")

    p = sub.add_parser("visualize", help="PNG of each layer's centres / merged / pruned patches over an image")
    _common(p)
    p.add_argument("--index", type=_non_negative(int), default=0, help="test image index")
    p.add_argument("--out", required=True, help="output PNG")

    p = sub.add_parser("demo", help="digits end to end: train, calibrate, compress, fine-tune, evaluate, plot")
    _common(p, data=False, model=False)
    p.add_argument("--out", help="output folder (default runs/demo; segmentation: runs/seg_demo)")
    p.add_argument("--quick", action="store_true", help="reduced budget (tests)")
    p.add_argument("--keep-rates", type=_rate("keep rate"), nargs="+", help="default: 0.6 0.4 (segmentation: "
                   "0.8 0.7 0.5)")

    p = sub.add_parser("export", help="ONNX file or torch.export program (.pt2) of a PM checkpoint, folded")
    _common(p, data=False)
    p.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    from .deploy import FORMATS, MAX_OPSET, MIN_OPSET
    p.add_argument("--format", choices=FORMATS, help="default: from the --out extension")
    p.add_argument("--batch-size", type=_positive(), default=1, help="batch of the example and of --verify")
    p.add_argument("--static-batch", action="store_true", help="the file takes only --batch-size images")
    p.add_argument("--opset", type=_number(int, MIN_OPSET, MAX_OPSET),
                   help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: the exporter's)")
    p.add_argument("--verify", action="store_true",
                   help="run the file (ONNX Runtime / torch.export.load), print max |difference| to PyTorch")

    from .pipeline.tasks import TASKS  # --task on every subcommand, and each task's own options
    for name, command_parser in sub.choices.items():
        command_parser.add_argument("--task", choices=tuple(TASKS), default="classification",
                                    help="what the model does (default classification; segmentation: a Segmenter, "
                                         "data 'digits' = the embedded digit canvases, or an ADE20K folder)")
        for task in TASKS.values():
            task.add_arguments(name, command_parser)
    return parser


def _setup(args):
    import torch

    from .measure.timing import free_cores
    from .pipeline.io import PipelineError
    torch.set_num_threads(args.threads or free_cores())
    torch.manual_seed(args.seed)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)  # the parser let through only cpu, cuda, cuda:N
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device {args.device!r}: CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                "device(s)")
    return device


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT: the same clean-up runs (temp files
    removed, locks released) and the command exits with 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return (text.splitlines() or [type(err).__name__])[0]


def _warnings_as_lines(prog: str):
    """``warnings.showwarning`` that prints the pipeline's warnings as one ``warning:`` line each."""
    from .pipeline.io import PipelineWarning
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PipelineWarning):
            sys.stderr.write(f"{prog}: warning: {message}\n")
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``pm-kernels``; returns 0 or raises ``SystemExit`` with a non-zero status."""
    args = build_parser().parse_args(argv)
    from .pipeline.io import PipelineError
    start = time.perf_counter()
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # main() called outside the main thread: no handler there
        previous = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warnings_as_lines(f"pm-kernels {args.command}")
            from .pipeline.outputs import claim_command_output
            from .pipeline.tasks import TASKS, refuse_options
            refuse_options(args, TASKS[args.task], tuple(TASKS.values()))
            # The output first: a second run on it is refused before this one reads an input or builds a model.
            # Under torchrun only rank 0 writes and locks; the other ranks check the paths.
            rank0 = os.environ.get("RANK", "0") in ("", "0")
            with claim_command_output(args, TASKS[args.task].demo_folder, lock=rank0):
                if args.command == "export":
                    from .pipeline.export_cmd import cmd_export as run
                else:
                    from .pipeline import commands
                    run = getattr(commands, "cmd_" + args.command)  # written once, for every task
                device = _setup(args)
                run(args, device)
    except PipelineError as err:
        sys.stderr.write(f"pm-kernels {args.command}: error: {_one_line(err)}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write(f"pm-kernels {args.command}: interrupted\n")
        raise SystemExit(130) from None
    except Terminated:
        sys.stderr.write(f"pm-kernels {args.command}: terminated\n")
        raise SystemExit(143) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not getattr(args, "quiet", False):
        print(f"[{args.command}] done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
