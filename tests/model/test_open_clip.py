"""The open_clip host: a CLIP model (its native ``.visual``), a bare VisionTransformer (LayerScale, average pool)
and a CLIP whose tower is a ``TimmModel`` (the timm host on its trunk). Identity = dense (float64, 1e-9),
calibrate's score = Σ A ⊙ ∂L/∂A of an explicit-softmax forward, a compressed model = the SPEC §1 chain run with
the unpatched blocks, optimize = the PM model with the same call, gradients reach M and R; export parity; the
refusals. Tiny random-init towers (width 64, 3 layers, 32 px, patch 8), CPU."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

open_clip = pytest.importorskip("open_clip")
import timm  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from open_clip.timm_model import TimmModel  # noqa: E402
from open_clip.transformer import Transformer, VisionTransformer  # noqa: E402

import pm_kernels  # noqa: E402
from pm_kernels.budget import pm_macs  # noqa: E402
from pm_kernels.deploy import load_exported  # noqa: E402

VISION = dict(layers=3, width=64, head_width=16, patch_size=8, image_size=32)
TEXT = CLIPTextCfg(context_length=8, vocab_size=40, width=32, heads=2, layers=1)
N_PATCHES = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the CPU is shared


def _timm_clip():
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="token",
                                                        timm_proj="linear", image_size=32), text_cfg=TEXT)
    # the same timm class at the test's size (TimmModel builds the trunk at its registered 224 px)
    model.visual.trunk = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3,
                                           num_classes=0, global_pool="token")
    return model


BUILDERS = {
    "clip": lambda: CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**VISION), text_cfg=TEXT),
    "visual": lambda: CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**VISION, ls_init_value=0.5, pool_type="avg"),
                           text_cfg=TEXT, quick_gelu=True).visual,
    "timm": _timm_clip,
}


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name]().to(dtype).eval()


def data(dtype=torch.float64, batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def encode(model, images):
    return model.encode_image(images) if isinstance(model, CLIP) else model(images)


def loss_fn(embeddings, targets):
    return embeddings.sin().sum()


def blocks(model):
    visual = model.visual if isinstance(model, CLIP) else model
    return visual.trunk.blocks if isinstance(visual, TimmModel) else visual.transformer.resblocks


def compressed(name, dtype=torch.float64, seed=0):
    pm = build(name, dtype, seed)
    dense = copy.deepcopy(pm)
    g = torch.Generator().manual_seed(seed)
    pm_kernels.compress(pm, torch.rand(3, N_PATCHES, generator=g) + 0.1, keep_rate=0.5, prune_rate=0.1)
    with torch.no_grad():
        for blk in blocks(pm):
            if blk.M is not None:
                blk.M.add_(0.02 * torch.randn(blk.M.shape, generator=g, dtype=dtype))
                blk.R.add_(0.02 * torch.randn(blk.R.shape, generator=g, dtype=dtype))
    return pm, dense


class SpecBlock(nn.Module):
    """SPEC §1 around an unpatched block: x ← R·block(M·x) + (1 − m) ⊙ x."""

    def __init__(self, block, pm_block):
        super().__init__()
        self.block, self.M, self.R, self.keep = block, pm_block.M, pm_block.R, pm_block.keep_mask

    def forward(self, x, *args, **kwargs):
        if self.M is None:
            return self.block(x, *args, **kwargs)
        return self.R @ self.block(self.M @ x, *args, **kwargs) + (~self.keep).to(x.dtype)[:, None] * x


@pytest.mark.parametrize("name", list(BUILDERS))
def test_identity_equals_dense(name):
    dense = build(name)
    pm = pm_kernels.patch(copy.deepcopy(dense))
    assert pm_kernels.is_patched(pm) and all(blk.M is None and blk.keep_mask is None for blk in blocks(pm))
    images = data()
    with torch.no_grad():
        assert (encode(pm, images) - encode(dense, images)).abs().max() <= 1e-9


@pytest.mark.parametrize("name", list(BUILDERS))
def test_compressed_is_the_spec_chain_and_optimize_is_the_pm_model(name):
    pm, dense = compressed(name)
    reference = copy.deepcopy(dense)
    ref_blocks = blocks(reference)
    for i, pm_blk in enumerate(blocks(pm)):
        ref_blocks[i] = SpecBlock(ref_blocks[i], pm_blk)
    images = data()
    with torch.no_grad():
        out = encode(pm, images)
        assert (out - encode(reference, images)).abs().max() <= 1e-9
        fast = pm_kernels.optimize(pm)
        assert type(fast) is type(pm) and fast.pm_source is pm
        assert (encode(fast, images) - out).abs().max() <= 1e-9
        if isinstance(pm, CLIP):  # the whole call: images and text → (image, text features, scale)
            text = torch.randint(0, 40, (3, 8))
            got, want = fast(images, text), pm(images, text)
            assert len(got) == len(want) and all((a - b).abs().max() <= 1e-9 for a, b in zip(got, want))
    pm.train()
    loss_fn(encode(pm, images), None).backward()
    for blk in blocks(pm):
        if blk.M is not None:
            assert blk.M.grad.abs().sum() > 0 and blk.R.grad.abs().sum() > 0


def _explicit_softmax_scores(visual, images):
    """SPEC §3 on the dense native tower, with the attention probabilities formed explicitly."""
    x = visual._embeds(images)
    probs = []
    for blk in visual.transformer.resblocks:
        h = blk.ln_1(x)
        B, N, C = h.shape
        heads = blk.attn.num_heads
        q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).reshape(
            B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        A = torch.softmax(q @ k.transpose(-1, -2) * (C // heads) ** -0.5, dim=-1)
        probs.append(A)
        x = x + blk.ls_1(blk.attn.out_proj((A @ v).transpose(1, 2).reshape(B, N, C)))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    pooled, _ = visual._pool(x)
    out = pooled @ visual.proj
    assert (out - visual(images)).abs().max() <= 1e-9  # the explicit forward is the tower's
    grads = torch.autograd.grad(loss_fn(out, None), probs)
    return torch.stack([(A * dA).sum(dim=(0, 1, 2)) / (A.shape[0] * A.shape[1] * A.shape[2])
                        for A, dA in zip(probs, grads)])[:, 1:].abs()


@pytest.mark.parametrize("name", ["clip", "visual"])
def test_calibrate_equals_the_explicit_softmax_gradient(name):
    model = build(name)
    visual = model.visual if isinstance(model, CLIP) else model
    images = data()
    want = _explicit_softmax_scores(copy.deepcopy(visual), images)
    scores = pm_kernels.calibrate(model, [(images, None)], loss_fn)
    assert scores.shape == (3, N_PATCHES) and (scores.double() - want).abs().max() <= 1e-5 * want.max()


def test_a_timm_tower_is_calibrated_as_its_trunk():
    model = build("timm")
    images = data()
    head = model.visual.head
    via_clip = pm_kernels.calibrate(model, [(images, None)], loss_fn)
    via_trunk = pm_kernels.calibrate(model.visual.trunk, [(images, None)], lambda out, t: loss_fn(head(out), t))
    assert via_clip.abs().sum() > 0 and torch.equal(via_clip, via_trunk)
    assert pm_kernels.host_of(model).name == "open_clip" and pm_kernels.is_patched(model.visual.trunk)


def test_pm_macs_equal_the_traced_count():
    pm, _ = compressed("clip", dtype=torch.float32)
    kept = [blk.num_kept(1 + N_PATCHES) for blk in blocks(pm)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pm.encode_image(torch.zeros(1, 3, 32, 32))
    assert pm_macs(pm, kept) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_gradient_checkpointing_keeps_the_gradients():
    pm, _ = compressed("clip")
    checkpointed = copy.deepcopy(pm)
    checkpointed.set_grad_checkpointing(True)
    images = data()
    for model in (pm, checkpointed):
        model.train()
        loss_fn(model.encode_image(images), None).backward()
    for (name, p), q in zip(pm.named_parameters(), checkpointed.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or (p.grad - q.grad).abs().max() <= 1e-9)


@pytest.mark.parametrize("name, fmt", [("clip", "onnx"), ("visual", "pt2")])
def test_export_matches_pytorch(name, fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    pm, _ = compressed(name, dtype=torch.float32)
    run = load_exported(pm_kernels.export(pm, tmp_path / f"tower.{fmt}", format=fmt))
    images = data(torch.float32, batch=3)
    with torch.no_grad():
        assert (run(images) - encode(pm, images)).abs().max() <= 1e-4


def test_fused_block_runs_an_unpatched_block():
    pm, dense = compressed("visual")
    index = next(i for i, blk in enumerate(blocks(pm)) if blk.M is not None)
    blk = blocks(pm)[index]
    x = torch.randn(2, 1 + N_PATCHES, 64, dtype=torch.float64)
    want = SpecBlock(blocks(dense)[index], blk)(x)
    for block in (blocks(dense)[index], blk):
        got = pm_kernels.fused_block(x, block, blk.M.detach(), blk.R.detach(), blk.keep_mask)
        assert (got - want).abs().max() <= 1e-9


def test_segmenter_on_an_open_clip_tower():
    seg = pm_kernels.Segmenter(build("clip", torch.float32).visual, num_classes=3, decoder="linear").eval()
    pm_kernels.compress(seg, torch.rand(3, N_PATCHES) + 0.1, keep_rate=0.5)
    images = data(torch.float32)
    with torch.no_grad():
        want = seg(images)
        assert want.shape == (2, 3, 32, 32) and (pm_kernels.optimize(seg)(images) - want).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------ refusals

def _sequence_first():
    visual = build("clip").visual
    visual.transformer = Transformer(64, 3, 4, batch_first=False)
    return visual


@pytest.mark.parametrize("make, match", [
    (_sequence_first, r"VisionTransformer runs its transformer sequence-first \(batch_first=False\)"),
    (lambda: CLIP(16, CLIPVisionCfg(**VISION, qk_norm=True), TEXT),
     r"block 0 is a CustomResidualAttentionBlock \(qk_norm"),
    (lambda: VisionTransformer(32, 8, 64, 2, 4, 4.0, attentional_pool=True, output_dim=16, attn_pooler_heads=4),
     r"attentional pooling \(CoCa\)"),
    (lambda: CLIP(16, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=32), TEXT),
     r"CLIP's image tower is a ModifiedResNet, not a Vision Transformer"),
    (lambda: open_clip.CoCa(16, dict(width=32, heads=2, layers=1, context_length=8, vocab_size=40), TEXT,
                            CLIPVisionCfg(**VISION)),
     r"CoCa is not an open_clip model pm_kernels supports"),
])
def test_unsupported_towers_are_refused_by_name(make, match):
    with pytest.raises(TypeError, match=match):
        pm_kernels.patch(make())


def test_what_a_tower_cannot_do_is_refused():
    with pytest.raises(ValueError, match=r"objective: 'labels' \(the default for \(images, targets\) batches\) needs"):
        pm_kernels.calibrate(build("clip"), [(data(), torch.tensor([0, 1]))])
    scores = pm_kernels.calibrate(build("clip"), [data(batch=16)])  # images alone: k-means of the embedding
    assert torch.isfinite(scores).all() and (scores.sum(dim=1) > 0).all()
    dropping = CLIP(16, CLIPVisionCfg(**VISION, patch_dropout=0.5), TEXT)
    with pytest.raises(ValueError, match=r"patch dropout \(patch_dropout=0.5\)"):
        pm_kernels.compress(dropping, torch.rand(3, N_PATCHES) + 0.1)
    pm, _ = compressed("clip")
    with pytest.raises(ValueError, match=r"x: this compressed model is built for 32x32 images .* got 16x64"):
        pm.encode_image(torch.randn(1, 3, 16, 64, dtype=torch.float64))
