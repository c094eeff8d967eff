"""``export``: a PM model as a deployable file: ONNX (dynamo exporter) or a ``torch.export`` program (.pt2).

The model is folded with ``optimize`` first (every block boundary one static-shape matmul), and traced with
every op on the pure-PyTorch backend: attention becomes ``scaled_dot_product_attention`` (MatMul / Softmax in
ONNX), merge and reconstruct plain matmuls. The file holds no ``pm_kernels`` op, so ONNX Runtime, or
``torch.export.load`` without pm_kernels installed, runs it. The batch dimension is dynamic by default.

    pm_kernels.export(model, "pm.onnx")                      # ONNX, opset 18+, any batch size
    pm_kernels.export(model, "pm.pt2", format="pt2")         # torch.export.save
    run = load_exported("pm.onnx"); logits = run(images)     # ONNX Runtime (CPU) or the .pt2 program

(This module is ``pm_kernels.deploy``, not ``pm_kernels.export``: the function ``export`` would shadow it.)
"""
import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .hosts import resolve
from .hosts.base import resolve_task
from .optimize import optimize
from .pm_model import is_patched

__all__ = ["export", "load_exported", "FORMATS"]

FORMATS = ("onnx", "pt2")
MIN_OPSET = 18  # the dynamo exporter's lowest native opset; older ones go through a lossy version converter
_INSTALL = "pip install pm_kernels[export]  (or: pip install onnx onnxscript onnxruntime)"
# Above this many bytes of weights an ONNX protobuf cannot hold them: they go to a ``<file>.data`` side file.
_ONNX_INLINE_LIMIT = 1_800_000_000


def _require(packages: Sequence[str], what: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"{what} needs the package(s) {', '.join(missing)}: {_INSTALL}")


def _pm_model_and_dtype(model) -> Tuple[torch.nn.Module, Optional[torch.dtype]]:
    """The PM model behind ``model`` (itself, a task model whose backbone is a PM model, or the model an
    ``optimize`` form folds: its ``pm_source``) and the folded dtype."""
    source = getattr(model, "pm_source", None)
    if isinstance(source, torch.nn.Module):
        return source, model.folded_dtype
    if is_patched(model):
        return model, None
    if resolve_task(model)[1] is not None:
        name = type(model).__name__
        raise TypeError(f"model: a {name} whose backbone is not a PM model (pm_kernels.patch / compress the "
                        f"{name} first)")
    raise TypeError(f"model: expected a PM model (pm_kernels.patch / compress), a task model with a PM backbone, "
                    f"or their pm_kernels.optimize form, got {type(model).__name__} (call pm_kernels.patch on a "
                    "dense model first)")


class _Exported(torch.nn.Module):
    """images → the tensor(s) the file returns: a host model's images go in as its host calls it (e.g. a
    two-tower CLIP's ``get_image_features``) and its output comes out as the host's tensors (e.g. a transformers
    ``ModelOutput`` → its tensors); a task model is called on the images and its output kept as it is."""

    def __init__(self, folded: torch.nn.Module, host=None):
        super().__init__()
        self.folded = folded
        self.host = host

    def forward(self, images: torch.Tensor):
        if self.host is None:
            return self.folded(images)
        return self.host.export_outputs(self.host.forward_images(self.folded, images))


def _example(pm: torch.nn.Module, example_inputs, dynamic_batch: bool) -> torch.Tensor:
    host, backbone = resolve(pm)
    ref = host.reference_tensor(backbone)
    (h, w), (ph, pw) = host.grid(backbone), host.patch_size(backbone)
    chans, size = host.in_chans(backbone), (h * ph, w * pw)
    expected = f"a (B, {chans}, {size[0]}, {size[1]}) tensor"
    if example_inputs is None:
        # batch 2: torch.export specialises a dimension whose example size is 1, so it could not stay dynamic
        return torch.randn(2 if dynamic_batch else 1, chans, *size, generator=torch.Generator().manual_seed(0)
                           ).to(ref.device, ref.dtype)
    x = example_inputs
    if isinstance(x, (tuple, list)):
        if len(x) != 1:
            raise ValueError(f"example_inputs: expected one images tensor (or a 1-tuple), got {len(x)} items")
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"example_inputs: expected {expected} or None, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != chans or tuple(x.shape[2:]) != size:
        raise ValueError(f"example_inputs: expected {expected} (the model's channels and image size), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"example_inputs: expected a floating tensor, got {str(x.dtype).replace('torch.', '')}")
    x = x.detach().to(ref.device, ref.dtype)
    return x.expand(2, *x.shape[1:]).contiguous() if dynamic_batch and x.shape[0] == 1 else x


@contextlib.contextmanager
def _traceable(pm: torch.nn.Module):
    """Attention on the torch backend (SDPA: standard ops, no custom op) and eval mode, restored afterwards."""
    missing = object()
    host, backbone = resolve(pm)
    saved = [(m, m.__dict__.get("backend", missing)) for m in map(host.attention, host.layers(backbone))]
    modes = [(m, m.training) for m in pm.modules()]
    try:
        for attn, _ in saved:
            attn.backend = "torch"
        pm.eval()
        yield
    finally:
        for attn, backend in saved:
            if backend is missing:
                attn.__dict__.pop("backend", None)
            else:
                attn.backend = backend
        for m, training in modes:
            m.training = training


def _write_into(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_file)`` in a temp folder beside ``path``, then move its file(s) into place (nothing half-way).

    The ONNX exporter names an external-data side file after the file it writes: writing under the final
    basename keeps that reference valid after the move.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pm_export.", dir=folder)
    try:
        write(os.path.join(tmp, os.path.basename(path)))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(model, path: Union[str, "os.PathLike[str]"], *, format: str = "onnx", example_inputs=None,
           dynamic_batch: bool = True, opset: Optional[int] = None) -> str:
    """Fold ``model`` with ``optimize`` and export it to ``path``; returns the path.

    model: a PM model of any host (``patch`` / ``compress``, identity structure included), a task model with a
    PM backbone (a ``pm_kernels.Segmenter``: the file maps images to per-pixel logits at the model's image
    size), or their ``optimize`` form. A host model's file returns what its host exports of the model's output
    (timm: the logits; transformers: the tensors of the ``ModelOutput``).
    format: "onnx" (``torch.onnx.export(dynamo=True)``; needs onnx + onnxscript) or "pt2" (``torch.export``
    program, ``torch.export.save``). example_inputs: an images tensor (B, C, H, W) to trace with (default: random
    at the model's size, dtype and device). dynamic_batch: the file accepts any batch size (default), else only
    the example's. opset: ONNX opset (>= 18; default: the exporter's).
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not path or os.path.isdir(path):
        raise ValueError(f"path: expected a file path, got {path!r}" + (" (a folder)" if path else ""))
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch: expected a bool, got {type(dynamic_batch).__name__}")
    if opset is not None:
        if format != "onnx":
            raise ValueError(f"opset: only for format='onnx', got opset={opset!r} with format={format!r}")
        if isinstance(opset, bool) or not isinstance(opset, int):
            raise TypeError(f"opset: expected an int or None, got {type(opset).__name__}")
        if opset < MIN_OPSET:
            raise ValueError(f"opset: expected >= {MIN_OPSET} (the dynamo exporter's lowest), got {opset}")
    pm, dtype = _pm_model_and_dtype(model)
    if format == "onnx":
        _require(("onnx", "onnxscript"), "export(format='onnx')")
    x = _example(pm, example_inputs, dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None

    host, backbone = resolve(pm)
    with _traceable(pm), torch.no_grad():
        folded = _Exported(optimize(pm, backend="torch", dtype=dtype), host if backbone is pm else None).eval()
        if format == "pt2":
            program = torch.export.export(folded, (x,), dynamic_shapes=dynamic_shapes)
            _write_into(path, lambda tmp: torch.export.save(program, tmp))
        else:
            big = sum(t.numel() * t.element_size() for t in folded.state_dict().values()) > _ONNX_INLINE_LIMIT

            def write(tmp):
                torch.onnx.export(folded, (x,), tmp, dynamo=True, dynamic_shapes=dynamic_shapes,
                                  opset_version=opset, input_names=["images"], output_names=["logits"],
                                  external_data=big, verbose=False)
            _write_into(path, write)
    return path


def load_exported(path: Union[str, "os.PathLike[str]"], threads: Optional[int] = None,
                  session_config: Optional[Dict[str, str]] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images → logits running an exported file: ``.onnx`` in ONNX Runtime (CPU), ``.pt2`` through
    ``torch.export.load``. ``threads``: ONNX Runtime intra-op threads (default: its own choice);
    ``session_config``: ONNX Runtime session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``
    (idle threads sleep: the process's CPU time is then the work done, as ``bench/compare_ort.py`` times it)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    if path.endswith(".pt2"):
        program = torch.export.load(path).module()

        def run_program(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return program(images)
        return run_program
    if not path.endswith(".onnx"):
        raise ValueError(f"path: expected a .onnx or .pt2 file, got {path!r}")
    _require(("onnxruntime",), "running an .onnx file")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.detach().cpu().numpy()})[0])
    return run_onnx
