"""pm_kernels.budget: MACs of a compressed model, and compress(..., target_gmacs=...) within 2 % of the budget."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from pm_kernels import compress
from pm_kernels.budget import budget_keep_rate, pm_macs

DEIT_T = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000)
DIGITS = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
              mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def one_thread():
    # on a shared CPU, extra OpenMP threads spin against other work (tens of times slower under load)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deit_t():
    torch.manual_seed(0)
    return VisionTransformer(**DEIT_T).eval()


def _traced_gmacs(model, img):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *img))
    return counter.get_total_flops() / 2e9


# Prefix tokens 0 (GAP), 5 (CLS + 4 registers) and EVA's rotary blocks, at the digits size.
GAP = dict(DIGITS, class_token=False, global_pool="avg")
REGISTERS = dict(DIGITS, reg_tokens=4)
EVA = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=3, num_heads=4,
           use_rot_pos_emb=True, ref_feat_shape=(8, 8))


def _model(cfg, deit_t):
    if cfg is DEIT_T:
        return deit_t
    if cfg is EVA:
        from timm.models.eva import Eva
        return Eva(**cfg).eval()
    return VisionTransformer(**cfg).eval()


@pytest.mark.parametrize("cfg,keep", [(DIGITS, 0.4), (DIGITS, 0.8), (DEIT_T, 0.6), (GAP, 0.5), (REGISTERS, 0.5),
                                      (EVA, 0.5)], ids=["digits-0.4", "digits-0.8", "deit_t", "gap", "registers",
                                                        "eva"])
def test_pm_macs_match_the_traced_count(cfg, keep, deit_t):
    torch.manual_seed(1)
    model = _model(cfg, deit_t)
    scores = torch.rand(len(model.blocks), model.patch_embed.num_patches) + 1e-3
    if cfg is not DEIT_T:  # layer 0 flat, the others peaked: layer 0 keeps every patch, an identity block
        scores[0], scores[1:, :4] = 1.0, 1e3
    pm = compress(copy.deepcopy(model), scores, keep_rate=keep, prune_rate=0.0 if cfg is not DEIT_T else 0.1)
    assert pm.blocks[0].is_identity == (cfg is not DEIT_T)
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    kept = [blk.num_kept(n) for blk in pm.blocks]
    assert kept[-1] < n
    img = (cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
    assert pm_macs(pm, kept) / 1e9 == pytest.approx(_traced_gmacs(pm, img), rel=1e-9)
    assert pm_macs(model, kept) == pm_macs(pm, kept)      # patched or not: the same count


def test_compress_to_a_budget_with_registers():
    """The budget search uses the model's prefix tokens: K counts the 5 of CLS + 4 registers."""
    torch.manual_seed(3)
    model = VisionTransformer(**REGISTERS).eval()
    scores = torch.rand(4, 64) + 1e-3
    dense = _traced_gmacs(model, (1, 32, 32))
    pm = compress(copy.deepcopy(model), scores, target_gmacs=0.7 * dense)
    assert abs(_traced_gmacs(pm, (1, 32, 32)) - 0.7 * dense) / (0.7 * dense) < 0.03


@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.75, 0.9])
def test_compress_to_a_budget_within_2_percent(deit_t, fraction):
    torch.manual_seed(2)
    scores = torch.rand(12, 196) ** 3 + 1e-4
    dense_gmacs = _traced_gmacs(deit_t, (3, 224, 224))
    target = fraction * dense_gmacs
    res = budget_keep_rate(scores, deit_t, target)
    assert abs(res.relative_error) < 0.02
    pm = compress(copy.deepcopy(deit_t), scores, target_gmacs=target)
    assert abs(_traced_gmacs(pm, (3, 224, 224)) - target) / target < 0.02
    assert [blk.M.shape[0] for blk in pm.blocks] == res.kept
    plain = compress(copy.deepcopy(deit_t), scores, **res.compress_kwargs())
    assert all(torch.equal(a.M, b.M) for a, b in zip(pm.blocks, plain.blocks))


def test_budget_is_the_nearest_step(deit_t):
    torch.manual_seed(3)
    scores = torch.rand(12, 196) + 1e-3
    target = 0.7
    res = budget_keep_rate(scores, deit_t, target)
    step = 1 / 196
    for keep in (res.keep_rate - step, res.keep_rate + step):    # the neighbouring keep rates are no closer
        other = compress(copy.deepcopy(deit_t), scores, keep_rate=keep)
        g = pm_macs(other, [b.M.shape[0] for b in other.blocks]) / 1e9
        assert abs(g - target) >= abs(res.gmacs - target)


def test_custom_cost_function():
    scores = torch.rand(4, 64) + 1e-3
    tokens = lambda st: float(sum(s.keep for s in st))        # noqa: E731  (a "latency" model: tokens attended)
    res = budget_keep_rate(scores, tokens, 4 * 33)
    assert res.gmacs == pytest.approx(4 * 33, abs=4)
    assert res.keep_rate == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("target", [0.0, -1.0, float("nan"), True, "0.5"])
def test_bad_budget(target, deit_t):
    with pytest.raises(ValueError, match="target_gmacs"):
        budget_keep_rate(torch.rand(12, 196), deit_t, target)


def test_unreachable_budget_names_the_range(deit_t):
    scores = torch.rand(12, 196) + 1e-3
    with pytest.raises(ValueError, match=r"target_gmacs: .* outside .* GMACs"):
        compress(copy.deepcopy(deit_t), scores, target_gmacs=0.01)
    with pytest.raises(ValueError, match="target_gmacs"):
        compress(copy.deepcopy(deit_t), scores, target_gmacs=5.0)     # above the dense model


def test_bad_cost_argument():
    with pytest.raises(TypeError, match="model_or_macs"):
        budget_keep_rate(torch.rand(4, 64), 3, 0.5)
    with pytest.raises(ValueError, match="kept"):
        pm_macs(VisionTransformer(**DIGITS), [10, 10])


def test_compress_a_segmenter_to_a_budget_per_layer():
    """A Segmenter's budget is its backbone's MACs; the per-layer search (SPEC §8) with a list of layers walks its
    own staircase: the backbone lands within 3 % of the budget and the other layers stay dense."""
    from pm_kernels import Segmenter
    torch.manual_seed(4)
    backbone = VisionTransformer(**dict(DIGITS, num_classes=0))
    seg = Segmenter(backbone, 11, "linear").eval()
    scores = torch.rand(4, 64) + 1e-3
    dense = _traced_gmacs(backbone, (1, 32, 32))
    res = budget_keep_rate(scores, backbone, 0.8 * dense, thresholds="per_layer", layers=[1, 2, 3])
    assert res.prune_rate == 0.0 and res.compress_kwargs()["layers"] == [1, 2, 3]
    compress(seg, scores, target_gmacs=0.8 * dense, thresholds="per_layer", layers=[1, 2, 3])
    assert seg.backbone.blocks[0].is_identity and not seg.backbone.blocks[1].is_identity
    assert abs(_traced_gmacs(seg.backbone, (1, 32, 32)) - 0.8 * dense) / (0.8 * dense) < 0.03
