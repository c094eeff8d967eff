"""``pm-kernels export``: a checkpoint of any task as an ONNX file or a ``torch.export`` program, optionally verified.

    pm-kernels export --checkpoint pm.pth --out pm.onnx [--format onnx] [--batch-size N] [--verify]
    pm-kernels export --task segmentation --checkpoint seg.pth --out seg.onnx --verify

The format defaults to the output's extension (.onnx / .pt2). The file is written into a temp folder beside
``--out`` and moved into place last. ``--verify`` runs it there first (``pm_kernels.load_exported``: ONNX Runtime
on the CPU, or the .pt2 graph) on random images at ``--batch-size`` and, with a dynamic batch, at one more, prints
the max abs difference to the PyTorch model, and fails above the tolerance: a previous file at ``--out`` (and its
JSON) is then left as it was.
"""
import os
from typing import Dict

import torch

from .._files import write_into
from . import host
from .io import PipelineError, remove_record, save_json

__all__ = ["cmd_export", "FORMAT_BY_EXTENSION"]

FORMAT_BY_EXTENSION = {".onnx": "onnx", ".pt2": "pt2"}
# |exported − PyTorch| allowed by --verify, relative to max(1, |logits|): the issue-13 parity bound for fp32.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _format(args) -> str:
    ext = os.path.splitext(args.out)[1].lower()
    implied = FORMAT_BY_EXTENSION.get(ext)
    if args.format is None:
        if implied is None:
            raise PipelineError(f"out {args.out}: give --format onnx|pt2 (or an output ending in .onnx / .pt2)")
        return implied
    if implied is not None and implied != args.format:
        raise PipelineError(f"out {args.out}: a {ext} file, but --format {args.format} (use a matching name)")
    return args.format


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _verify(path: str, model, batch: int, dynamic: bool, seed: int) -> Dict[int, float]:
    """{batch: max |exported − PyTorch|} on random images, at ``batch`` and, if dynamic, ``batch + 1``."""
    from ..deploy import load_exported
    try:
        run = load_exported(path)
    except (ImportError, ValueError) as err:
        raise PipelineError(f"verify: {_first_line(err)}") from None
    ref = host.reference_parameter(model)
    shape = host.input_shape(model)
    diffs = {}
    for b in ([batch, batch + 1] if dynamic else [batch]):
        images = torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed + b))
        with torch.no_grad():
            expected = model(images.to(ref.device, ref.dtype)).float().cpu()
        got = run(images.to(ref.dtype) if path.endswith(".onnx") else images.to(ref.device, ref.dtype))
        diffs[b] = float((got.float().cpu() - expected).abs().max())
        bound = TOLERANCE.get(ref.dtype, 1e-4) * max(1.0, float(expected.abs().max()))
        print(f"verify: max abs difference to PyTorch at batch {b}: {diffs[b]:.3g} (tolerance {bound:.3g})",
              flush=True)
        if not diffs[b] <= bound:
            raise PipelineError(f"verify: the exported file differs from PyTorch by {diffs[b]:.3g} at batch {b} "
                                f"(tolerance {bound:.3g}); nothing written")
    return diffs


def cmd_export(args, device) -> None:
    fmt = _format(args)
    if args.checkpoint is None and not args.model:
        raise PipelineError("checkpoint: give --checkpoint (or --model for a freshly initialised model)")
    _export(args, device, fmt)  # its output claimed by pm_kernels.cli, as every command's


def _export(args, device, fmt: str) -> None:
    from ..deploy import export
    from .commands import load_for
    model, meta = load_for(args, args.checkpoint)
    model.to(device).eval()
    ref = host.reference_parameter(model)
    example = torch.randn(args.batch_size, *host.input_shape(model),
                          generator=torch.Generator().manual_seed(args.seed)).to(device, ref.dtype)
    dynamic = not args.static_batch
    record = args.out + ".json"
    diffs = None

    def write(tmp: str) -> None:  # in a temp folder beside --out: checked there, moved into place last
        nonlocal diffs
        try:
            export(model, tmp, format=fmt, example_inputs=example, dynamic_batch=dynamic, opset=args.opset)
        except (TypeError, ValueError, ImportError) as err:
            raise PipelineError(f"export: {_first_line(err)}") from None
        if args.verify:
            diffs = _verify(tmp, model, args.batch_size, dynamic, args.seed)
        remove_record(record)  # the old JSON must not outlive the file it describes

    try:
        write_into(args.out, write)
    except OSError as err:
        raise PipelineError(f"output {args.out}: cannot write ({err.strerror or err})") from None
    size = sum(os.path.getsize(p) for p in (args.out, args.out + ".data") if os.path.exists(p))
    if not args.quiet:
        print(f"wrote {args.out} ({fmt}, {size / 2 ** 20:.1f} MiB, "
              f"{'any batch size' if dynamic else f'batch {args.batch_size} only'})", flush=True)
    save_json({"command": "export", "task": args.task, "format": fmt, "out": os.path.abspath(args.out), "bytes": size,
               "model": meta.get("model"), "checkpoint": args.checkpoint, "dynamic_batch": dynamic,
               "batch_size": args.batch_size, "opset": args.opset,
               "verify_max_abs_diff": {str(b): d for b, d in diffs.items()} if diffs else None}, record)
