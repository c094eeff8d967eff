"""The ``pm-kernels`` commands on a HuggingFace transformers model folder (``save_pretrained``'s config.json +
safetensors): calibrate → compress → finetune → evaluate → export, the checkpoints written from it, and the
checkpoint rules (the config checked against the weights before anything is allocated, no remote code, nothing
downloaded)."""
import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pm_kernels  # noqa: E402
from pm_kernels.cli import main  # noqa: E402
from pm_kernels.deploy import load_exported  # noqa: E402
from pm_kernels.pipeline.model import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**change):
    # the digits data: 32×32 grey images, 10 classes
    return transformers.ViTConfig(**dict(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8, num_channels=1,
                                              num_labels=10), **change))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "vit"
    transformers.ViTForImageClassification(_config()).eval().save_pretrained(path)
    return str(path)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("pm-kernels")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_commands_run_on_a_model_folder(folder, tmp_path):
    out = str(tmp_path)
    common = ["--data", "digits", "--batch-size", "16"]
    assert main(["calibrate", "--checkpoint", folder, *common, "--iters", "2", "--out", f"{out}/s.pt"]) in (0, None)
    assert main(["compress", "--checkpoint", folder, "--scores", f"{out}/s.pt", "--keep-rate", "0.5",
                 "--out", f"{out}/pm.pth"]) in (0, None)
    assert main(["finetune", "--checkpoint", f"{out}/pm.pth", "--teacher", folder, *common, "--epochs", "0.02",
                 "--out", f"{out}/ft.pth"]) in (0, None)
    assert main(["export", "--checkpoint", f"{out}/ft.pth", "--out", f"{out}/ft.pt2", "--format", "pt2",
                 "--verify"]) in (0, None)
    # the fine-tuned checkpoint is a compressed transformers model again, with its config
    classifier, meta = load_model(f"{out}/ft.pth")
    model = classifier.pm_backbone
    assert type(model).__name__ == "ViTForImageClassification" and meta["model"] == "transformers:ViTForImageClassification"
    assert meta["hf_config"]["hidden_size"] == 32
    kept = [layer.M.shape[0] for layer in pm_kernels.host_of(model).layers(model) if layer.M is not None]
    assert kept and all(k < 17 for k in kept)
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), model(images).logits)
        torch.testing.assert_close(load_exported(f"{out}/ft.pt2")(images), classifier(images), atol=1e-4, rtol=1e-4)


def test_a_folder_loads_as_the_model_it_holds(folder):
    classifier, _ = load_model(folder)
    reference = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), reference(images).logits, atol=0, rtol=0)
    assert pm_kernels.is_patched(classifier) and classifier.num_classes == 10


def _edit(folder, tmp_path, **change):
    """A copy of ``folder`` whose config.json has ``change`` applied (None removes a key)."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    config = json.loads((copy / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=4096, intermediate_size=16384), r"describes a ViTForImageClassification of \d+ parameters, "
                                                      r"but the weights hold \d+ values"),
    (dict(auto_map={"AutoModelForImageClassification": "evil.Model"}), r"code from the model folder \(auto_map\)"),
    (dict(architectures=["ViTForMaskedImageModeling"]), r"'ViTForMaskedImageModeling' is not a transformers class"),
    (dict(architectures=["ViTModel"]), r"ViTModel is not an image classifier"),
    (dict(model_type="deit"), r"model_type 'deit' is not that of ViTForImageClassification"),
    (dict(num_hidden_layers=1), r"the weights do not fit its config.json"),
])
def test_a_folder_that_does_not_hold_together_is_refused(folder, tmp_path, capsys, change, message):
    edited = _edit(folder, tmp_path, **change)
    line = _error(capsys, ["evaluate", "--checkpoint", edited, "--data", "digits", "--out", str(tmp_path / "e")])
    assert "error:" in line and re.search(message, line), line


def test_a_folder_is_for_classification_and_takes_no_model_arguments(folder, tmp_path, capsys):
    line = _error(capsys, ["calibrate", "--task", "segmentation", "--checkpoint", folder, "--data", "digits",
                           "--out", str(tmp_path / "s.pt")])
    assert "model folder" in line and "--task classification" in line
    line = _error(capsys, ["calibrate", "--checkpoint", folder, "--data", "digits", "--img-size", "64",
                           "--out", str(tmp_path / "s.pt")])
    assert "img_size = 64, but the model takes 32 images" in line
