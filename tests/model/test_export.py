"""``pm_kernels.export``: ONNX Runtime / torch.export outputs equal PyTorch's (fp32, within 1e-4) at batch sizes
other than the exported example's; the files hold only standard ops; bad input fails clearly; the CLI.

Runtime on a shared 2-core CPU: about a minute, most of it the dynamo ONNX export of the 12-block DeiT-T.
"""
import os

import onnx
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels.cli import main
from pm_kernels.deploy import load_exported
from pm_kernels.pipeline.io import save_checkpoint
from pm_kernels.pipeline.model import build_model

PARITY = 1e-4  # issue 13: fp32 max |exported − PyTorch|


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared
    yield
    torch.set_num_threads(threads)


def _like_trained(model, keep_rate=0.6, seed=0):
    """Compressed at ``keep_rate`` on random scores, M and R moved off their initial values (as by fine-tuning)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(model.blocks), model.patch_embed.num_patches, generator=g) + 1e-3
    pm_kernels.compress(model.eval(), scores, keep_rate=keep_rate, prune_rate=0.1)
    with torch.no_grad():
        for blk in model.blocks:
            blk.M.add_(0.02 * torch.randn(blk.M.shape, generator=g))
            blk.R.add_(0.02 * torch.randn(blk.R.shape, generator=g))
    return model


def _small(depth=2, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=depth, num_heads=3,
                             num_classes=5).eval()


def _max_diff(run, model, batch, size=224, seed=1):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((run(x) - model(x)).abs().max())


def _only_standard_ops(path):
    graph = onnx.load(path)
    domains = {n.domain for n in graph.graph.node} | {f.domain for f in graph.functions}
    assert domains <= {"", "ai.onnx"}, domains  # no pm_kernels:: (or any custom) op left in the file
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    return batch_dim


# ------------------------------------------------------------------------------- parity at DeiT sizes

@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return _like_trained(timm.create_model("deit_tiny_patch16_224", pretrained=False))


def test_onnx_parity_deit_tiny(deit_tiny, tmp_path):
    path = pm_kernels.export(deit_tiny, tmp_path / "pm.onnx")  # traced at batch 2
    assert path == str(tmp_path / "pm.onnx") and os.listdir(tmp_path) == ["pm.onnx"]  # no temp files left
    assert _only_standard_ops(path).dim_param  # a named, dynamic batch dimension
    run = load_exported(path, threads=1)
    for batch in (1, 3):
        assert _max_diff(run, deit_tiny, batch) <= PARITY


def test_pt2_parity_deit_tiny(deit_tiny, tmp_path):
    path = pm_kernels.export(deit_tiny, str(tmp_path / "pm.pt2"), format="pt2")
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("pm_kernels" in t for t in targets), targets
    run = load_exported(path)
    for batch in (1, 3):
        assert _max_diff(run, deit_tiny, batch) <= PARITY


def test_onnx_parity_deit_small_widths(tmp_path):
    """DeiT-S's widths (384, 6 heads) at 4 blocks instead of 12: the export time stays small."""
    torch.manual_seed(0)
    model = _like_trained(timm.create_model("deit_small_patch16_224", pretrained=False, depth=4), keep_rate=0.6)
    run = load_exported(pm_kernels.export(model, tmp_path / "pm_s.onnx"), threads=1)
    for batch in (1, 3):
        assert _max_diff(run, model, batch) <= PARITY


# ------------------------------------------------------------------------------ small models: behaviour

def test_optimized_and_identity_models_export(tmp_path):
    dense = _small()
    pm = pm_kernels.patch_timm(_small())  # identity structure: the dense model's outputs
    run = load_exported(pm_kernels.export(pm_kernels.optimize(pm), tmp_path / "id.pt2", format="pt2"))
    assert _max_diff(run, dense, 3, size=32) <= PARITY


@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_segmenter_exports(tmp_path, decoder):
    """A PM-Segmenter (and its optimize form) exports: per-pixel logits equal PyTorch's at a batch other than the
    example's, in ONNX Runtime and as a .pt2 program; standard ops only."""
    seg = pm_kernels.Segmenter(_like_trained(_small(depth=3), keep_rate=0.5), 4, decoder, dropout=0.0).eval()
    onnx_path = pm_kernels.export(seg, str(tmp_path / "seg.onnx"))
    _only_standard_ops(onnx_path)
    pt2_path = pm_kernels.export(pm_kernels.optimize(seg), str(tmp_path / "seg.pt2"), format="pt2")
    for path in (onnx_path, pt2_path):
        run = load_exported(path)
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = seg(x)
        got = run(x)
        assert got.shape == want.shape == (3, 4, 32, 32)
        assert float((got - want).abs().max()) <= PARITY
    dense_backbone = pm_kernels.Segmenter(_small(depth=1), 4, "linear")
    with pytest.raises(TypeError, match="backbone is not a PM model"):
        pm_kernels.export(dense_backbone, str(tmp_path / "x.onnx"))


def test_model_state_is_restored(tmp_path):
    model = _like_trained(_small())
    pm_kernels.set_backend(model, "torch")
    del model.blocks[1].attn.backend  # back to the class default
    model.train()
    pm_kernels.export(model, tmp_path / "m.pt2", format="pt2")
    assert model.blocks[0].attn.backend == "torch" and "backend" not in vars(model.blocks[1].attn)
    assert all(m.training for m in model.modules())


def test_batch_one_example_stays_dynamic_and_static_batch(tmp_path):
    model = _like_trained(_small())
    one = torch.randn(1, 3, 32, 32)
    run = load_exported(pm_kernels.export(model, tmp_path / "d.pt2", format="pt2", example_inputs=one))
    assert _max_diff(run, model, 3, size=32) <= PARITY
    path = pm_kernels.export(model, tmp_path / "s.onnx", example_inputs=(one,), dynamic_batch=False, opset=18)
    assert _only_standard_ops(path).dim_value == 1
    static = load_exported(path, threads=1)
    assert _max_diff(static, model, 1, size=32) <= PARITY
    with pytest.raises(Exception):  # the static file refuses another batch size
        static(torch.randn(2, 3, 32, 32))


def test_highest_opset_is_written_and_runs(tmp_path):
    """Both ends of [MIN_OPSET, MAX_OPSET] are exported and run (the lowest above, at opset=18); above MAX_OPSET
    the exporter wrote opset 18 with opset-23 Attention nodes, a file ONNX Runtime refuses (issue 24, item 3)."""
    from torch.onnx import _constants
    assert pm_kernels.deploy.MAX_OPSET <= _constants.ONNX_MAX_OPSET
    model = _like_trained(_small())
    path = pm_kernels.export(model, tmp_path / "hi.onnx", opset=pm_kernels.deploy.MAX_OPSET)
    assert {e.domain: e.version for e in onnx.load(path).opset_import}[""] == pm_kernels.deploy.MAX_OPSET
    assert _max_diff(load_exported(path, threads=1), model, 3, size=32) <= PARITY


def test_bad_input(tmp_path, monkeypatch):
    model = _like_trained(_small())
    with pytest.raises(TypeError, match=r"call pm_kernels.patch on a dense model first"):
        pm_kernels.export(_small(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="format"):
        pm_kernels.export(model, tmp_path / "x.tflite", format="tflite")
    for opset in (12, pm_kernels.deploy.MAX_OPSET + 1):
        with pytest.raises(ValueError, match=r"opset: expected 18 <= opset <= 23"):
            pm_kernels.export(model, tmp_path / "x.onnx", opset=opset)
    with pytest.raises(ValueError, match="opset: only for format='onnx'"):
        pm_kernels.export(model, tmp_path / "x.pt2", format="pt2", opset=18)
    with pytest.raises(ValueError, match=r"example_inputs: expected a \(B, 3, 32, 32\)"):
        pm_kernels.export(model, tmp_path / "x.onnx", example_inputs=torch.randn(2, 3, 64, 64))
    with pytest.raises(TypeError, match="dynamic_batch"):
        pm_kernels.export(model, tmp_path / "x.onnx", dynamic_batch="yes")
    with pytest.raises(ValueError, match="a folder"):
        pm_kernels.export(model, tmp_path)
    with pytest.raises(ValueError, match=r"\.onnx or \.pt2"):
        (tmp_path / "x.txt").write_text("")
        load_exported(tmp_path / "x.txt")
    real_find_spec = pm_kernels.deploy.importlib.util.find_spec
    monkeypatch.setattr(pm_kernels.deploy.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"onnxscript.*pip install pm_kernels\[export\]"):
        pm_kernels.export(model, tmp_path / "x.onnx")
    assert sorted(os.listdir(tmp_path)) == ["x.txt"]  # nothing written by the failed calls


# ------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    model = _like_trained(build_model("digits_vit"))
    path = str(tmp_path_factory.mktemp("export_cli") / "pm.pth")
    save_checkpoint(model, path, {"model": "digits_vit", "model_kwargs": {}})
    return path


def test_cli_export_verify(digits_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "pm.pt2")
    assert main(["export", "--checkpoint", digits_checkpoint, "--out", out, "--batch-size", "2", "--verify",
                 "--quiet"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("verify:")]
    assert [ln.split(" at batch ")[1].split(":")[0] for ln in lines] == ["2", "3"]  # the example's and another
    assert all(float(ln.split(": ")[2].split()[0]) <= PARITY for ln in lines)
    assert sorted(os.listdir(tmp_path)) == ["pm.pt2", "pm.pt2.json"]


@pytest.mark.parametrize("argv, message", [
    (["--out", "pm.bin"], "give --format onnx|pt2"),
    (["--out", "pm.onnx", "--format", "pt2"], "a .onnx file, but --format pt2"),
    (["--out", "pm.onnx", "--opset", "12"], "--opset: expected an int >= 18 and <= 23"),
    (["--out", "pm.onnx", "--opset", "28"], "--opset: expected an int >= 18 and <= 23"),
    (["--out", "pm.onnx", "--format", "tflite"], "invalid choice"),
])
def test_cli_export_errors(digits_checkpoint, tmp_path, capsys, argv, message):
    argv = [a if a in ("--out",) or not a.startswith("pm.") else str(tmp_path / a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", digits_checkpoint, "--quiet"] + argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "error" in lines[0] and message in lines[0], err
    assert os.listdir(tmp_path) == []


def test_cli_export_output_rules(digits_checkpoint, tmp_path, capsys):
    """The export command claims its output as the other commands do: a folder is refused, and the checkpoint
    read cannot be overwritten by a companion file."""
    (tmp_path / "pm.onnx").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", digits_checkpoint, "--quiet", "--out", str(tmp_path / "pm.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is a folder" in err, err
    checkpoint = tmp_path / "pm.pt2.json"
    checkpoint.write_bytes(open(digits_checkpoint, "rb").read())
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(checkpoint), "--quiet", "--out", str(tmp_path / "pm.pt2")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "would overwrite the input" in err, err
    assert checkpoint.read_bytes() == before and not (tmp_path / "pm.pt2").exists()
