"""Every supported timm family (prefix tokens 0, 1, 2, 5; rotary EVA): identity = dense, compress = SPEC §1 on
an unpatched copy, optimize = compressed, gradients reach M and R; timm conventions (features, FX, TorchScript,
dynamic image size, pools) on PM models. CPU, random weights, reduced depth and image size."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import pm_kernels

# name → (P prefix tokens, patch size); depth 3 and a 6×6 patch grid keep each case well under a second.
FAMILIES = {
    "deit_tiny_patch16_224": (1, 16),
    "deit_tiny_distilled_patch16_224": (2, 16),
    "vit_small_patch14_reg4_dinov2": (5, 14),
    "vit_base_patch16_clip_224": (1, 16),
    "vit_medium_patch16_gap_256": (0, 16),
    "vit_little_patch16_reg1_gap_256": (1, 16),
    "eva02_tiny_patch14_224": (1, 14),
}
GRID = 6


def make(name, seed=0, **kwargs):
    """(pm model, unpatched timm copy with the same weights, images, targets)."""
    patch = FAMILIES[name][1]
    args = dict(depth=3, img_size=patch * GRID, num_classes=7, **kwargs)
    torch.manual_seed(seed)
    dense = timm.create_model(name, **args).eval()
    pm = timm.create_model("pm_" + name, **args).eval()
    pm.load_state_dict(dense.state_dict())
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, patch * GRID, patch * GRID, generator=g)
    return pm, dense, images, torch.randint(0, 7, (2,), generator=g)


def logits(out):
    return out[0] if isinstance(out, tuple) else out  # distilled DeiT in training returns (cls, dist)


def compressed(name, keep_rate=0.6, prune_rate=0.1, **kwargs):
    pm, dense, images, targets = make(name, **kwargs)
    loss = lambda out, t: F.cross_entropy(logits(out), t)  # noqa: E731
    scores = pm_kernels.calibrate(pm, [(images, targets)] * 2, loss)
    pm_kernels.compress(pm, scores, keep_rate=keep_rate, prune_rate=prune_rate)
    return pm, dense, images, scores


def spec_forward(dense, pm, images):
    """SPEC §1 on the unpatched timm model, block by block, with the PM model's M, R, keep_mask."""
    rope = None
    if hasattr(dense, "rope"):
        x, rope = dense._pos_embed(dense.patch_embed(images))
        x = dense.norm_pre(x)
    else:
        x = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(images))))
    for blk, pm_blk in zip(dense.blocks, pm.blocks):
        run = (lambda h, r: blk(h, rope=r)) if rope is not None else (lambda h, r: blk(h))
        if pm_blk.is_identity:
            x = run(x, rope)
            continue
        # merged tokens sit at their centre's rotary position (EVA); prefix tokens get none
        centre_rope = None if rope is None else rope[pm_blk.centre_index]
        z = torch.einsum("kn,bnc->bkc", pm_blk.M, x)
        x = torch.einsum("nk,bkc->bnc", pm_blk.R, run(z, centre_rope)) + (~pm_blk.keep_mask).float()[:, None] * x
    return dense.forward_head(dense.norm(x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_identity_equals_dense(name):
    pm, dense, images, _ = make(name)
    assert pm_kernels.is_patched(pm) and pm.num_prefix_tokens == FAMILIES[name][0]
    with torch.no_grad():
        assert (pm(images) - dense(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compress_matches_spec_and_optimize(name):
    pm, dense, images, scores = compressed(name)
    P, L, patches = pm.num_prefix_tokens, len(pm.blocks), GRID * GRID
    assert scores.shape == (L, patches) and scores.dtype == torch.float32
    # SPEC §4 thresholds: int(patches·rate)·L centres and pruned patches over all layers (random scores: no ties)
    centres = sum(b.num_kept(P + patches) - P for b in pm.blocks)
    assert centres == int(patches * 0.6) * L and sum(b.num_pruned for b in pm.blocks) == int(patches * 0.1) * L
    for blk in pm.blocks:  # prefix tokens are never pruned or merged
        assert torch.equal(blk.M[:P, :P], torch.eye(P)) and not blk.M[:P, P:].any() and not blk.M[P:, :P].any()
        assert bool(blk.keep_mask[:P].all())
    with torch.no_grad():
        out = pm(images)
        torch.testing.assert_close(out, spec_forward(dense, pm, images), rtol=1e-5, atol=1e-5)
        assert (pm_kernels.optimize(pm)(images) - out).abs().max() <= 1e-4
    pm.train()
    logits(pm(images)).logsumexp(-1).mean().backward()
    for blk in pm.blocks:
        assert blk.M.grad is not None and blk.M.grad.abs().sum() > 0
        assert blk.R.grad is not None and blk.R.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224"])
def test_optimized_compiles_fullgraph(name):
    pm, _, images, _ = compressed(name)
    fast = pm_kernels.optimize(pm)
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(images), pm(images), rtol=1e-5, atol=1e-5)


def test_distilled_deit_both_heads():
    pm, dense, images, _ = compressed("deit_tiny_distilled_patch16_224")
    pm.set_distilled_training(True)
    dense.set_distilled_training(True)
    pm.train(), dense.train()
    cls, dist = pm(images)
    assert cls.shape == dist.shape == (2, 7) and not torch.allclose(cls, dist)
    with torch.no_grad():
        pm.eval()
        torch.testing.assert_close(pm(images), (cls + dist) / 2, rtol=1e-5, atol=1e-5)


def test_eva_merged_tokens_take_their_centres_rotary_position():
    pm, dense, images, _ = compressed("eva02_tiny_patch14_224")
    P = pm.num_prefix_tokens
    for blk in pm.blocks:
        # the centre of each merged row carries weight 1 in M (the largest of its row)
        rows = torch.arange(P, blk.M.shape[0])
        assert torch.equal(blk.M.detach()[rows, P + blk.centre_index], torch.ones(len(rows)))
    shuffled = copy.deepcopy(pm)
    for blk in shuffled.blocks:
        blk.centre_index = blk.centre_index.flip(0)
    with torch.no_grad():  # the position matters: another assignment gives other features
        a, b = shuffled.forward_features(images), pm.forward_features(images)
        assert (a - b).norm() > 1e-3 * b.norm()


# ------------------------------------------------------------------------------------- image size

def test_dynamic_img_size():
    pm, dense, images, _ = make("deit_tiny_patch16_224", dynamic_img_size=True)
    other = torch.randn(1, 3, 16 * 4, 16 * 8)
    with torch.no_grad():  # the identity runs at any size
        torch.testing.assert_close(pm(other), dense(other), rtol=1e-5, atol=1e-5)
    target = torch.randint(0, 7, (1,))
    scores = pm_kernels.calibrate(pm, [(other, target)])
    assert scores.shape == (3, 4 * 8)
    pm_kernels.compress(pm, scores, keep_rate=0.5, img_size=(64, 128))
    assert pm.structure_grid() == (4, 8)
    with torch.no_grad():
        torch.testing.assert_close(pm(other), spec_forward(dense, pm, other), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pm_kernels.optimize(pm)(other), pm(other), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"x: this compressed model is built for 64x128 images .*got 96x96"):
        pm(images)
    with pytest.raises(ValueError, match="img_size"):
        pm_kernels.compress(pm, scores, img_size=(60, 128))


def test_fixed_size_model_refuses_another_grid():
    pm, _, _, _ = make("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="grid_size: this model takes"):
        pm_kernels.compress(pm, torch.rand(3, 32) + 0.1, img_size=(64, 128))


def test_384px_model():
    torch.manual_seed(0)
    pm = timm.create_model("pm_deit_tiny_patch16_224", img_size=384, depth=2, num_classes=3).eval()
    pm_kernels.compress(pm, torch.rand(2, 576) + 0.1)
    assert pm.blocks[0].M.shape[1] == 577
    with torch.no_grad():
        x = torch.randn(1, 3, 384, 384)
        assert (pm_kernels.optimize(pm)(x) - pm(x)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------- timm conventions

def test_features_only_and_out_indices():
    model = timm.create_model("pm_deit_tiny_patch16_224", features_only=True, depth=4, img_size=64)
    maps = model(torch.randn(1, 3, 64, 64))
    assert len(maps) == 3 and all(m.shape == (1, 192, 4, 4) for m in maps)
    one = timm.create_model("pm_deit_tiny_patch16_224", features_only=True, feature_cls="getter", out_indices=(-1,),
                            depth=4, img_size=64)
    assert len(one(torch.randn(1, 3, 64, 64))) == 1


def test_reset_classifier_after_optimize_is_followed():
    pm, _, images, _ = compressed("deit_tiny_patch16_224")
    fast = pm_kernels.optimize(pm)
    pm.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        out = fast(images)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, pm(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compress", [False, True])
def test_fx_trace(compress):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    from timm.models import get_notrace_functions, get_notrace_modules
    pm, _, images, _ = compressed("deit_tiny_patch16_224") if compress else make("deit_tiny_patch16_224")
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(pm, tracer_kwargs=kwargs)
    fx = create_feature_extractor(pm, return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx(images).values())), pm(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_torchscript(name):
    pm, _, images, _ = compressed(name)
    scripted = torch.jit.script(pm)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), pm(images), rtol=1e-5, atol=1e-5)
