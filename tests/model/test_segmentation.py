"""pm_kernels.Segmenter (Strudel et al. 2021) and PM on dense prediction (SPEC §8), against formulas written here."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels import Segmenter, pixel_cross_entropy, pixel_distillation, sliding_window
from pm_kernels.segmenter import OptimizedSegmenter


def vit(prefix="cls", **kw):
    base = dict(img_size=32, patch_size=8, in_chans=3, num_classes=7, embed_dim=32, depth=3, num_heads=1)
    base.update(kw)
    if prefix == "distilled":
        return VisionTransformerDistilled(**base)
    if prefix == "gap":
        return VisionTransformer(class_token=False, global_pool="avg", **base)
    if prefix == "reg":
        return VisionTransformer(reg_tokens=2, **base)
    if prefix == "eva":
        return Eva(**{k: v for k, v in base.items()}, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    return VisionTransformer(**base)


def seg_model(decoder="mask", prefix="cls", classes=5, **kw):
    torch.manual_seed(0)
    return Segmenter(vit(prefix, **kw), classes, decoder, dropout=0.0).eval()


@pytest.mark.parametrize("prefix", ["cls", "distilled", "gap", "reg", "eva"])
@pytest.mark.parametrize("decoder", ["mask", "linear"])
def test_logits_shape_and_prefix_tokens_dropped(prefix, decoder):
    seg = seg_model(decoder, prefix)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    seg.decoder.register_forward_pre_hook(lambda _m, args: seen.update(tokens=args[0]))
    with torch.no_grad():
        out = seg(x)
        tokens = seg.backbone.forward_features(x)
        if prefix in ("gap", "eva"):  # timm puts these models' final LayerNorm in the head (fc_norm): applied
            assert isinstance(seg.backbone.norm, torch.nn.Identity)  # before decoding
            tokens = seg.backbone.fc_norm(tokens)
        else:
            assert isinstance(getattr(seg.backbone, "fc_norm", torch.nn.Identity()), torch.nn.Identity)
    assert out.shape == (2, 5, 32, 32)
    P = seg.backbone.num_prefix_tokens
    torch.testing.assert_close(seen["tokens"], tokens[:, P:])  # exactly the 16 patch tokens
    assert seen["tokens"].shape[1] == 16
    assert seg.backbone.head.__class__.__name__ == "Identity", "the classifier head is removed"


def test_mask_decoder_matches_the_paper_formula():
    seg = seg_model("mask")
    dec = seg.decoder
    tokens = torch.randn(2, 16, 32)
    with torch.no_grad():
        got = dec(tokens, (4, 4))
        x = torch.cat([dec.proj_in(tokens), dec.class_embed.expand(2, -1, -1)], 1)
        for blk in dec.blocks:  # a pre-norm transformer layer, written out
            x = x + blk.attn(blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
        x = dec.norm(x)
        p = x[:, :16] @ dec.proj_patch
        c = x[:, 16:] @ dec.proj_classes
        p = p / p.norm(dim=-1, keepdim=True)
        c = c / c.norm(dim=-1, keepdim=True)
        masks = torch.einsum("bnd,bkd->bnk", p, c)
        mu, var = masks.mean(-1, keepdim=True), masks.var(-1, unbiased=False, keepdim=True)
        masks = (masks - mu) / torch.sqrt(var + dec.mask_norm.eps) * dec.mask_norm.weight + dec.mask_norm.bias
        want = masks.transpose(1, 2).reshape(2, 5, 4, 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_decoder_upsampled_bilinearly_and_padding_cropped():
    seg = seg_model("linear", dynamic_img_size=True)
    x = torch.randn(1, 3, 27, 35)  # not multiples of the patch: padded to 32 x 40, cropped back
    with torch.no_grad():
        out = seg(x)
        padded = F.pad(x, (0, 5, 0, 5))
        tok = seg.backbone.forward_features(padded)[:, 1:]
        patch_logits = seg.decoder.head(tok).transpose(1, 2).reshape(1, 5, 4, 5)
        want = F.interpolate(patch_logits, size=(32, 40), mode="bilinear", align_corners=False)[:, :, :27, :35]
    assert out.shape == (1, 5, 27, 35)
    torch.testing.assert_close(out, want)


def test_backbone_that_drops_tokens_is_refused():
    seg = seg_model("linear")
    full = seg.backbone.forward_features
    seg.backbone.forward_features = lambda x: full(x)[:, :9]  # a reducer without unmerge
    with pytest.raises(ValueError, match="backbone: expected 16 patch tokens"):
        seg(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(backbone=torch.nn.Linear(3, 3), num_classes=3), TypeError, "backbone"),
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=3, decoder="fcn"), ValueError, "decoder"),
    (dict(num_classes=3, decoder_depth=0), ValueError, "decoder_depth"),
    (dict(num_classes=3, ignore_index="255"), TypeError, "ignore_index"),
])
def test_bad_arguments(kwargs, err, match):
    kwargs.setdefault("backbone", vit())
    with pytest.raises(err, match=match):
        Segmenter(**kwargs)
    with pytest.raises(ValueError, match="images"):
        seg_model()(torch.randn(3, 32, 32))


def test_pixel_losses():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    targets = torch.randint(0, 4, (2, 5, 6), generator=g)
    targets[0, :2] = 255
    labelled = targets != 255
    logp = logits.double().log_softmax(1)
    want = -(logp.gather(1, targets.clamp(max=3)[:, None])[:, 0][labelled]).mean()
    torch.testing.assert_close(pixel_cross_entropy(logits, targets).double(), want, rtol=1e-6, atol=1e-7)
    assert pixel_cross_entropy(logits, torch.full_like(targets, 255)).item() == 0.0  # not NaN
    T = 3.0
    pt, ps = (teacher.double() / T).softmax(1), (logits.double() / T).log_softmax(1)
    kl = (pt * (pt.log() - ps)).sum() * T * T / logits.numel()
    torch.testing.assert_close(pixel_distillation(logits, teacher, T).double(), kl, rtol=1e-6, atol=1e-8)
    from pm_kernels.pipeline.finetune import DistillationLoss
    loss = DistillationLoss(pixel_cross_entropy, alpha=1.0, tau=T)  # the training loop's term, per pixel
    torch.testing.assert_close(loss.distill(logits, teacher), pixel_distillation(logits, teacher, T))
    with pytest.raises(ValueError, match="targets"):
        pixel_cross_entropy(logits, targets.float())
    with pytest.raises(ValueError, match="teacher_logits"):
        pixel_distillation(logits, teacher[:, :3])
    with pytest.raises(ValueError, match="tau"):
        pixel_distillation(logits, teacher, 0)


def _hooked_segmenter_scores(seg, batches, ignore=255):
    """SPEC §3 on an unpatched copy: eager attention, A ⊙ dA per key, per-pixel CE over the labelled pixels."""
    probs, hooks = [], []

    def keep(_module, inputs, _out):
        inputs[0].retain_grad()
        probs.append(inputs[0])

    for blk in seg.backbone.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(keep))
    P = seg.backbone.num_prefix_tokens
    scores = torch.zeros(len(seg.backbone.blocks), seg.backbone.patch_embed.num_patches, dtype=torch.float64)
    for images, targets in batches:
        probs.clear()
        logits = seg(images)
        keep = targets != ignore
        nll = -logits.log_softmax(1).gather(1, targets.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
        nll[keep].sum().div(keep.sum()).backward()
        for layer, A in enumerate(probs):
            b, h, n, _ = A.shape
            scores[layer] += ((A * A.grad).sum(dim=(0, 1, 2)) / (b * h * n))[P:].abs().double()
    for hook in hooks:
        hook.remove()
    return scores.float()


def test_calibrate_a_segmenter_equals_the_hook_formula_with_ignored_pixels():
    seg = seg_model("mask", depth=2)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        t = torch.randint(0, 5, (2, 32, 32), generator=g)
        t[:, :10] = 255
        batches.append((torch.randn(2, 3, 32, 32, generator=g), t))
    expected = _hooked_segmenter_scores(copy.deepcopy(seg), batches)
    scores = pm_kernels.calibrate(seg, batches)  # patches the backbone (unpatched here)
    assert pm_kernels.is_patched(seg.backbone) and scores.shape == (2, 16)
    assert expected.abs().min() > 0
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-9)


def _by_hand_per_layer(scores, keep, prune):
    out = []
    for row in scores.double():
        asc = row.sort().values
        tau_p = asc[int(len(row) * prune)]
        n_keep = int(len(row) * keep)
        tau_k = asc[len(row) - n_keep]
        pruned = row < tau_p
        out.append((pruned, (row >= tau_k) & ~pruned))
    return out


def test_per_layer_structure_search():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 30, generator=g) * torch.tensor([[1.0], [10.0], [0.1], [3.0]])  # scales differ
    for keep, prune in ((0.8, 0.0), (0.5, 0.2)):
        st = pm_kernels.search_structure(scores, keep_rate=keep, prune_rate=prune, thresholds="per_layer")
        for layer, (pruned, centres) in zip(st, _by_hand_per_layer(scores, keep, prune)):
            assert torch.equal(layer.pruned, pruned) and torch.equal(layer.centres, centres)
            assert int(layer.centres.sum()) == int(30 * keep) and int(layer.pruned.sum()) == int(30 * prune)
    default = pm_kernels.search_structure(scores, keep_rate=0.7, thresholds="per_layer")
    assert all(int(s.pruned.sum()) == 0 for s in default), "per-layer: prune_rate defaults to 0 (SPEC §8)"
    global_default = pm_kernels.search_structure(scores, keep_rate=0.7)
    assert sum(int(s.pruned.sum()) for s in global_default) == int(30 * 0.1) * 4, "global: 0.1 (SPEC §4)"
    discounted = pm_kernels.search_structure(scores, keep_rate=0.7, thresholds="per_layer", depth_discount=0.3)
    assert all(torch.equal(a.centres, b.centres) for a, b in zip(default, discounted))
    subset = pm_kernels.search_structure(scores, keep_rate=0.5, thresholds="per_layer", layers=[1, 3])
    assert [int(s.centres.sum()) for s in subset] == [30, 15, 30, 15]
    for bad, err in (([4], ValueError), ([1, 1], ValueError), ([], ValueError), ("1", TypeError)):
        with pytest.raises(err, match="layers"):
            pm_kernels.search_structure(scores, thresholds="per_layer", layers=bad)
    with pytest.raises(ValueError, match="thresholds"):
        pm_kernels.search_structure(scores, thresholds="perlayer")


def test_compress_and_optimize_a_segmenter():
    seg = seg_model("mask", depth=4)
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(3)) + 0.1
    assert pm_kernels.compress(seg, scores, keep_rate=0.5, thresholds="per_layer", layers=[1, 2]) is seg
    ks = [b.num_kept(17) for b in seg.backbone.blocks]
    assert ks == [17, 9, 9, 17]
    assert seg.backbone.blocks[0].M is None and seg.backbone.blocks[3].M is None, "uncompressed layers stay dense"
    x = torch.randn(2, 3, 32, 32)
    fast = pm_kernels.optimize(seg)
    assert isinstance(fast, OptimizedSegmenter) and fast.backbone is seg.backbone
    with torch.no_grad():
        torch.testing.assert_close(fast(x), seg(x), rtol=1e-4, atol=1e-5)
        assert fast.features.forward_features(x).shape == (2, 17, 32)  # every token at the exit


def test_sliding_window():
    seg = seg_model("linear")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(seg, x), seg(x))
        big = torch.randn(1, 3, 40, 56)
        got = sliding_window(seg, big, stride=(8, 24), batch_size=3)
        total, count = torch.zeros(1, 5, 40, 56), torch.zeros(1, 1, 40, 56)
        for y in (0, 8):  # starts 0, 8 (last ends at the border)
            for x0 in (0, 24):
                total[..., y:y + 32, x0:x0 + 32] += seg(big[..., y:y + 32, x0:x0 + 32])
                count[..., y:y + 32, x0:x0 + 32] += 1
        torch.testing.assert_close(got, total / count)
        small = torch.randn(1, 3, 20, 30)  # smaller than the window: padded, cropped back
        want = seg(F.pad(small, (0, 2, 0, 12)))[..., :20, :30]
        torch.testing.assert_close(sliding_window(seg, small), want)
    with pytest.raises(ValueError, match="stride"):
        sliding_window(seg, x, stride=40)
    with pytest.raises(ValueError, match="window_size"):
        sliding_window(seg, x, window_size=0)


def test_segmenter_forward_exports():
    seg = seg_model("mask")
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(seg, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), seg(x))
