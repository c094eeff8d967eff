"""``export``: a PM model as a deployable file: ONNX (dynamo exporter) or a ``torch.export`` program (.pt2).

The model is folded with ``optimize`` first (every block boundary one static-shape matmul), and traced with
every op on the pure-PyTorch backend: attention becomes ``scaled_dot_product_attention`` (MatMul / Softmax in
ONNX), merge and reconstruct plain matmuls. The file holds no ``pm_kernels`` op, so ONNX Runtime, or
``torch.export.load`` without pm_kernels installed, runs it. The batch dimension is dynamic by default.

    pm_kernels.export(model, "pm.onnx")                      # ONNX, opset 18+, any batch size
    pm_kernels.export(model, "pm.pt2", format="pt2")         # torch.export.save
    run = load_exported("pm.onnx"); logits = run(images)     # ONNX Runtime (CPU) or the .pt2 program

``load_exported`` runs no code from the file: a ``.pt2`` is read by ``safe_pt2`` (not ``torch.export.load``,
which unpickles and evaluates parts of the archive), an ``.onnx`` file is checked (standard operators only,
external data beside it) before ONNX Runtime opens it. A bad file raises ``ExportedFileError``.

(This module is ``pm_kernels.deploy``, not ``pm_kernels.export``: the function ``export`` would shadow it.)
"""
import contextlib
import importlib.util
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ._files import write_into
from .hosts import resolve
from .hosts.base import resolve_task
from .optimize import optimize
from .pm_model import is_patched

__all__ = ["export", "load_exported", "ExportedFileError", "FORMATS", "MIN_OPSET", "MAX_OPSET"]

FORMATS = ("onnx", "pt2")
MIN_OPSET = 18  # the dynamo exporter's lowest native opset; older ones go through a lossy version converter
# torch.onnx's ONNX_MAX_OPSET. Above it the exporter cannot convert its graph (opset-23 Attention nodes) and falls
# back, silently, to a file declaring opset 18 that ONNX Runtime refuses. tests/model/test_export.py exports at
# both ends and runs the files.
MAX_OPSET = 23
_INSTALL = "pip install pm_kernels[export]  (or: pip install onnx onnxscript onnxruntime)"
# Above this many bytes of weights an ONNX protobuf cannot hold them: they go to a ``<file>.data`` side file.
_ONNX_INLINE_LIMIT = 1_800_000_000


class ExportedFileError(ValueError):
    """An exported file that ``load_exported`` cannot or will not run: missing, a folder, not an ``.onnx`` /
    ``.pt2`` file, corrupt, or holding what could run code (pickled objects, custom operators, outside files)."""


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


def _check_opset(path: str, opset: Optional[int]) -> None:
    """The written file declares the opset asked for and passes the ONNX checker (an exporter that cannot convert
    its graph to an opset writes another one, silently)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    declared = {entry.domain: entry.version for entry in model.opset_import}.get("", None)
    if opset is not None and declared != opset:
        raise ValueError(f"opset: the exporter wrote opset {declared} instead of {opset}; use an opset in "
                         f"[{MIN_OPSET}, {MAX_OPSET}]")
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"opset: the exported file is not valid ONNX at opset {declared} "
                         f"({(str(err).strip().splitlines() or [''])[0][:160]})") from None


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
    the example's. opset: ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET`` (18 to 23; default: the exporter's); the
    written file is checked to declare it and to pass the ONNX checker.
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
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ValueError(f"opset: expected {MIN_OPSET} <= opset <= {MAX_OPSET} (the opsets the exporter writes "
                             f"and ONNX Runtime runs), got {opset}")
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
            program.example_inputs = None  # a pickle in the archive otherwise (load_exported never reads it)
            write_into(path, lambda tmp: torch.export.save(program, tmp))
        else:
            big = sum(t.numel() * t.element_size() for t in folded.state_dict().values()) > _ONNX_INLINE_LIMIT

            def write(tmp):
                torch.onnx.export(folded, (x,), tmp, dynamo=True, dynamic_shapes=dynamic_shapes,
                                  opset_version=opset, input_names=["images"], output_names=["logits"],
                                  external_data=big, verbose=False)
                _check_opset(tmp, opset)
            write_into(path, write)
    return path


def load_exported(path: Union[str, "os.PathLike[str]"], threads: Optional[int] = None,
                  session_config: Optional[Dict[str, str]] = None) -> Callable[[torch.Tensor], Any]:
    """A function images → logits running an exported file: ``.onnx`` in ONNX Runtime (CPU), ``.pt2`` by
    ``safe_pt2`` (its graph run op by op; ``torch.export.load`` is not used: it would unpickle parts of the file).
    No code from the file runs; a file that is missing, corrupt, or holds anything that could run code raises
    ``ExportedFileError``. ``threads``: ONNX Runtime intra-op threads (default: its own choice);
    ``session_config``: ONNX Runtime session config entries, e.g. ``{"session.intra_op.allow_spinning": "0"}``
    (idle threads sleep: the process's CPU time is then the work done, as ``bench/compare_ort.py`` times it).
    The function checks the images' shape (and dtype) against the file's input: ``ValueError`` / ``TypeError``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    if os.path.isdir(path):
        raise ExportedFileError(f"{path}: is a folder, expected an .onnx or .pt2 file")
    if not os.path.isfile(path):
        raise ExportedFileError(f"{path}: no such file")
    if path.endswith(".pt2"):
        from .safe_pt2 import load_pt2
        return load_pt2(path, ExportedFileError)
    if not path.endswith(".onnx"):
        raise ExportedFileError(f"{path}: expected an .onnx or .pt2 file")
    _require(("onnx", "onnxruntime"), "running an .onnx file")
    import onnxruntime

    _check_onnx(path)
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime's own error types (Fail, InvalidGraph, NoSuchFile, ...)
        raise ExportedFileError(f"{path}: ONNX Runtime cannot run it ({_first_line(err)})") from None
    spec = session.get_inputs()[0]
    sizes = [d if isinstance(d, int) else None for d in spec.shape]
    dtype = _ORT_TYPES.get(spec.type)

    def run_onnx(images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a tensor, got {type(images).__name__}")
        if images.dim() != len(sizes) or any(s is not None and s != d for s, d in zip(sizes, images.shape)):
            want = ", ".join("B" if s is None else str(s) for s in sizes)
            raise ValueError(f"images: expected shape ({want}), got {tuple(images.shape)}")
        if dtype is not None and images.dtype != dtype:
            raise TypeError(f"images: expected {dtype}, got {images.dtype}")
        return torch.from_numpy(session.run(None, {spec.name: images.detach().cpu().numpy()})[0])
    return run_onnx


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16}
_ONNX_DOMAINS = ("", "ai.onnx")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _check_onnx(path: str) -> None:
    """Refuse what would make ONNX Runtime reach beyond the file: an operator outside the standard domain (a
    custom op library) and external data outside the file's folder (``location`` with a path in it)."""
    import onnx
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, onnx's own: a corrupt or foreign file
        raise ExportedFileError(f"{path}: not an ONNX model ({_first_line(err)})") from None
    local = {(f.domain, f.name) for f in model.functions}
    folder = os.path.dirname(os.path.abspath(path))

    def tensor(t) -> None:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        if (not location or location in (".", "..") or os.path.basename(location) != location
                or "/" in location or "\\" in location):
            raise ExportedFileError(f"{path}: tensor {t.name[:60]!r} reads external data {location[:80]!r}, "
                                    "outside the file's folder")
        if not os.path.isfile(os.path.join(folder, location)):
            raise ExportedFileError(f"{path}: its external data file {location!r} is missing")

    def graph(g) -> None:
        for t in getattr(g, "initializer", ()):  # a FunctionProto has none
            tensor(t)
        for node in g.node:
            if node.domain not in _ONNX_DOMAINS and (node.domain, node.op_type) not in local:
                raise ExportedFileError(f"{path}: operator {node.domain}::{node.op_type} is not a standard ONNX "
                                        "operator")
            for attr in node.attribute:
                for t in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                    tensor(t)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    graph(sub)

    graph(model.graph)
    for function in model.functions:
        graph(function)
