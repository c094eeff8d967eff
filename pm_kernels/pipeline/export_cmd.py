"""``pm-kernels export``: a checkpoint of any task as an ONNX file or a ``torch.export`` program, optionally verified.

    pm-kernels export --checkpoint pm.pth --out pm.onnx [--format onnx] [--batch-size N] [--verify]
    pm-kernels export --task segmentation --checkpoint seg.pth --out seg.onnx --verify

The format defaults to the output's extension (.onnx / .pt2). ``--verify`` runs the written file (ONNX Runtime
on the CPU, or ``torch.export.load``) on random images at ``--batch-size`` and, with a dynamic batch, at one more,
prints the max abs difference to the PyTorch model, and fails (removing the file) above the tolerance.
"""
import os
from typing import Dict

import torch

from . import host
from .io import PipelineError, save_json
from .outputs import claim_output

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
    except ImportError as err:
        raise PipelineError(f"verify: {err}") from None
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
            for leftover in (path, path + ".data"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            raise PipelineError(f"verify: the exported file differs from PyTorch by {diffs[b]:.3g} at batch {b} "
                                f"(tolerance {bound:.3g}); removed {path}")
    return diffs


def cmd_export(args, device) -> None:
    fmt = _format(args)
    if args.checkpoint is None and not args.model:
        raise PipelineError("checkpoint: give --checkpoint (or --model for a freshly initialised model)")
    # The same output rules as the other commands: checked folder, a lock against a second writer, and neither
    # the file nor its companions may be the checkpoint read.
    with claim_output(args.out, companions=[args.out + ".json", args.out + ".data"], inputs=[args.checkpoint]):
        _export(args, device, fmt)


def _export(args, device, fmt: str) -> None:
    from ..deploy import export
    from .commands import load_for
    model, meta = load_for(args, args.checkpoint)
    model.to(device).eval()
    ref = host.reference_parameter(model)
    example = torch.randn(args.batch_size, *host.input_shape(model),
                          generator=torch.Generator().manual_seed(args.seed)).to(device, ref.dtype)
    dynamic = not args.static_batch
    try:
        export(model, args.out, format=fmt, example_inputs=example, dynamic_batch=dynamic, opset=args.opset)
    except (TypeError, ValueError, ImportError) as err:
        raise PipelineError(f"export: {_first_line(err)}") from None
    size = sum(os.path.getsize(p) for p in (args.out, args.out + ".data") if os.path.exists(p))
    if not args.quiet:
        print(f"wrote {args.out} ({fmt}, {size / 2 ** 20:.1f} MiB, "
              f"{'any batch size' if dynamic else f'batch {args.batch_size} only'})", flush=True)
    diffs = _verify(args.out, model, args.batch_size, dynamic, args.seed) if args.verify else None
    save_json({"command": "export", "task": args.task, "format": fmt, "out": os.path.abspath(args.out), "bytes": size,
               "model": meta.get("model"), "checkpoint": args.checkpoint, "dynamic_batch": dynamic,
               "batch_size": args.batch_size, "opset": args.opset,
               "verify_max_abs_diff": {str(b): d for b, d in diffs.items()} if diffs else None},
              args.out + ".json")
