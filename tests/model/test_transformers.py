"""The transformers host, per family (ViT, DeiT with teacher, CLIP vision tower with projection, the two-tower
CLIPModel, SigLIP without prefix token, DINOv2 with SwiGLU, DINOv2 with registers): identity = dense (float64,
1e-9), calibrate's score = Σ A ⊙ ∂L/∂A of the dense eager model's attentions, a compressed model = the SPEC §1
chain run with the unpatched layers, optimize = the PM model with the same call, gradients reach M and R, hidden
states; export parity; the refusals; state-dict and save_pretrained round trips. Tiny random-init configs (width
64, 3 layers, 32 px, patch 8), CPU."""
import copy
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPForImageClassification, CLIPModel, CLIPVisionConfig,  # noqa: E402
                          CLIPVisionModel, CLIPVisionModelWithProjection, DeiTConfig, DeiTForImageClassification,
                          DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Backbone, Dinov2Config,
                          Dinov2ForImageClassification, Dinov2Model, Dinov2WithRegistersBackbone,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification,
                          Dinov2WithRegistersModel,
                          Siglip2VisionConfig, Siglip2VisionModel, SiglipConfig, SiglipForImageClassification,
                          SiglipModel, SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTForImageClassification,
                          ViTForMaskedImageModeling, ViTMAEConfig, ViTMAEModel, ViTModel)

import pm_kernels  # noqa: E402
from pm_kernels.budget import pm_macs  # noqa: E402
from pm_kernels.deploy import load_exported  # noqa: E402
from pm_kernels.hosts.transformers import from_pretrained  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
N_PATCHES = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the CPU is shared


class Family(NamedTuple):
    build: Callable[[], nn.Module]
    layers: str                  # the dense model's layer list (the SPEC reference wraps its entries)
    prefix: int
    loss: Optional[Callable]     # None: calibrate's default (cross-entropy on .logits)
    image_features: bool = False  # a two-tower model: images through get_image_features


def _sin(field):
    return lambda out, targets: getattr(out, field).sin().sum()


FAMILIES = {
    "vit": Family(lambda: ViTForImageClassification(ViTConfig(**SMALL, intermediate_size=128, num_labels=5)),
                  "vit.layers", 1, None),
    "deit": Family(lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**SMALL, intermediate_size=128,
                                                                            num_labels=5)), "deit.layers", 2, None),
    "clip_vision": Family(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        **SMALL, intermediate_size=128, projection_dim=16)), "vision_model.encoder.layers", 1, _sin("image_embeds")),
    "clip": Family(lambda: CLIPModel(CLIPConfig(
        vision_config=dict(SMALL, intermediate_size=128), projection_dim=16,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=40, max_position_embeddings=8))),
        "vision_model.encoder.layers", 1, _sin("pooler_output"), image_features=True),
    "siglip": Family(lambda: SiglipVisionModel(SiglipVisionConfig(**SMALL, intermediate_size=128)),
                     "encoder.layers", 0, _sin("pooler_output")),
    "dinov2": Family(lambda: Dinov2ForImageClassification(Dinov2Config(**SMALL, mlp_ratio=2, use_swiglu_ffn=True,
                                                                       num_labels=5)), "dinov2.encoder.layer", 1, None),
    "dinov2_reg": Family(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2,
                                                                                     num_register_tokens=2)),
                         "encoder.layer", 3, _sin("last_hidden_state")),
}


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[name].build().to(dtype).eval()


def data(dtype=torch.float64, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 5, (batch,), generator=g)


def run(name, model, images, **kwargs):
    if FAMILIES[name].image_features:
        return model.get_image_features(pixel_values=images, **kwargs)
    return model(pixel_values=images, **kwargs)


def tensors(out):
    """A ModelOutput's tensors, nested ones (feature maps, hidden states) included."""
    return [t for v in out.to_tuple() for t in ([v] if isinstance(v, torch.Tensor) else v)]


def assert_same(a, b, tol):
    a, b = tensors(a), tensors(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.shape == y.shape and (x - y).abs().max() <= tol


def layer_list(model, path):
    module = model
    for name in path.split("."):
        module = getattr(module, name)
    return module


def compressed(name, dtype=torch.float64, keep_rate=0.5, seed=0):
    """(PM model compressed on random scores with M and R moved off their initial values, as by fine-tuning;
    the unpatched copy made before patching)."""
    pm = build(name, dtype, seed)
    dense = copy.deepcopy(pm)
    g = torch.Generator().manual_seed(seed)
    pm_kernels.compress(pm, torch.rand(3, N_PATCHES, generator=g) + 0.1, keep_rate=keep_rate, prune_rate=0.1)
    with torch.no_grad():
        for layer in layer_list(pm, FAMILIES[name].layers):
            if layer.M is not None:
                layer.M.add_(0.02 * torch.randn(layer.M.shape, generator=g, dtype=dtype))
                layer.R.add_(0.02 * torch.randn(layer.R.shape, generator=g, dtype=dtype))
    return pm, dense


class SpecLayer(nn.Module):
    """SPEC §1 around an unpatched library layer: x ← R·layer(M·x) + (1 − m) ⊙ x; keeps its outputs."""

    def __init__(self, layer, pm_layer, seen):
        super().__init__()
        self.layer, self.seen = layer, seen
        self.M, self.R, self.keep = pm_layer.M, pm_layer.R, pm_layer.keep_mask

    def forward(self, x, *args, **kwargs):
        if self.M is None:
            out = self.layer(x, *args, **kwargs)
        else:
            out = self.R @ self.layer(self.M @ x, *args, **kwargs) + (~self.keep).to(x.dtype)[:, None] * x
        self.seen.append(out)
        return out


def spec_reference(name, dense, pm):
    """The unpatched copy with each layer run as SPEC §1 with the PM layer's M, R, keep_mask; the list its layers'
    outputs are appended to."""
    reference, seen = copy.deepcopy(dense), []
    layers = layer_list(reference, FAMILIES[name].layers)
    for i, pm_layer in enumerate(layer_list(pm, FAMILIES[name].layers)):
        layers[i] = SpecLayer(layers[i], pm_layer, seen)
    return reference, seen


# ------------------------------------------------------------------------------------------------ families

@pytest.mark.parametrize("name", list(FAMILIES))
def test_identity_equals_dense(name):
    dense = build(name)
    pm = pm_kernels.patch(copy.deepcopy(dense))
    host = pm_kernels.host_of(pm)
    assert pm_kernels.is_patched(pm) and host.num_prefix(pm) == FAMILIES[name].prefix
    for layer in layer_list(pm, FAMILIES[name].layers):
        assert layer.M is None and layer.R is None and layer.keep_mask is None
    images, _ = data()
    with torch.no_grad():
        assert_same(run(name, pm, images), run(name, dense, images), 1e-9)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_calibrate_equals_the_eager_attention_gradient(name):
    dense = build(name)
    images, targets = data()
    family = FAMILIES[name]
    loss_fn = family.loss or (lambda out, t: F.cross_entropy(out.logits, t))
    eager = copy.deepcopy(dense)
    eager.set_attn_implementation("eager")
    out = run(name, eager, images, output_attentions=True)
    attentions = out.attentions
    grads = torch.autograd.grad(loss_fn(out, targets), attentions)
    want = torch.stack([(A * dA).sum(dim=(0, 1, 2)) / (A.shape[0] * A.shape[1] * A.shape[2])
                        for A, dA in zip(attentions, grads)])[:, family.prefix:].abs()
    scores = pm_kernels.calibrate(dense, [(images, targets)], family.loss)  # default loss when None
    assert scores.shape == (3, N_PATCHES) and scores.dtype == torch.float32
    assert (scores.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compressed_is_the_spec_chain_and_optimize_is_the_pm_model(name):
    pm, dense = compressed(name)
    P = FAMILIES[name].prefix
    layers = pm_kernels.host_of(pm).layers(pm)
    assert any(layer.M.shape[0] < P + N_PATCHES for layer in layers if layer.M is not None)
    reference, seen = spec_reference(name, dense, pm)
    images, _ = data()
    with torch.no_grad():
        out = run(name, pm, images)
        assert_same(out, run(name, reference, images), 1e-9)
        # the library's loop captures every layer's output: N tokens each, the SPEC chain's
        hidden = run(name, pm, images, output_hidden_states=True).hidden_states
        assert len(hidden) == len(layers) + 1
        for got, expected in zip(hidden[1:], seen):
            assert got.shape == (2, P + N_PATCHES, 64) and (got - expected).abs().max() <= 1e-9
        fast = pm_kernels.optimize(pm)
        assert type(fast) is type(pm) and fast.pm_source is pm
        fast_out = run(name, fast, images)
        assert type(fast_out) is type(out)
        assert_same(fast_out, run(name, pm, images), 1e-9)
    pm.train()
    family = FAMILIES[name]
    loss = (family.loss or (lambda o, t: o.logits.logsumexp(-1).sum()))(run(name, pm, images), None)
    loss.backward()
    for layer in layers:
        if layer.M is not None:
            assert layer.M.grad.abs().sum() > 0 and layer.R.grad.abs().sum() > 0


def test_two_tower_clip_keeps_its_call_after_optimize():
    pm, _ = compressed("clip")
    images, _ = data()
    text = torch.randint(0, 40, (3, 6))
    with torch.no_grad():
        want = pm(input_ids=text, pixel_values=images)
        got = pm_kernels.optimize(pm)(input_ids=text, pixel_values=images)
    assert type(got) is type(want) and (got.logits_per_image - want.logits_per_image).abs().max() <= 1e-9


def test_pm_macs_equal_the_traced_count():
    pm, _ = compressed("vit", dtype=torch.float32)
    kept = [layer.num_kept(1 + N_PATCHES) for layer in pm.vit.layers]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        pm(pixel_values=torch.zeros(1, 3, 32, 32))
    assert pm_macs(pm, kept) == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradients():
    pm, _ = compressed("vit")
    checkpointed = copy.deepcopy(pm)
    checkpointed.activation_checkpointing_enable()
    images, targets = data()
    calls = []
    for layer in checkpointed.vit.layers:
        layer.attention.register_forward_hook(lambda *a: calls.append(1))
    for model in (pm, checkpointed):
        model.train()
        F.cross_entropy(model(pixel_values=images).logits, targets).backward()
    assert len(calls) == 2 * len(pm.vit.layers)  # forward, then the recomputation in backward
    for (name, p), q in zip(pm.named_parameters(), checkpointed.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-9, name


def test_identity_returns_the_eager_attentions():
    dense = build("vit")
    pm = pm_kernels.patch(copy.deepcopy(dense))
    dense.set_attn_implementation("eager")
    images, _ = data()
    with torch.no_grad():
        got = pm(pixel_values=images, output_attentions=True).attentions
        want = dense(pixel_values=images, output_attentions=True).attentions
    assert len(got) == 3 and all((a - b).abs().max() <= 1e-7 for a, b in zip(got, want))


TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=40,
            max_position_embeddings=8)
VISION = dict(SMALL, intermediate_size=128)
OTHER_CLASSES = {  # the rest of the table: identity = dense, optimize = the compressed model
    "ViTModel": lambda: ViTModel(ViTConfig(**VISION)),
    "DeiTModel": lambda: DeiTModel(DeiTConfig(**VISION)),
    "DeiTForImageClassification": lambda: DeiTForImageClassification(DeiTConfig(**VISION, num_labels=5)),
    "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**VISION)),
    "CLIPForImageClassification": lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION,
                                                                                text_config=TEXT, num_labels=5)),
    "SiglipModel": lambda: SiglipModel(SiglipConfig(vision_config=VISION, text_config=TEXT)),
    "SiglipForImageClassification": lambda: SiglipForImageClassification(SiglipConfig(
        vision_config=VISION, text_config=TEXT, num_labels=5)),
    "Dinov2Model": lambda: Dinov2Model(Dinov2Config(**SMALL, mlp_ratio=2)),
    "Dinov2WithRegistersForImageClassification": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, num_register_tokens=4, num_labels=5)),
    "Dinov2WithRegistersBackbone": lambda: Dinov2WithRegistersBackbone(Dinov2WithRegistersConfig(
        **SMALL, mlp_ratio=2, num_register_tokens=1, out_features=["stage3"])),
}


@pytest.mark.parametrize("name", list(OTHER_CLASSES))
def test_the_other_table_classes(name):
    torch.manual_seed(0)
    dense = OTHER_CLASSES[name]().double().eval()
    assert type(dense).__name__ == name
    pm = pm_kernels.patch(copy.deepcopy(dense))
    host = pm_kernels.host_of(pm)
    images, _ = data()
    with torch.no_grad():
        assert_same(host.forward_images(pm, images), host.forward_images(dense, images), 1e-9)
        pm_kernels.compress(pm, torch.rand(3, N_PATCHES) + 0.1, keep_rate=0.5)
        out = host.forward_images(pm, images)
        assert not torch.allclose(tensors(out)[0], tensors(host.forward_images(dense, images))[0])
        if "Backbone" not in name:
            fast = pm_kernels.optimize(pm)
            assert_same(host.forward_images(fast, images), out, 1e-9)


def test_fused_block_runs_an_unpatched_library_layer():
    pm, dense = compressed("vit")
    layer = next(layer for layer in pm.vit.layers if layer.M is not None)
    index = list(pm.vit.layers).index(layer)
    x = torch.randn(2, 1 + N_PATCHES, 64, dtype=torch.float64)
    want = SpecLayer(dense.vit.layers[index], layer, [])(x, None)
    got = pm_kernels.fused_block(x, dense.vit.layers[index], layer.M.detach(), layer.R.detach(), layer.keep_mask)
    assert (got - want).abs().max() <= 1e-9
    assert (pm_kernels.fused_block(x, layer, layer.M.detach(), layer.R.detach(), layer.keep_mask) - want
            ).abs().max() <= 1e-9


# ------------------------------------------------------------------------------------------------ backbone

def test_dinov2_backbone_feature_maps_and_no_optimize():
    torch.manual_seed(0)
    config = Dinov2Config(**SMALL, mlp_ratio=2, out_features=["stage1", "stage3"], reshape_hidden_states=True)
    dense = Dinov2Backbone(config).double().eval()
    pm = copy.deepcopy(dense)
    pm_kernels.compress(pm, torch.rand(3, N_PATCHES) + 0.1, keep_rate=0.5)
    reference = copy.deepcopy(dense)
    seen = []
    for i, layer in enumerate(pm.encoder.layer):
        reference.encoder.layer[i] = SpecLayer(reference.encoder.layer[i], layer, seen)
    images, _ = data()
    with torch.no_grad():
        got = pm(images).feature_maps
        reference(images)  # stage i: layer i's output, normed, patch tokens on their grid
        want = [pm.layernorm(seen[i - 1])[:, 1:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2) for i in (1, 3)]
    assert len(got) == 2 and all(a.shape == (2, 64, 4, 4) and (a - b).abs().max() <= 1e-9 for a, b in zip(got, want))
    with pytest.raises(TypeError, match="Dinov2Backbone builds its output from every layer's tokens"):
        pm_kernels.optimize(pm)


# ------------------------------------------------------------------------------------------------ deploy

@pytest.mark.parametrize("name, fmt", [("vit", "onnx"), ("clip_vision", "onnx"), ("clip_vision", "pt2")])
def test_export_matches_pytorch(name, fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    pm, _ = compressed(name, dtype=torch.float32)
    path = pm_kernels.export(pm, tmp_path / f"model.{fmt}", format=fmt)
    images, _ = data(torch.float32, batch=3)
    with torch.no_grad():
        want = tensors(run(name, pm, images))
    got = load_exported(path)(images)
    got = list(got) if isinstance(got, (tuple, list)) else [got]  # ONNX Runtime: the first output only
    assert len(got) in (1, len(want))
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["vit", "dinov2_reg"])
def test_state_dict_and_save_pretrained_round_trips(name, tmp_path):
    pm, _ = compressed(name)
    images, _ = data()
    fresh = pm_kernels.patch(build(name, seed=1))
    fresh.load_state_dict(pm.state_dict())
    pm.save_pretrained(tmp_path)
    patterns = vars(type(pm)).get("_keys_to_ignore_on_load_unexpected", "unset")
    back, info = from_pretrained(type(pm), tmp_path, dtype=torch.float64, output_loading_info=True)
    assert pm_kernels.is_patched(back)
    # the structure is ours to load: transformers' report lists nothing (it called M, R unexpected), and the
    # class's own patterns are left as they were
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert vars(type(pm)).get("_keys_to_ignore_on_load_unexpected", "unset") == patterns
    with torch.no_grad():
        want = run(name, pm, images)
        for model in (fresh, back):
            assert_same(run(name, model, images), want, 1e-9)
            for a, b in zip(layer_list(model, FAMILIES[name].layers), layer_list(pm, FAMILIES[name].layers)):
                assert (a.M is None) == (b.M is None)
                if a.M is not None:
                    assert torch.equal(a.M, b.M) and torch.equal(a.R, b.R) and torch.equal(a.keep_mask, b.keep_mask)


def test_segmenter_on_a_transformers_backbone():
    backbone = build("vit", torch.float32).vit
    seg = pm_kernels.Segmenter(backbone, num_classes=3, decoder="linear").eval()
    pm_kernels.compress(seg, torch.rand(3, N_PATCHES) + 0.1, keep_rate=0.5)
    images, _ = data(torch.float32)
    with torch.no_grad():
        want = seg(images)
        assert want.shape == (2, 3, 32, 32)
        assert (pm_kernels.optimize(seg)(images) - want).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------ refusals

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


@pytest.mark.parametrize("make, match", [
    (lambda: Siglip2VisionModel(Siglip2VisionConfig(**{k: v for k, v in TINY.items() if k != "image_size"})),
     r"Siglip2VisionModel is not supported .*NaFlex.*different patch grid per image"),
    (lambda: ViTMAEModel(ViTMAEConfig(**TINY, mask_ratio=0.75)),
     r"ViTMAEModel is not supported .*random masking \(config.mask_ratio=0.75\)"),
    (lambda: ViTMAEModel(ViTMAEConfig(**TINY, mask_ratio=0.0)),
     r"ViTMAEModel is not supported .*shuffles the patches in a random order"),
    (lambda: ViTForMaskedImageModeling(ViTConfig(**TINY)),
     r"ViTForMaskedImageModeling is not a transformers model pm_kernels supports: expected one of ViTModel"),
])
def test_unsupported_models_are_refused_by_name(make, match):
    model = make()
    for call in (pm_kernels.patch, lambda m: pm_kernels.calibrate(m, [])):
        with pytest.raises(TypeError, match=match):
            call(model)


@pytest.mark.parametrize("name", ["vit", "clip_vision"])
def test_an_attention_mask_is_refused(name):
    pm = pm_kernels.patch(build(name))
    images, _ = data()
    tower = "ViTModel" if name == "vit" else "CLIPVisionModel"
    with pytest.raises(ValueError, match=rf"attention_mask: a Prune-and-Merge {tower} takes no attention mask"):
        pm(pixel_values=images, attention_mask=torch.ones(2, 1 + N_PATCHES))


def test_what_a_compressed_or_optimized_model_cannot_return_is_refused():
    pm, _ = compressed("vit")
    images, _ = data()
    with pytest.raises(ValueError, match=r"output_attentions: a compressed ViTModel attends among the K merged"):
        pm(pixel_values=images, output_attentions=True)
    fast = pm_kernels.optimize(pm)
    with pytest.raises(ValueError, match=r"output_hidden_states: the pm_kernels.optimize form of ViTModel folds"):
        fast(pixel_values=images, output_hidden_states=True)
    with pytest.raises(ValueError, match=r"objective: 'labels' \(the default for \(images, targets\) batches\) needs"):
        pm_kernels.calibrate(build("dinov2_reg"), [data()])
    scores = pm_kernels.calibrate(build("dinov2_reg"), [data(batch=16)[0]])  # images alone: k-means
    assert torch.isfinite(scores).all() and (scores.sum(dim=1) > 0).all()


def test_a_compressed_dinov2_refuses_another_grid_with_the_same_token_count():
    pm, _ = compressed("dinov2_reg")
    other = torch.randn(1, 3, 16, 64, dtype=torch.float64)  # 2 x 8 patches: 16, as 4 x 4
    with pytest.raises(ValueError, match=r"x: this compressed model is built for 32x32 images .* got 16x64"):
        pm(pixel_values=other)
    assert pm_kernels.host_of(pm).any_size(pm)


def test_set_backend_reaches_the_attention_and_another_implementation_is_refused():
    pm = pm_kernels.patch(ViTModel(ViTConfig(**TINY)))
    pm_kernels.set_backend(pm, "torch")
    assert {layer.attention.backend for layer in pm.layers} == {"torch"}
    assert pm.config._attn_implementation == "pm_kernels"
    images = torch.randn(1, 3, 32, 32)
    want = pm(pixel_values=images).last_hidden_state
    pm.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match=r"_attn_implementation was set to 'sdpa' after pm_kernels.patch"):
        pm(pixel_values=images)
    pm.set_attn_implementation("pm_kernels")
    assert torch.equal(pm(pixel_values=images).last_hidden_state, want)
