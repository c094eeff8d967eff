"""A checkpoint's metadata is data from a file: only known keys and values consistent with the weights' shapes
reach a constructor, and the model is built from what the weights say (pipeline/families.py), for every task
(a segmentation checkpoint's backbone goes through the same family table as a classifier)."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from cli_subprocess import cli_command, cli_env, error_lines
from pm_kernels.pipeline.families import FAMILIES, VIT_ARGS, find_family
from pm_kernels.pipeline.io import PipelineError, save_checkpoint
from pm_kernels.pipeline.model import build_model, load_model
from pm_kernels.pipeline.tasks import TASKS
from task_inputs import every_task, task_args

DEMO_MODEL = {"classification": "digits_vit", "segmentation": "digits_seg_vit"}
CLASSES = {"classification": 10, "segmentation": 11}


def _meta(task, **extra):
    return dict({"model": DEMO_MODEL[task], "model_kwargs": {"depth": 2}, "task": task}, **extra)


@pytest.fixture(scope="module")
def states():
    """Per task, the state dict of a 2-block demo model."""
    made = {}

    def get(task):
        if task not in made:
            torch.manual_seed(0)
            model, _ = TASKS[task].load(None, DEMO_MODEL[task], num_classes=CLASSES[task], extra_kwargs={"depth": 2})
            made[task] = model.state_dict()
        return made[task]
    return get


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


@every_task
@pytest.mark.parametrize("model", ["demo", "vit_tiny_patch16_224"])
def test_model_kwargs_cannot_name_another_file(tmp_path, states, monkeypatch, task, model):
    """Nothing from the file reaches a constructor unchecked. A segmentation checkpoint's kwargs went to timm
    unchecked before tasks shared the family table (timm would have read the file named here)."""
    path = _file(tmp_path, states(task), _meta(task, model=DEMO_MODEL[task] if model == "demo" else model,
                                               model_kwargs={"checkpoint_path": "/etc/passwd"}))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="'checkpoint_path' is not accepted"):
        TASKS[task].load(path)


@every_task
@pytest.mark.parametrize("key", ["pretrained", "pretrained_cfg_overlay", "class_token", "dynamic_img_size"])
def test_unknown_model_kwargs_refused(tmp_path, states, monkeypatch, key, task):
    path = _file(tmp_path, states(task), _meta(task, model_kwargs={key: True}))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=f"'{key}' is not accepted"):
        TASKS[task].load(path)


@every_task
@pytest.mark.parametrize("kwargs, says", [
    ({"depth": 24}, "depth = 24, but the weights have depth = 2"),
    ({"embed_dim": 1024}, "embed_dim = 1024, but the weights have embed_dim = 64"),
    ({"img_size": 224}, "img_size = 224, but the weights have img_size = 32"),
    ({"num_classes": 1000}, r"num_classes = 1000, but the weights have num_classes = (10|0)\b"),
])
def test_kwargs_that_disagree_with_the_weights(tmp_path, states, monkeypatch, kwargs, says, task):
    path = _file(tmp_path, states(task), _meta(task, model_kwargs=kwargs))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        TASKS[task].load(path)


@every_task
@pytest.mark.parametrize("kwargs, says", [
    ({"depth": -1}, "depth"), ({"num_heads": 0}, "num_heads"), ({"mlp_ratio": float("nan")}, "mlp_ratio"),
    ({"qkv_bias": "yes"}, "qkv_bias"), ({"img_size": True}, "img_size"), ({"num_heads": 3}, "does not divide"),
])
def test_kwargs_of_the_wrong_type_or_range(tmp_path, states, monkeypatch, kwargs, says, task):
    path = _file(tmp_path, states(task), _meta(task, model_kwargs=kwargs))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        TASKS[task].load(path)


@every_task
def test_large_model_named_by_a_small_file(tmp_path, monkeypatch, task):
    path = _file(tmp_path, {"x": torch.zeros(1)}, {"model": "vit_large_patch16_224"})
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="not those of a timm ViT"):
        TASKS[task].load(path)


@every_task
def test_expanded_tensor_cannot_claim_large_weights(tmp_path, states, monkeypatch, task):
    state = dict(states(task))
    key = next(k for k in state if k.endswith("pos_embed"))
    state[key] = torch.zeros(1).expand(1, 4097, 64)  # 1 stored float, 262k claimed
    path = _file(tmp_path, state, _meta(task))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match="more elements than its storage holds"):
        TASKS[task].load(path)


@every_task
@pytest.mark.parametrize("meta, says", [
    ({"model": ["digits_vit"]}, "expected a model name"),
    ({"model": "resnet50"}, "not a supported model"),
    ({"model": "deit_tiny_distilled_patch16_224"}, "not a supported model"),
    (dict(keep_rate="abc"), "keep_rate"),
    (dict(stage="rm -rf"), "stage"),
    (dict(model_kwargs=[1, 2]), "model_kwargs: expected a dict"),
    (dict(thresholds="all"), "thresholds"),
    (dict(task="../etc"), "task"),
])
def test_bad_meta_values(tmp_path, states, monkeypatch, meta, says, task):
    path = _file(tmp_path, states(task), dict(_meta(task), **meta))
    _never_build(monkeypatch)
    with pytest.raises(PipelineError, match=says):
        TASKS[task].load(path)


@pytest.mark.parametrize("meta, says", [
    (dict(num_classes=5), "pm_meta num_classes = 5, but the weights have 11"),
    (dict(decoder="linear"), "pm_meta decoder = 'linear', but the weights have 'mask'"),
    (dict(decoder_depth=7), "pm_meta decoder_depth = 7, but the weights have 2"),
    (dict(decoder_depth="2"), "decoder_depth"),
])
def test_segmentation_decoder_meta_must_match_the_weights(tmp_path, states, monkeypatch, meta, says):
    path = _file(tmp_path, states("segmentation"), dict(_meta("segmentation"), **meta))
    with pytest.raises(PipelineError, match=says):
        TASKS["segmentation"].load(path)


def test_a_checkpoint_of_another_task_names_it(tmp_path, states):
    path = _file(tmp_path, states("segmentation"), _meta("segmentation"))
    with pytest.raises(PipelineError, match="a segmentation checkpoint, this run is --task classification"):
        TASKS["classification"].load(path)


@every_task
def test_unknown_meta_keys_are_dropped(tmp_path, states, task):
    path = _file(tmp_path, states(task), _meta(task, stage="dense", evil={"a": 1}, keep_rate=1.0))
    model, meta = TASKS[task].load(path)
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


def test_classifier_weights_load_into_a_segmenter_backbone(tmp_path):
    """A raw timm classifier state dict (no pm_meta) is a segmenter's backbone: its head dropped, the sizes read
    from the weights, the decoder fresh."""
    import timm
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).eval()
    path = str(tmp_path / "raw.pth")
    torch.save(reference.state_dict(), path)
    seg, meta = TASKS["segmentation"].load(path, "deit_tiny_patch16_224", num_classes=3)
    assert meta["model_kwargs"]["num_classes"] == 0 and meta["model_kwargs"]["depth"] == 2
    assert meta["num_classes"] == 3 and meta["decoder"] == "mask"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(seg.backbone.eval().forward_features(x), reference.forward_features(x))


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
        name = next((p for p in family.patterns if "*" not in p), "deit_tiny_patch16_224")
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


@every_task
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's unit")
def test_small_file_cannot_make_the_cli_allocate_a_large_model(tmp_path, task):
    """1.6 KB naming ViT-Huge (632M parameters, 2.5 GB in float32): one error line, and the CLI's peak memory
    stays that of a failing run (about 1.1 GB here: torch and timm imported), not 3.4 GB as before."""
    path = _file(tmp_path, {"x": torch.zeros(1)}, {"model": "vit_huge_patch14_224"})
    argv = cli_command() + ["evaluate", *task_args(task), "--checkpoint", path, "--out-dir", str(tmp_path / "ev"),
                            "--quiet"]
    r = subprocess.run([sys.executable, "-c", _RSS_OF_CHILD] + argv, env=cli_env(), capture_output=True, text=True,
                       timeout=180)
    code, peak_kib = (int(v) for v in r.stdout.split())
    lines = error_lines(r.stderr)
    assert code == 2 and len(lines) == 1 and "not those of a timm ViT" in lines[0], r.stderr
    assert peak_kib < 2_000_000, f"peak RSS {peak_kib / 1024:.0f} MiB"
