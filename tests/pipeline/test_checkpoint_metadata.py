"""A checkpoint's metadata is data from a file: only known keys and values consistent with the weights' shapes
reach a constructor, and the model is built from what the weights say (pipeline/families.py)."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from cli_subprocess import cli_command, cli_env, error_lines
from pm_kernels.pipeline.families import FAMILIES, VIT_ARGS, find_family
from pm_kernels.pipeline.io import PipelineError, save_checkpoint
from pm_kernels.pipeline.model import build_model, load_model

DIGITS_2 = {"model": "digits_vit", "model_kwargs": {"depth": 2}}


@pytest.fixture(scope="module")
def digits_state():
    torch.manual_seed(0)
    return build_model("digits_vit", dict(depth=2)).state_dict()


def _file(tmp_path, state, meta, name="c.pth"):
    path = str(tmp_path / name)
    torch.save({"state_dict": state, "pm_meta": meta}, path)
    return path


def _never_build(monkeypatch):
    """Fail the test if any family's constructor runs."""
    import pm_kernels.pipeline.families as fam

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built from an untrusted checkpoint")
    monkeypatch.setattr(fam, "FAMILIES", tuple(dataclasses.replace(f, build=refuse) for f in FAMILIES))


def test_model_kwargs_cannot_name_another_file(tmp_path, digits_state, monkeypatch):
    path = _file(tmp_path, digits_state, dict(DIGITS_2, model_kwargs={"checkpoint_path": "/etc/passwd"}))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="'checkpoint_path' is not accepted"):
        load_model(path)


@pytest.mark.parametrize("key", ["pretrained", "pretrained_cfg_overlay", "class_token", "dynamic_img_size"])
def test_unknown_model_kwargs_refused(tmp_path, digits_state, monkeypatch, key):
    path = _file(tmp_path, digits_state, dict(DIGITS_2, model_kwargs={key: True}))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=f"'{key}' is not accepted"):
        load_model(path)


@pytest.mark.parametrize("kwargs, says", [
    ({"depth": 24}, "depth = 24, but the weights have depth = 2"),
    ({"embed_dim": 1024}, "embed_dim = 1024, but the weights have embed_dim = 64"),
    ({"img_size": 224}, "img_size = 224, but the weights have img_size = 32"),
    ({"num_classes": 1000}, "num_classes = 1000, but the weights have num_classes = 10"),
])
def test_kwargs_that_disagree_with_the_weights(tmp_path, digits_state, monkeypatch, kwargs, says):
    path = _file(tmp_path, digits_state, {"model": "digits_vit", "model_kwargs": kwargs})
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        load_model(path)


@pytest.mark.parametrize("kwargs, says", [
    ({"depth": -1}, "depth"), ({"num_heads": 0}, "num_heads"), ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"qkv_bias": "yes"}, "qkv_bias"), ({"img_size": True}, "img_size"), ({"num_heads": 3}, "does not divide"),
])
def test_kwargs_of_the_wrong_type_or_range(tmp_path, digits_state, monkeypatch, kwargs, says):
    path = _file(tmp_path, digits_state, {"model": "digits_vit", "model_kwargs": kwargs})
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        load_model(path)


def test_large_model_named_by_a_small_file(tmp_path, monkeypatch):
    path = _file(tmp_path, {"x": torch.zeros(1)}, {"model": "vit_large_patch16_224"})
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="not those of a timm ViT"):
        load_model(path)


def test_expanded_tensor_cannot_claim_large_weights(tmp_path, digits_state, monkeypatch):
    state = dict(digits_state)
    state["pos_embed"] = torch.zeros(1).expand(1, 4097, 64)  # 1 stored float, 262k claimed
    path = _file(tmp_path, state, DIGITS_2)
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="more elements than its storage holds"):
        load_model(path)


@pytest.mark.parametrize("meta, says", [
    ({"model": ["digits_vit"]}, "expected a model name"),
    ({"model": "resnet50"}, "not a supported model"),
    ({"model": "deit_tiny_distilled_patch16_224"}, "not a supported model"),
    (dict(DIGITS_2, keep_rate="abc"), "keep_rate"),
    (dict(DIGITS_2, stage="rm -rf"), "stage"),
    (dict(DIGITS_2, model_kwargs=[1, 2]), "model_kwargs: expected a dict"),
])
def test_bad_meta_values(tmp_path, digits_state, monkeypatch, meta, says):
    path = _file(tmp_path, digits_state, meta)
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        load_model(path)


def test_unknown_meta_keys_are_dropped(tmp_path, digits_state):
    path = _file(tmp_path, digits_state, dict(DIGITS_2, stage="dense", evil={"a": 1}, keep_rate=1.0))
    model, meta = load_model(path)
    assert "evil" not in meta and meta["stage"] == "dense" and meta["keep_rate"] == 1.0


def test_model_built_from_the_weights(tmp_path):
    """A raw timm state dict (no pm_meta) of a 2-block DeiT-Tiny at 32 px with 10 classes: the name gives the
    family (and the heads), the weights give depth, image size and classes."""
    import timm
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    path = str(tmp_path / "raw.pth")
    torch.save(reference.state_dict(), path)
    model, meta = load_model(path, "deit_tiny_patch16_224")
    assert meta["model_kwargs"] == dict(img_size=32, patch_size=16, in_chans=3, num_classes=10, embed_dim=192,
                                        depth=2, mlp_ratio=4.0, qkv_bias=True, num_heads=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x))


def test_pipeline_checkpoint_records_what_the_weights_cannot_say(tmp_path):
    """num_heads is not in the weights' shapes: the pipeline records it, and a reload builds the same model."""
    model, meta = load_model(None, "digits_vit", num_classes=10, extra_kwargs={"depth": 2, "num_heads": 2})
    assert meta["model_kwargs"]["num_heads"] == 2
    path = save_checkpoint(model, str(tmp_path / "d.pth"), dict(meta, stage="dense"))
    again, meta_again = load_model(path)
    assert meta_again["model_kwargs"]["num_heads"] == 2 and again.blocks[0].attn.num_heads == 2
    fresh, fresh_meta = load_model(None, "digits_vit", num_classes=10)
    assert fresh_meta["model_kwargs"]["num_heads"] == 4  # the default, recorded too
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))


def test_every_family_reads_what_it_builds():
    """Each family entry: every argument with a reader reads back the value the model was built with."""
    for family in FAMILIES:
        name = "digits_vit" if family.covers("digits_vit") else "deit_tiny_patch16_224"
        assert find_family(name) is family
        kwargs = dict(img_size=32, patch_size=8, in_chans=2, num_classes=3, embed_dim=48, depth=2, num_heads=3,
                      mlp_ratio=2.0, qkv_bias=False)
        state = build_model(name, kwargs).state_dict()
        for key, arg in family.args.items():
            if arg.read is not None:
                assert arg.read(state) == kwargs[key], (family.name, key)
    assert set(VIT_ARGS) >= {"depth", "embed_dim", "img_size"}


_RSS_OF_CHILD = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); " \
                "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); " \
                "sys.stderr.write(r.stderr)"


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's unit")
def test_small_file_cannot_make_the_cli_allocate_a_large_model(tmp_path):
    """1.6 KB naming ViT-Huge (632M parameters, 2.5 GB in float32): one error line, and the CLI's peak memory
    stays that of a failing run (about 1.1 GB here: torch and timm imported), not 3.4 GB as before."""
    path = _file(tmp_path, {"x": torch.zeros(1)}, {"model": "vit_huge_patch14_224"})
    argv = cli_command() + ["evaluate", "--checkpoint", path, "--out-dir", str(tmp_path / "ev"), "--quiet"]
    r = subprocess.run([sys.executable, "-c", _RSS_OF_CHILD] + argv, env=cli_env(), capture_output=True, text=True,
                       timeout=180)
    code, peak_kib = (int(v) for v in r.stdout.split())
    lines = error_lines(r.stderr)
    assert code == 2 and len(lines) == 1 and "not those of a timm ViT" in lines[0], r.stderr
    assert peak_kib < 2_000_000, f"peak RSS {peak_kib / 1024:.0f} MiB"
