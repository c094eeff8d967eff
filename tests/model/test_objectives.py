"""Calibration objectives (pm_kernels.objectives, issue 25): image-only batches on head-less models give usable
scores, each objective's loss is the documented one (its scores equal those of a loss written out here), and
bad input is one clear error naming the argument."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import pm_kernels
from pm_kernels import Segmenter, calibrate
from pm_kernels.objectives import (DEFAULT_UNLABELLED, OBJECTIVES, FeatureNorm, ImageText, KMeansTargets,
                                   Objective, PseudoLabels, SelfDistillation, model_view, resolve_objective)


def tiny_vit(num_classes=0, img_size=16, **kw):
    torch.manual_seed(0)
    return pm_kernels.patch_timm(VisionTransformer(img_size=img_size, patch_size=4, embed_dim=32, depth=2,
                                                   num_heads=2, num_classes=num_classes, **kw)).eval()


def registers_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=32,
                              num_heads=2, num_classes=0)
    return pm_kernels.patch_timm(model).eval()


def segmenter(classes=4):
    torch.manual_seed(0)
    return Segmenter(VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), classes,
                     dropout=0.0).eval()


def image_batches(n=3, batch=8, size=16, chans=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, chans, size, size, generator=g) for _ in range(n)]


def score(model, batches, objective=None, loss_fn=None):
    return calibrate(model, batches, loss_fn=loss_fn, objective=objective)


def num_patches(model):
    return (model.backbone if isinstance(model, Segmenter) else model).patch_embed.num_patches


# ------------------------------------------------------------------------------ image-only batches, any model

MODELS = {"headless_vit": (tiny_vit, 16), "registers_dinov2": (registers_vit, 28),
          "segmenter_backbone": (lambda: pm_kernels.patch_timm(segmenter().backbone), 16), "segmenter": (segmenter, 16)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form", ["tensor", "1-tuple"])
def test_image_only_batches_give_finite_float32_scores(name, form):
    build, size = MODELS[name]
    model = build()
    images = image_batches(size=size, n=2, batch=16)
    batches = images if form == "tensor" else [(x,) for x in images]
    scores = score(model, iter(batches))  # a one-pass iterator: read once, the first batches fit the objective
    blocks = len((model.backbone if isinstance(model, Segmenter) else model).blocks)
    assert scores.dtype == torch.float32 and scores.shape == (blocks, num_patches(model))
    assert torch.isfinite(scores).all()
    assert (scores.sum(dim=1) > 0).all(), "a label-free objective must give a non-zero gradient in every layer"
    assert all(block.attn.score_accumulator is None for block in
               (model.backbone if isinstance(model, Segmenter) else model).blocks), "calibrate left its hooks"


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"labels"}))
def test_every_label_free_objective_scores_a_headless_vit_or_says_why_not(name):
    model = tiny_vit()
    if name == "pseudo_labels":
        with pytest.raises(ValueError, match="objective: 'pseudo_labels' needs a model with a classifier head"):
            score(model, image_batches(), name)
        return
    scores = score(model, image_batches(n=2, batch=16), name)
    assert torch.isfinite(scores).all() and (scores.sum(dim=1) > 0).all()


def test_default_objective_follows_the_batches():
    model = tiny_vit(num_classes=5)
    labelled = [(x, torch.randint(5, (len(x),))) for x in image_batches()]
    objective, _ = resolve_objective(model, labelled)
    assert objective.name == "labels"
    assert torch.equal(score(model, labelled), calibrate(model, labelled))  # today's default loss, unchanged
    objective, _ = resolve_objective(model, image_batches())
    assert objective.name == DEFAULT_UNLABELLED["head"] == "pseudo_labels"
    objective, _ = resolve_objective(segmenter(), image_batches())
    assert objective.name == "pseudo_labels"  # a Segmenter's decoder is a head: per-pixel pseudo-labels
    for headless in (tiny_vit(), registers_vit(), pm_kernels.patch_timm(segmenter().backbone)):
        size = 28 if headless.patch_embed.patch_size[0] == 14 else 16
        objective, _ = resolve_objective(headless, image_batches(size=size, n=2, batch=16))
        assert objective.name == DEFAULT_UNLABELLED["headless"] == "kmeans" and objective.level == "pooled"


def test_segmenter_labels_are_the_per_pixel_cross_entropy_of_calibrate():
    seg = segmenter()
    labelled = [(x, torch.randint(4, (len(x), 16, 16))) for x in image_batches()]
    labelled[0][1][:, :4] = seg.ignore_index
    assert torch.equal(score(seg, labelled, "labels"), calibrate(seg, labelled))


# ------------------------------------------------------------------ each loss against one written out here

def hand_scores(model, pairs, loss_fn):
    return calibrate(model, pairs, loss_fn=loss_fn)


def test_pseudo_labels_are_the_cross_entropy_to_the_dense_argmax():
    for model, shape in ((tiny_vit(num_classes=5), None), (segmenter(), "pixels")):
        images = image_batches()
        with torch.no_grad():
            pairs = [(x, model(x).argmax(dim=1)) for x in images]
        want = hand_scores(model, pairs, lambda out, t: F.cross_entropy(out, t))
        torch.testing.assert_close(score(model, images, PseudoLabels()), want, rtol=1e-5, atol=0)
        assert pairs[0][1].dim() == (3 if shape else 1)


@pytest.mark.parametrize("level", ["pooled", "tokens"])
def test_kmeans_is_the_cross_entropy_to_the_nearest_centroid(level):
    model, tau = tiny_vit(), 0.2
    images = image_batches(n=3, batch=8)
    objective = KMeansTargets(clusters=3, level=level, temperature=tau, fit_images=16)
    got = score(model, images, objective)

    def features(x):  # the head-less model's pooled embedding, or its final patch tokens
        tokens = model.forward_features(x)
        return model.forward_head(tokens) if level == "pooled" else tokens[:, model.num_prefix_tokens:]

    C = objective.centroids
    with torch.no_grad():  # fitted on the first 16 images: a fixed point of spherical k-means
        f = F.normalize(features(torch.cat(images[:2])).reshape(-1, 32), dim=1)
        assign = (f @ C.T).argmax(dim=1)
        assert len(C) == 3 and len(assign.unique()) == 3
        torch.testing.assert_close(F.normalize(torch.zeros(3, 32).index_add_(0, assign, f), dim=1), C)
        pairs = [(x, (F.normalize(features(x).reshape(-1, 32), dim=1) @ C.T).argmax(dim=1)) for x in images]
    model.forward = features  # calibrate scores model(x): here, the level's features
    try:
        want = hand_scores(model, pairs, lambda out, t: F.cross_entropy(
            F.normalize(out.reshape(-1, 32), dim=1) @ C.T / tau, t))
    finally:
        del model.forward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("perturbation", ["mask", "noise"])
def test_self_distillation_is_one_minus_cosine_to_the_clean_dense_features(perturbation):
    model = tiny_vit()
    images = image_batches()
    got = score(model, images, SelfDistillation(perturbation, mask_ratio=0.25, noise_std=0.3, seed=7))
    twin, view = SelfDistillation(perturbation, mask_ratio=0.25, noise_std=0.3, seed=7), model_view(model)
    views = [twin.inputs(view, x) for x in images]  # the same random views, drawn in the same order
    if perturbation == "mask":  # 4 of the 16 patches of each image zeroed, the others untouched
        patches = lambda x: x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(len(x), 3, 16, 16)  # noqa: E731
        zeroed = (patches(views[0]) == 0).all(dim=(1, 3))
        assert (zeroed.sum(dim=1) == 4).all()
        assert torch.equal(patches(views[0]).masked_fill(zeroed[:, None, :, None], 0),
                           patches(images[0]).masked_fill(zeroed[:, None, :, None], 0))
    else:
        assert 0.2 < (views[0] - images[0]).std() / images[0].std() < 0.4
    with torch.no_grad():
        pairs = [(v, model(x)) for v, x in zip(views, images)]
    want = hand_scores(model, pairs, lambda out, t: (1 - (F.normalize(out, dim=1) * F.normalize(t, dim=1)).sum(1))
                       .mean())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_feature_norm_is_half_the_mean_squared_norm():
    model = tiny_vit()
    images = image_batches()
    want = hand_scores(model, [(x, None) for x in images], lambda out, t: 0.5 * (out ** 2).sum(dim=1).mean())
    torch.testing.assert_close(score(model, images, FeatureNorm("pooled")), want, rtol=1e-5, atol=0)


class CharText(torch.nn.Module):
    """A tiny random text tower: mean of per-character embeddings."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.EmbeddingBag(128, dim, mode="mean")

    def forward(self, captions):
        codes = [torch.tensor([ord(c) % 128 for c in s]) for s in captions]
        offsets = torch.tensor([0] + [len(c) for c in codes[:-1]]).cumsum(0)
        return self.embed(torch.cat(codes), offsets)


CAPTIONS = ["a zero", "a one", "two", "three!", "four", "five five", "six", "seven"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_text_with_captions_is_the_clip_or_siglip_loss(kind):
    model, text = tiny_vit(), CharText()
    project = torch.nn.Linear(32, 8)
    images = image_batches()
    objective = ImageText(text, loss=kind, logit_scale=10.0, logit_bias=-2.0, project=project)
    got = score(model, [(x, CAPTIONS) for x in images], objective)
    assert all(p.grad is None for p in text.parameters()), "the text tower stays dense: no gradient"

    def hand(out, t):
        img = F.normalize(project(out), dim=1)
        txt = F.normalize(text(CAPTIONS), dim=1).detach()
        logits = 10.0 * img @ txt.T
        match = torch.arange(len(CAPTIONS))
        if kind == "clip":
            return (F.cross_entropy(logits, match) + F.cross_entropy(logits.T, match)) / 2
        z = 2 * torch.eye(len(CAPTIONS)) - 1
        return -F.logsigmoid(z * (logits - 2.0)).sum(dim=1).mean()

    torch.testing.assert_close(got, hand_scores(model, [(x, None) for x in images], hand), rtol=1e-5, atol=0)


def test_image_text_with_prompts_takes_images_alone_and_targets_the_nearest_prompt():
    model, text, prompts = tiny_vit(), CharText(), ["a zero", "a one", "a two"]
    project = torch.nn.Linear(32, 8)
    images = image_batches()
    got = score(model, images, ImageText(text, prompts=prompts, project=project))
    txt = F.normalize(text(prompts), dim=1).detach()
    with torch.no_grad():
        pairs = [(x, (F.normalize(project(model(x)), dim=1) @ txt.T).argmax(dim=1)) for x in images]
    want = hand_scores(model, pairs, lambda out, t: F.cross_entropy(100.0 * F.normalize(project(out), dim=1) @ txt.T,
                                                                    t))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_a_custom_loss_fn_overrides_and_sees_targets_or_none():
    model = tiny_vit()
    seen = []
    score(model, image_batches(n=2), loss_fn=lambda out, t: seen.append(t) or out.pow(2).mean())
    assert seen == [None, None]


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("batches, objective, error, message", [
    ([], None, ValueError, "batches: expected at least one batch of images, got none"),
    (image_batches(size=20), None, ValueError, "batches: batch 0: images of size 20x20, the model takes 16x16"),
    (image_batches(chans=1), None, ValueError, "batches: batch 0: images have 1 channels, the model takes 3"),
    ([(x, torch.zeros(8, dtype=torch.long)) for x in image_batches()], "kmeans", ValueError,
     "batches: batch 0 carries targets, but objective 'kmeans' takes images alone"),
    ([(x, torch.zeros(8, dtype=torch.long)) for x in image_batches()], "self_distillation", ValueError,
     "batches: batch 0 carries targets, but objective 'self_distillation' takes images alone"),
    (image_batches(), "labels", ValueError,
     r"objective: 'labels' \(the default .*\) needs a model with a classifier head"),
    (image_batches(), "kmean", ValueError, "objective: expected one of 'labels', 'pseudo_labels', 'kmeans'"),
    (image_batches(), 3, TypeError, "objective: expected a name or a pm_kernels.objectives.Objective"),
    ([(x, x, x) for x in image_batches()], None, TypeError, "batches: batch 0: expected images .* got a 3-tuple"),
    ([torch.zeros(0, 3, 16, 16)], None, ValueError, "batches: batch 0: expected a non-empty float image tensor"),
    (image_batches(n=1, batch=4), KMeansTargets(clusters=8), ValueError,
     "batches: k-means with clusters=8 needs at least 8 feature vectors"),
    (5, None, TypeError, "batches: expected an iterable"),
])
def test_bad_input_is_one_clear_error(batches, objective, error, message):
    with pytest.raises(error, match=message):
        resolve_objective(tiny_vit(), batches, objective)  # before any scoring: the first batch is checked here


def test_targets_in_a_later_batch_or_missing_for_labels_are_refused():
    model = tiny_vit(num_classes=5)
    mixed = image_batches() + [(image_batches(n=1)[0], torch.zeros(8, dtype=torch.long))]
    with pytest.raises(ValueError, match="batches: batch 3 carries targets, but objective 'feature_norm'"):
        score(model, mixed, "feature_norm")
    labelled = [(x, torch.zeros(8, dtype=torch.long)) for x in image_batches()] + image_batches(n=1)
    with pytest.raises(ValueError, match="batches: batch 3 is images alone, but objective 'labels' needs"):
        score(model, labelled)


def test_image_size_may_not_change_between_batches_of_a_dynamic_model():
    model = tiny_vit(dynamic_img_size=True)
    with pytest.raises(ValueError, match="batches: batch 1: every batch must have the same image size"):
        score(model, image_batches(n=1) + image_batches(n=1, size=20), "feature_norm")


@pytest.mark.parametrize("build, message", [
    (lambda: KMeansTargets(level="cls"), "level: expected one of 'pooled', 'tokens'"),
    (lambda: KMeansTargets(clusters=0), "clusters: expected an int >= 1"),
    (lambda: KMeansTargets(temperature=0), "temperature: expected a number > 0"),
    (lambda: SelfDistillation("blur"), "perturbation: expected one of 'mask', 'noise'"),
    (lambda: SelfDistillation(mask_ratio=1.0), r"mask_ratio: expected a number in \(0, 1\)"),
    (lambda: ImageText(CharText(), loss="triplet"), "loss: expected one of 'clip', 'siglip'"),
    (lambda: ImageText(CharText(), prompts="a dog"), "prompts: expected a non-empty list of strings"),
    (lambda: ImageText("not callable"), "encode_text: expected a callable"),
])
def test_bad_objective_arguments_name_the_argument(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_image_text_batches_are_checked():
    model = tiny_vit()
    objective = ImageText(CharText(), project=torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"batches: captions: expected one caption per image \(8\), got 3"):
        score(model, [(x, CAPTIONS[:3]) for x in image_batches()], objective)
    with pytest.raises(ValueError, match="batches: batch 0 is images alone, but objective 'image_text' needs"):
        score(model, image_batches(), objective)
    with pytest.raises(ValueError, match="batches: the in-batch image–text loss needs at least 2 images"):
        score(model, [(x[:1], CAPTIONS[:1]) for x in image_batches()], objective)
    with pytest.raises(ValueError, match="encode_text: text features of width 8, image features of width 32"):
        score(model, [(x, CAPTIONS) for x in image_batches()], ImageText(CharText()))


def test_not_a_vit_is_refused():
    with pytest.raises(TypeError, match="model: Linear is not a model of a library pm_kernels supports"):
        resolve_objective(torch.nn.Linear(3, 3), image_batches())


def test_calibrate_restores_the_model_on_error():
    model = tiny_vit().train()

    class Boom(Objective):
        def forward(self, model, inputs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, image_batches(), objective=Boom())
    assert model.training and all(block.attn.score_accumulator is None for block in model.blocks)
    before = calibrate(model, image_batches(), objective="feature_norm")  # hooks removed: scoring runs again
    assert torch.isfinite(before).all() and model.training
