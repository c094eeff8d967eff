"""``pm_kernels.load_exported`` runs no code from the file it is given (issue 24, item 1), and a bad file is one
error type, ``ExportedFileError`` (item 13).

Each crafted ``.pt2`` below would run code under ``torch.export.load`` (a pickle that creates a marker file, in
the sample inputs, as a weight; a symbolic expression that ``sympy.sympify`` evaluates) or asks for what a
forward pass never needs (a custom object, a call outside ATen, a compressed member, a view past its bytes). The
loader either runs the program without touching that part (the sample inputs, the expressions: never read) or
refuses the file; the marker never appears. ``.onnx`` files: custom operators and external data outside the
file's folder are refused before ONNX Runtime opens them.
"""
import json
import os
import pickle
import zipfile

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import pm_kernels
from pm_kernels.cli import main
from pm_kernels.deploy import ExportedFileError, load_exported


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1))  # a dynamic batch: sym_size nodes and symbolic expressions


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """(a torch.export archive as torch writes it (with its pickled sample inputs), the module)."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    ep = torch.export.export(model, (torch.randn(2, 2, 2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = str(tmp_path_factory.mktemp("pt2") / "tiny.pt2")
    torch.export.save(ep, path)
    return path, model


def _evil_pickle(marker) -> bytes:
    class Evil:  # unpickling it calls open(marker, "w"): code from the file, creating the marker
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return pickle.dumps(Evil(), protocol=2)


def _rewrite(src: str, dst: str, edit, compress: int = zipfile.ZIP_STORED) -> str:
    """Copy the archive ``src`` to ``dst`` with ``edit({name under the root: bytes})`` applied."""
    with zipfile.ZipFile(src) as zin:
        root = zin.namelist()[0].split("/")[0]
        members = {n.split("/", 1)[1]: zin.read(n) for n in zin.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", compress) as zout:
        for name, data in members.items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _json_edit(name: str, change):
    def edit(members):
        doc = json.loads(members[name])
        change(doc)
        members[name] = json.dumps(doc).encode()
    return edit


def _pickled_weight(marker):
    def edit(members):
        _json_edit("data/weights/model_weights_config.json",
                   lambda d: next(iter(d["config"].values())).update(use_pickle=True))(members)
        members["data/weights/weight_0"] = _evil_pickle(marker)
    return edit


def _expression(marker):
    def change(doc):
        values = doc["graph_module"]["graph"]["sym_int_values"]
        for value in values.values():
            value["as_expr"]["expr_str"] = f"__import__('builtins').open({str(marker)!r}, 'w')"
        assert values, "the program has symbolic sizes to tamper with"
    return _json_edit("models/model.json", change)


def _target(name):
    def change(doc):
        doc["graph_module"]["graph"]["nodes"][-1]["target"] = name
    return _json_edit("models/model.json", change)


def _bigger_view(members):
    def change(doc):
        meta = next(iter(doc["config"].values()))["tensor_meta"]
        meta["sizes"][0]["as_int"] *= 1000
    _json_edit("data/weights/model_weights_config.json", change)(members)


@pytest.mark.parametrize("case, edit, refused", [
    ("pickled sample inputs", lambda m: lambda ms: ms.update({"data/sample_inputs/model.pt": _evil_pickle(m)}),
     None),
    ("symbolic expression", _expression, None),
    ("pickled weight", _pickled_weight, "pickled object"),
    ("custom object", lambda m: lambda ms: ms.update({"data/constants/custom_obj_0": _evil_pickle(m)}),
     "unexpected member"),
    ("call outside ATen", lambda m: _target("torch.load"), "only ATen operators"),
    ("ATen call writing a file", lambda m: _target("torch.ops.aten.save.default"), "writes a file"),
    ("view past its bytes", lambda m: _bigger_view, "does not fit"),
])
def test_no_code_runs_from_a_pt2(program, tmp_path, case, edit, refused):
    path, model = program
    marker = tmp_path / "marker"
    crafted = _rewrite(path, str(tmp_path / "crafted.pt2"), edit(marker))
    x = torch.randn(3, 2, 2)
    if refused is None:  # the crafted part is never read: the program runs, as written
        with torch.no_grad():
            assert torch.equal(load_exported(crafted)(x), model(x))
    else:
        with pytest.raises(ExportedFileError, match=refused):
            load_exported(crafted)(x)
    assert not marker.exists(), f"{case}: code from the file ran"
    # the command line's readers refuse it as a checkpoint, running nothing either
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--dense", crafted, "--out-dir", str(tmp_path / "ev"), "--quiet"])
    assert exc.value.code == 2 and not marker.exists()


def test_a_tampered_program_is_one_error_type(program, tmp_path):
    """Any value of the program's JSON replaced by one of another kind: the file runs, or ExportedFileError (or
    the images' own ValueError / TypeError), never another exception."""
    import random
    rng = random.Random(0)
    with zipfile.ZipFile(program[0]) as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        doc = json.loads(z.read(name))
    slots = []  # (container, key) of every value in the document

    def walk(value):
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            slots.append((value, key))
            walk(item)
    walk(doc)
    x = torch.randn(3, 2, 2)
    for i, (container, key) in enumerate(rng.sample(slots, 60)):
        old = container[key]
        container[key] = rng.choice([None, -1, 10 ** 12, 1.5, "x", "torch.ops.aten.add.Tensor", [], {}, True])
        crafted = _rewrite(program[0], str(tmp_path / f"t{i}.pt2"),
                           lambda ms: ms.update({"models/model.json": json.dumps(doc).encode()}))
        container[key] = old
        try:
            load_exported(crafted)(x)
        except ExportedFileError:
            pass
        except (ValueError, TypeError) as err:  # the file's input differs from these images
            assert str(err).startswith("images: "), err


def test_the_threat_is_real(program, tmp_path):
    """The same crafted archive under torch.export.load runs the pickle (why load_exported does not use it)."""
    marker = tmp_path / "marker"
    crafted = _rewrite(program[0], str(tmp_path / "crafted.pt2"),
                       lambda ms: ms.update({"data/sample_inputs/model.pt": _evil_pickle(marker)}))
    try:
        torch.export.load(crafted)
    except Exception:
        pass
    assert marker.exists()


def test_bad_pt2_files_are_one_error_type(program, tmp_path):
    path, _ = program
    compressed = _rewrite(path, str(tmp_path / "deflated.pt2"), lambda ms: None, zipfile.ZIP_DEFLATED)
    with pytest.raises(ExportedFileError, match="is compressed"):
        load_exported(compressed)
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ExportedFileError, match="not a .pt2 archive"):
        load_exported(tmp_path / "garbage.pt2")
    (tmp_path / "folder.pt2").mkdir()
    with pytest.raises(ExportedFileError, match="is a folder"):
        load_exported(tmp_path / "folder.pt2")
    with pytest.raises(ExportedFileError, match="no such file"):
        load_exported(tmp_path / "missing.onnx")
    run = load_exported(path)
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 2, 2\)"):
        run(torch.randn(3, 2, 3))
    assert pm_kernels.load_exported is load_exported and pm_kernels.ExportedFileError is ExportedFileError
    assert issubclass(ExportedFileError, ValueError)


def _onnx_file(path, node_domain="", external=None) -> str:
    """Y = X + W (or a custom-domain op) with W inline, or in an external data file at ``external``."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    if external is not None:
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3], data_location=TensorProto.EXTERNAL)
        w.external_data.add(key="location", value=external)
    node = helper.make_node("Add" if not node_domain else "Evil", ["X", "W"], ["Y"], domain=node_domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", 3])], [w])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(node_domain, 1)] if node_domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return str(path)


def test_onnx_files_are_checked_before_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    ok = load_exported(_onnx_file(tmp_path / "ok.onnx"), threads=1)
    assert torch.equal(ok(torch.zeros(2, 3)), torch.tensor([[1.0, 2.0, 3.0]] * 2))
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    sub = tmp_path / "models"
    sub.mkdir()
    for name, kwargs, message in [
        ("custom.onnx", dict(node_domain="evil.ops"), "not a standard ONNX operator"),
        ("up.onnx", dict(external="../secret.bin"), "outside the file's folder"),
        ("abs.onnx", dict(external=str(tmp_path / "secret.bin")), "outside the file's folder"),
    ]:
        with pytest.raises(ExportedFileError, match=message):
            load_exported(_onnx_file(sub / name, **kwargs))
    (sub / "garbage.onnx").write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(ExportedFileError):
        load_exported(sub / "garbage.onnx")
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3\)"):
        ok(torch.zeros(2, 4))
