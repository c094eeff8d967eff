"""The pipeline end to end (reduced digits demo), checkpoint round trips, and the CLI's bad-input errors.

Runtime on a shared 2-core CPU: a few minutes, almost all of it the reduced demo (module-scoped fixture).
"""
import json
import os

import pytest
import torch

from pm_kernels import compress, is_patched
from pm_kernels.cli import main
from pm_kernels.pipeline.data import load_data
from pm_kernels.pipeline.demo import run_demo
from pm_kernels.pipeline.finetune import DistillationLoss, TrainConfig, param_groups, train
from pm_kernels.pipeline.io import atomic_write, load_scores, save_checkpoint, save_scores
from pm_kernels.pipeline.model import build_model, load_model
from pm_kernels.pipeline.tasks import TASKS

# Reduced demo budget (the task's demo_quick): PM at keep 0.6 must stay within this many top-1 points of dense.
# Measured with it (8 dense epochs, 1 fine-tuning epoch), seed 0, 1 thread: dense 88.00, PM keep 0.6 91.78 (+3.78).
QUICK_BOUND = 2.0
QUICK_ROUNDS = TASKS["classification"].demo_quick["speed_repeats"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: extra OpenMP threads only spin
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    task = TASKS["classification"]
    results = run_demo(task, out, task.demo_config(quick=True), progress=False, log=lambda m: None)
    return out, results


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _cli_error(capsys, argv):
    """Run main(argv): it must exit non-zero with one error line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- demo: accuracy

def test_demo_reduced_budget(demo):
    out, results = demo
    rows = {r["model"]: r for r in results["rows"]}
    dense, pm = rows["dense"], rows["PM keep 0.6"]
    assert dense["top1"] > 80.0, "dense ViT should beat chance (10%) by far"
    assert pm["top1"] >= dense["top1"] - QUICK_BOUND, (pm["top1"], dense["top1"])
    assert pm["gmacs"] < 0.8 * dense["gmacs"] and pm["mac_ratio"] == pytest.approx(dense["gmacs"] / pm["gmacs"])
    assert pm["timed"] == "optimize" and dense["timed"] == "eager"  # the deployable form, against the dense model
    for r in (dense, pm):  # interleaved rounds: the median lies within the spread, every round recorded
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
        assert len(r["images_per_s_runs"]) == QUICK_ROUNDS
    assert 0.5 < pm["keep"] < 0.7
    for name in ("results.json", "accuracy_vs_keep.png", "structure_keep0.6.png", "dense.pth", "scores.pt",
                 "pm_keep0.6.pth"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["rows"][0]["model"] == "dense"
    assert not [f for f in _files(out) if f.endswith(".tmp")]


# ---------------------------------------------------------------- checkpoints load back

def test_compress_checkpoint_roundtrip(demo, tmp_path, capsys):
    out, _ = demo
    dense_path, scores_path = os.path.join(out, "dense.pth"), os.path.join(out, "scores.pt")
    target = str(tmp_path / "pm.pth")
    assert main(["compress", "--checkpoint", dense_path, "--scores", scores_path, "--keep-rate", "0.6",
                 "--out", target, "--quiet"]) == 0
    loaded, meta = load_model(target)
    assert meta["stage"] == "compressed" and meta["keep_rate"] == 0.6
    expected, _ = load_model(dense_path)
    compress(expected, load_scores(scores_path)["scores"], keep_rate=0.6)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
    assert os.path.exists(str(tmp_path / "pm.json"))


def test_finetuned_checkpoint_roundtrip(demo, tmp_path):
    out, _ = demo
    model, meta = load_model(os.path.join(out, "pm_keep0.6.pth"))
    teacher, _ = load_model(os.path.join(out, "dense.pth"))
    data = load_data("digits")
    train(model, data, TrainConfig(epochs=1, max_iters=2, lr=1e-3, progress=False), teacher=teacher)
    path = save_checkpoint(model, str(tmp_path / "ft.pth"), meta)
    again, _ = load_model(path)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert [b.M.shape for b in again.blocks] == [b.M.shape for b in model.blocks]


def test_cli_finetune_writes_loadable_checkpoint(demo, tmp_path):
    out, _ = demo
    target = str(tmp_path / "ft.pth")
    assert main(["finetune", "--checkpoint", os.path.join(out, "pm_keep0.6_init.pth"), "--teacher",
                 os.path.join(out, "dense.pth"), "--max-iters", "2", "--lr", "1e-4", "--out", target,
                 "--quiet"]) == 0
    model, meta = load_model(target)
    assert meta["stage"] == "finetuned" and is_patched(model)
    with open(str(tmp_path / "ft.json")) as f:
        assert json.load(f)["history"]["iterations"] == 2


def test_pm_deit_registry_checkpoint(tmp_path):
    import timm
    kwargs = dict(img_size=32, depth=2, num_classes=10)
    model = timm.create_model("pm_deit_tiny_patch16_224", **kwargs).eval()
    scores = torch.rand(2, model.patch_embed.num_patches) + 0.1
    compress(model, scores, keep_rate=0.5, prune_rate=0.25)
    path = save_checkpoint(model, str(tmp_path / "pm_tiny.pth"), {"model": "pm_deit_tiny_patch16_224"})
    again = timm.create_model("pm_deit_tiny_patch16_224", checkpoint_path=path, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ---------------------------------------------------------------- recipe pieces

def test_distillation_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    teacher = lambda images: t
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, alpha=0.8, tau=20.0)(None, s, y)
    p_t, p_s = torch.softmax(t / 20, 1), torch.softmax(s / 20, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    expected = torch.nn.functional.cross_entropy(s, y) + 0.8 * 400 * kl / (4 * 10)
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_param_groups_and_authors_quirk():
    model = build_model("digits_vit", dict(depth=2))
    import pm_kernels
    pm_kernels.compress(model, torch.rand(2, model.patch_embed.num_patches) + 0.1)  # M and R exist once compressed
    groups = param_groups(model, 1e-4, 1e-3)
    decay_ids = {id(p) for p in groups[0]["params"]}
    assert id(model.blocks[0].M) in decay_ids and id(model.blocks[0].R) in decay_ids
    assert id(model.pos_embed) not in decay_ids and groups[0]["lr"] == groups[1]["lr"] == 1e-4
    quirk = param_groups(model, 1e-4, 1e-3, authors_lr_quirk=True)
    assert quirk[0]["lr"] == 1e-6 and quirk[1]["lr"] == 1e-4
    assert TrainConfig(batch_size=128).scaled_lr(world_size=2) == pytest.approx(1e-4 * 256 / 512)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_write(str(target), fail)
    assert target.read_text() == "old" and _files(tmp_path) == ["x.json"]


# ---------------------------------------------------------------- bad input: one line, non-zero, nothing written

def test_missing_checkpoint(tmp_path, capsys):
    line = _cli_error(capsys, ["compress", "--checkpoint", str(tmp_path / "nope.pth"), "--scores",
                               str(tmp_path / "s.pt"), "--out", str(tmp_path / "o.pth")])
    assert "no such file" in line and _files(tmp_path) == []


def test_corrupt_checkpoint(demo, tmp_path, capsys):
    out, _ = demo
    bad = tmp_path / "bad.pth"
    with open(os.path.join(out, "pm_keep0.6.pth"), "rb") as f:
        bad.write_bytes(f.read()[:5000])  # truncated
    line = _cli_error(capsys, ["evaluate", "--checkpoint", str(bad), "--out-dir", str(tmp_path / "ev")])
    assert "corrupt" in line
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    line = _cli_error(capsys, ["finetune", "--checkpoint", str(tmp_path / "junk.pth"), "--alpha", "0",
                               "--out", str(tmp_path / "o.pth")])
    assert "corrupt" in line
    assert sorted(_files(tmp_path)) == ["bad.pth", "junk.pth"]


def test_scores_from_another_depth(demo, tmp_path, capsys):
    out, _ = demo
    other = save_scores(torch.rand(6, 64), str(tmp_path / "deep.pt"))
    line = _cli_error(capsys, ["compress", "--checkpoint", os.path.join(out, "dense.pth"), "--scores", other,
                               "--out", str(tmp_path / "o.pth")])
    assert "(6, 64)" in line and "(4, 64)" in line  # the library's check: scores for 6 blocks, model has 4
    assert _files(tmp_path) == ["deep.pt"]


@pytest.mark.parametrize("rate", ["1.5", "0", "-0.2", "abc"])
def test_keep_rate_out_of_range(demo, tmp_path, capsys, rate):
    out, _ = demo
    line = _cli_error(capsys, ["compress", "--checkpoint", os.path.join(out, "dense.pth"), "--scores",
                               os.path.join(out, "scores.pt"), "--keep-rate", rate, "--out", str(tmp_path / "o.pth")])
    assert "keep-rate" in line or "keep rate" in line
    assert _files(tmp_path) == []


def test_keep_plus_prune_over_one(demo, tmp_path, capsys):
    out, _ = demo
    _cli_error(capsys, ["compress", "--checkpoint", os.path.join(out, "dense.pth"), "--scores",
                        os.path.join(out, "scores.pt"), "--keep-rate", "0.95", "--prune-rate", "0.1",
                        "--out", str(tmp_path / "o.pth")])
    assert _files(tmp_path) == []


def test_empty_data_dir(demo, tmp_path, capsys):
    out, _ = demo
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    line = _cli_error(capsys, ["calibrate", "--checkpoint", os.path.join(out, "dense.pth"), "--data", str(empty),
                               "--out", str(tmp_path / "s.pt")])
    assert "no images" in line
    assert _files(tmp_path) == ["empty"]


def test_compressed_checkpoint_is_not_calibrated(demo, tmp_path, capsys):
    out, _ = demo
    line = _cli_error(capsys, ["calibrate", "--checkpoint", os.path.join(out, "pm_keep0.6.pth"), "--iters", "1",
                               "--out", str(tmp_path / "s.pt")])
    assert "dense model" in line and _files(tmp_path) == []
