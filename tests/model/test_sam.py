"""SAM's image encoder (windowed + global attention, decomposed relative position; docs/windowed_attention.md) on
both hosts: timm's ``VisionTransformerSAM`` and transformers' ``SamVisionEncoder`` / ``SamVisionModel`` /
``SamModel``. Identity = the dense encoder (float64, 1e-9); a compressed model = the written per-window formula
(the reference below, on the unpatched layers' weights); calibrate = the per-window Σ A ⊙ ∂L/∂A of an explicit
softmax; optimize = the PM model; export parity; MACs = FlopCounterMode; the refusals. Tiny random configs: an 8×8
patch grid, windows of 3 (padded to 9×9: border windows of 3×2, 2×3 and 2×2 real tokens), layers W G W."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from timm.models.vision_transformer_sam import VisionTransformerSAM

import pm_kernels
from pm_kernels.budget import pm_macs
from pm_kernels.deploy import load_exported
from pm_kernels.structure import build_merge_matrix
from windowed_formula import window_slots, windowed_reference

transformers = pytest.importorskip("transformers")
from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel  # noqa: E402
from transformers.models.sam.modeling_sam import SamVisionEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the CPU is shared

GRID, WINDOW, DEPTH, WIDTH, HEADS = 8, 3, 3, 32, 2
IMAGE = GRID * 8


def randomise(model, seed):
    """Every parameter random (SAM initialises its relative-position tables and norms to constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def timm_sam(neck=16):
    return VisionTransformerSAM(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                window_size=WINDOW, global_attn_indexes=(1,), use_rel_pos=True, neck_chans=neck,
                                num_classes=5, qk_norm=True, init_values=0.5)


VISION = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMAGE, patch_size=8,
              output_channels=16, window_size=WINDOW, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8)


def sam_model():
    return SamModel(SamConfig(vision_config=VISION, prompt_encoder_config=dict(
        hidden_size=16, image_size=IMAGE, patch_size=8, mask_input_channels=4), mask_decoder_config=dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)))


MODELS = {
    "timm": timm_sam,
    "encoder": lambda: SamVisionEncoder(SamVisionConfig(**VISION)),
    "vision_model": lambda: SamVisionModel(SamVisionConfig(**VISION)),
    "sam_model": sam_model,
}
POINTS = torch.rand(2, 1, 1, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * IMAGE


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomise(MODELS[name](), seed).to(dtype).eval()


def images(dtype=torch.float64, batch=2, seed=1):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(name, model, x):
    """The model's output tensor: timm's logits, an encoder's neck output, SamModel's masks from point prompts."""
    if name == "timm":
        return model(x)
    if name == "sam_model":
        return model(pixel_values=x, input_points=POINTS.to(x.dtype)).pred_masks
    return model(pixel_values=x).last_hidden_state


def layers(name, model):
    if name == "timm":
        return model.blocks
    return (model if name == "encoder" else model.vision_encoder).layers


def compressed(name, dtype=torch.float64, keep_rate=0.7, seed=0):
    """(PM model compressed on random scores, M and R moved off their initial values; the dense model)."""
    pm = build(name, dtype, seed)
    dense = copy.deepcopy(pm)
    g = torch.Generator().manual_seed(seed)
    pm_kernels.compress(pm, torch.rand(DEPTH, GRID * GRID, generator=g) + 0.1, keep_rate=keep_rate, prune_rate=0.1)
    with torch.no_grad():
        for layer in layers(name, pm):
            if layer.M is not None:
                layer.M.add_(0.05 * torch.randn(layer.M.shape, generator=g, dtype=dtype) * (layer.M != 0))
                layer.R.add_(0.05 * torch.randn(layer.R.shape, generator=g, dtype=dtype) * (layer.R != 0))
    return pm, dense


def reference_model(name, dense, pm):
    """The unpatched model with every layer run as the written formula with the PM layer's structure; the list of
    the layers' outputs (``windowed_formula``)."""
    return windowed_reference(dense, pm, lambda model: layers(name, model), WINDOW)


# ------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(MODELS))
def test_identity_equals_the_dense_encoder(name):
    dense = build(name)
    pm = pm_kernels.patch(copy.deepcopy(dense))
    assert pm_kernels.is_patched(pm) and pm_kernels.host_of(pm).num_prefix(pm) == 0
    assert all(layer.M is None for layer in layers(name, pm))
    x = images()
    with torch.no_grad():
        want = run(name, dense, x)
        assert (run(name, pm, x) - want).abs().max() <= 1e-9 * want.abs().max()
        assert (run(name, pm_kernels.optimize(pm), x) - want).abs().max() <= 1e-9 * want.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_is_the_written_formula_and_optimize_is_the_pm_model(name):
    pm, dense = compressed(name)
    pm_layers = layers(name, pm)
    assert [layer.M is not None for layer in pm_layers] == [True] * DEPTH
    assert any(bool((layer.centre_slot < 0).any()) for layer in pm_layers)  # empty slots are exercised
    reference, seen = reference_model(name, dense, pm)
    x = images()
    with torch.no_grad():
        out = run(name, pm, x)
        want = run(name, reference, x)
        assert (out - want).abs().max() <= 1e-9 * want.abs().max()
        if name in ("encoder", "vision_model"):  # the library's loop captures every layer's output on the grid
            hidden = pm(pixel_values=x, output_hidden_states=True).hidden_states[1:]
            assert len(hidden) == len(seen) == DEPTH
            assert all((a - b).abs().max() <= 1e-9 * b.abs().max() for a, b in zip(hidden, seen))
        fast = pm_kernels.optimize(pm)
        assert fast.pm_source is pm
        assert (run(name, fast, x) - out).abs().max() <= 1e-9 * out.abs().max()
    pm.train()
    run(name, pm, x).sin().sum().backward()
    for layer in pm_layers:
        assert layer.M.grad.abs().sum() > 0 and layer.R.grad.abs().sum() > 0
        empty_columns = (layer.centre_slot < 0).unsqueeze(1).expand_as(layer.R)
        assert layer.R.grad[empty_columns].abs().max() == 0  # empty slots stay empty under training


@pytest.mark.parametrize("compressed_layers", [[0, 2], [1]])
def test_a_dense_layer_between_compressed_ones(compressed_layers):
    dense = build("timm")
    pm = pm_kernels.patch(copy.deepcopy(dense))
    scores = torch.rand(DEPTH, GRID * GRID, generator=torch.Generator().manual_seed(4)) + 0.1
    pm_kernels.compress(pm, scores, keep_rate=0.5, prune_rate=0.1, layers=compressed_layers)
    assert [layer.M is not None for layer in pm.blocks] == [i in compressed_layers for i in range(DEPTH)]
    reference, _ = reference_model("timm", dense, pm)
    x = images()
    with torch.no_grad():
        out = pm(x)
        assert (out - reference(x)).abs().max() <= 1e-9 * out.abs().max()
        assert (pm_kernels.optimize(pm)(x) - out).abs().max() <= 1e-9 * out.abs().max()


def test_the_per_window_structure_follows_the_search_rule():
    pm = pm_kernels.patch(build("timm"))
    scores = torch.rand(DEPTH, GRID * GRID, generator=torch.Generator().manual_seed(3)) + 0.1
    structure = pm_kernels.search_structure(scores, keep_rate=0.5, prune_rate=0.1, num_prefix=0)
    pm_kernels.compress(pm, scores, keep_rate=0.5, prune_rate=0.1)
    win, slot = window_slots(GRID, GRID, WINDOW)
    for layer, st, s in zip(pm.blocks, structure, scores):
        n_w = (-(-GRID // WINDOW)) ** 2
        K = max(1, round(int(st.centres.sum()) / n_w))
        assert layer.M.shape == (n_w, K, WINDOW ** 2) and torch.equal(layer.keep_mask, ~st.pruned)
        for w in range(n_w):
            tokens = torch.nonzero(win == w).flatten()  # raster order = the window's raster order
            per_row = -(-GRID // WINDOW)
            h_w, w_w = (min(WINDOW, GRID - i * WINDOW) for i in divmod(w, per_row))
            unpruned = tokens[~st.pruned[tokens]]
            best = unpruned[torch.sort(s[unpruned], descending=True, stable=True).indices[:K]]
            centres = torch.zeros(len(tokens), dtype=torch.bool)
            centres[torch.isin(tokens, best)] = True
            M_w = build_merge_matrix(s[tokens], st.pruned[tokens], centres, (h_w, w_w), num_prefix=0)
            got = layer.M[w][:, slot[tokens]]  # rows: the window's centres, then its empty slots
            assert torch.allclose(got[:len(best)], M_w.to(got.dtype)) and not got[len(best):].any()
            assert sorted(layer.centre_slot[w][:len(best)].tolist()) == sorted(slot[best].tolist())
            assert (layer.centre_slot[w][len(best):] == -1).all()


@pytest.mark.parametrize("name", ["timm", "vision_model"])
def test_calibrate_is_the_per_window_score_of_explicit_softmax_attention(name):
    dense = build(name)
    x = images()
    loss_fn = (lambda out, t: out.sin().sum()) if name == "timm" else (
        lambda out, t: out.last_hidden_state.sin().sum())
    captured = []
    eager = copy.deepcopy(dense)
    if name == "timm":  # timm's explicit softmax path; its probabilities pass attn_drop (identity in eval)
        for blk in eager.blocks:
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(out))
        out = eager(x)
    else:  # transformers picks SAM's attention class when it builds the layers
        config = copy.deepcopy(dense.config)
        config._attn_implementation = "eager"
        eager = SamVisionModel(config).double().eval()
        eager.load_state_dict(dense.state_dict())
        out = eager(pixel_values=x, output_attentions=True)
        captured = list(out.attentions)
    grads = torch.autograd.grad(loss_fn(out, None), captured)
    win, slot = window_slots(GRID, GRID, WINDOW)
    want = []
    for blk, A, dA in zip(layers(name, dense), captured, grads):
        n = A.shape[-1]
        prod = (A * dA).reshape(2, -1, HEADS, n, n).sum(dim=(0, 2, 3)) / (2 * HEADS * n)  # (windows, keys)
        want.append(prod[win, slot] if blk.window_size else prod[0])
    want = torch.stack(want).abs()
    scores = pm_kernels.calibrate(dense, [(x, None)], loss_fn)
    assert scores.shape == (DEPTH, GRID * GRID) and scores.dtype == torch.float32
    assert (scores.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("name", ["timm", "vision_model"])
def test_pm_macs_equal_the_traced_count(name):
    for keep_rate in (None, 0.5):
        pm, _ = compressed(name, torch.float32) if keep_rate else (pm_kernels.patch(build(name, torch.float32)), 0)
        kept = [layer.num_kept(GRID * GRID) for layer in layers(name, pm)]
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run(name, pm, images(torch.float32, batch=1))
            assert pm_macs(pm, kept) == counter.get_total_flops() / 2
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run(name, pm_kernels.optimize(pm), images(torch.float32, batch=1))
        if keep_rate:  # the folded form does fewer MACs than the PM model (its boundaries are folded)
            assert counter.get_total_flops() / 2 < pm_macs(pm, kept)


def test_a_budget_lands_on_the_installed_structure():
    pm = pm_kernels.patch(build("timm", torch.float32))
    scores = torch.rand(DEPTH, GRID * GRID, generator=torch.Generator().manual_seed(5)) + 0.1
    dense_macs = pm_macs(pm, [GRID * GRID] * DEPTH)
    result = pm_kernels.budget_keep_rate(scores, pm, 0.7 * dense_macs / 1e9, num_prefix=0)
    pm_kernels.compress(pm, scores, **result.compress_kwargs())
    kept = [layer.num_kept(GRID * GRID) for layer in pm.blocks]
    assert kept == result.kept and pm_macs(pm, kept) / 1e9 == pytest.approx(result.gmacs)


@pytest.mark.parametrize("name, fmt", [pytest.param("timm", "onnx", marks=pytest.mark.slow), ("timm", "pt2"),
                                       pytest.param("vision_model", "onnx", marks=pytest.mark.slow)])
def test_export_matches_pytorch(name, fmt, tmp_path):
    pytest.importorskip("onnxruntime")
    pm, _ = compressed(name, dtype=torch.float32)
    path = pm_kernels.export(pm, tmp_path / f"sam.{fmt}", format=fmt)
    x = images(torch.float32, batch=3)
    with torch.no_grad():
        want = run(name, pm, x)
    got = load_exported(path)(x)
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


def test_state_dict_round_trip_and_a_checkpoint_with_an_inconsistent_structure():
    pm, _ = compressed("timm")
    fresh = pm_kernels.patch(build("timm", seed=1))
    fresh.load_state_dict(pm.state_dict())
    x = images()
    with torch.no_grad():
        assert (fresh(x) - pm(x)).abs().max() == 0
    state = pm.state_dict()
    state["blocks.1.R"] = state["blocks.1.R"][:, :, :-1]
    with pytest.raises(ValueError, match=r"blocks\.1\.R: expected shape"):
        pm_kernels.patch(build("timm")).load_state_dict(state)
    state = pm.state_dict()
    del state["blocks.0.centre_slot"]
    with pytest.raises(ValueError, match=r"blocks\.0\.M, R, keep_mask and centre_slot come together"):
        pm_kernels.patch(build("timm")).load_state_dict(state)


def test_save_pretrained_round_trip(tmp_path):
    from pm_kernels.hosts.transformers import from_pretrained
    pm, _ = compressed("vision_model")
    pm.save_pretrained(tmp_path)
    back = from_pretrained(SamVisionModel, tmp_path, dtype=torch.float64)
    x = images()
    with torch.no_grad():
        assert (run("vision_model", back, x) - run("vision_model", pm, x)).abs().max() == 0
    for a, b in zip(layers("vision_model", back), layers("vision_model", pm)):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("M", "R", "keep_mask", "centre_slot"))


def test_gradient_checkpointing_keeps_the_gradients():
    pm, _ = compressed("timm")
    checkpointed = copy.deepcopy(pm)
    checkpointed.set_grad_checkpointing(True)
    x = images()
    for model in (pm, checkpointed):
        model.train()
        model(x).square().sum().backward()
    for (name, p), q in zip(pm.named_parameters(), checkpointed.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-9, name


def test_segmenter_on_a_sam_backbone():
    torch.manual_seed(0)
    seg = pm_kernels.Segmenter(randomise(timm_sam(neck=0), 0), num_classes=3, decoder="linear").eval()
    pm_kernels.compress(seg, torch.rand(DEPTH, GRID * GRID) + 0.1, keep_rate=0.5)
    x = images(torch.float32)
    with torch.no_grad():
        want = seg(x)
        assert want.shape == (2, 3, IMAGE, IMAGE)
        assert (pm_kernels.optimize(seg)(x) - want).abs().max() <= 1e-4


def test_another_image_size_interpolates_the_global_tables_as_timm_does():
    dense = build("timm")
    pm = pm_kernels.patch(copy.deepcopy(dense))
    x = torch.randn(1, 3, 72, 72, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # a 9×9 grid: the global block's 15-row tables are interpolated to 17 rows
        assert (pm(x) - dense(x)).abs().max() <= 1e-9 * dense(x).abs().max()
    pm_kernels.compress(pm, torch.rand(DEPTH, 81) + 0.1, keep_rate=0.6, img_size=72)
    with torch.no_grad():
        out = pm(x)
        assert torch.isfinite(out).all() and (pm_kernels.optimize(pm)(x) - out).abs().max() <= 1e-9
    with pytest.raises(ValueError, match=r"built for 72x72 images"):
        pm(images(batch=1))


# ------------------------------------------------------------------------------------------------ refusals

def test_what_cannot_be_compressed_or_returned_is_refused():
    with pytest.raises(ValueError, match=r"rotary position embedding \(use_rope=True\)"):
        pm_kernels.patch(VisionTransformerSAM(img_size=IMAGE, patch_size=8, embed_dim=WIDTH, depth=2,
                                              num_heads=HEADS, window_size=WINDOW, use_rope=True, neck_chans=0))
    mixed = timm_sam()
    mixed.blocks[2].window_size = 4
    with pytest.raises(ValueError, match=r"windowed layers of different window sizes \[3, 4\]"):
        pm_kernels.patch(mixed)
    pm, _ = compressed("timm")
    with pytest.raises(ValueError, match=r"x: this compressed model is built for 64x64 images .* got 72x72"):
        pm(torch.randn(1, 3, 72, 72, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"a windowed layer's structure is per window"):
        pm.blocks[0].set_structure(torch.eye(64), torch.eye(64), torch.ones(64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"z: a windowed layer's body takes \(B, windows, K, C\)"):
        pm_kernels.fused_block(torch.randn(1, 64, WIDTH, dtype=torch.float64), pm.blocks[0], torch.eye(64),
                               torch.eye(64), torch.ones(64, dtype=torch.bool))
    hf, _ = compressed("vision_model")
    with pytest.raises(ValueError, match=r"output_attentions: a Prune-and-Merge SamVisionEncoder"):
        hf(pixel_values=images(), output_attentions=True)
    with pytest.raises(ValueError, match=r"output_hidden_states: the pm_kernels.optimize form of SamVisionEncoder"):
        pm_kernels.optimize(hf)(pixel_values=images(), output_hidden_states=True)
    hidden = hf(pixel_values=images(), output_hidden_states=True).hidden_states  # the PM model's: on the grid
    assert len(hidden) == DEPTH + 1 and hidden[-1].shape == (2, GRID, GRID, WIDTH)


def test_other_sam_family_models_are_refused_by_name():
    from transformers import SamHQVisionConfig, SamHQVisionModel
    model = SamHQVisionModel(SamHQVisionConfig(**VISION))
    with pytest.raises(TypeError, match=r"SamHQVisionModel is not supported .*supports SAM's ViT image encoder"):
        pm_kernels.patch(model)


def test_the_triton_kernels_run_sam_layers():
    """Head dim 32 (Triton's smallest), under the interpreter without a GPU: the compressed layers' per-window
    key positions with the −inf column of empty slots, and calibration's per-window scores, as the torch backend."""
    torch.manual_seed(0)
    model = randomise(VisionTransformerSAM(img_size=40, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                           window_size=3, global_attn_indexes=(1,), use_rel_pos=True, neck_chans=0,
                                           num_classes=0), 0).eval()
    pm = pm_kernels.patch(model)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    loss = lambda out, _: out.sin().sum()  # noqa: E731
    scores = {}
    for backend in ("torch", "triton"):
        pm_kernels.set_backend(pm, backend)
        scores[backend] = pm_kernels.calibrate(pm, [(x, None)], loss)
    assert (scores["triton"] - scores["torch"]).abs().max() <= 1e-4 * scores["torch"].abs().max()
    pm_kernels.compress(pm, scores["torch"], keep_rate=0.7, prune_rate=0.1)
    assert any(bool((b.centre_slot < 0).any()) for b in pm.blocks)
    out = {}
    for backend in ("torch", "triton"):
        pm_kernels.set_backend(pm, backend)
        with torch.no_grad():
            out[backend] = pm(x)
    assert (out["triton"] - out["torch"]).abs().max() <= 1e-4 * out["torch"].abs().max()
