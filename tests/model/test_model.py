"""Model level: the patched timm ViT is exact (SPEC §1), calibrate matches the authors' hook formula (SPEC §3)."""
import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

import pm_kernels
from pm_kernels.dispatch import usable


def tiny_vit(**kwargs):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    return VisionTransformer(**dict(args, **kwargs))


def random_structure_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = tiny_vit(**kwargs).eval()
    scores = torch.rand(len(model.blocks), model.patch_embed.num_patches) + 0.1
    return pm_kernels.compress(model, scores, keep_rate=0.5, prune_rate=0.2), scores


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
def test_identity_structure_equals_timm(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        out = pm_kernels.patch_timm(model)(x)
    assert pm_kernels.is_patched(model)
    assert (out - expected).abs().max().item() <= 1e-5
    # The identity structure is the dense block: no M, R, keep_mask (no product by I), timm's state-dict keys.
    blk = model.blocks[0]
    assert blk.is_identity and blk.M is None and blk.R is None and blk.keep_mask is None
    assert not any(k.rsplit(".", 1)[-1] in ("M", "R", "keep_mask") for k in model.state_dict())


def _block_and_inputs(dtype=torch.float32, n=9, k=5, c=16, seed=0):
    torch.manual_seed(seed)
    block = Block(dim=c, num_heads=2, qkv_bias=True).eval().to(dtype)
    x = torch.randn(3, n, c, dtype=dtype)
    M = torch.randn(k, n, dtype=dtype)
    R = torch.randn(n, k, dtype=dtype)
    keep_mask = torch.rand(n) > 0.4
    keep_mask[0] = True
    return block, x, M, R, keep_mask


def test_fused_block_equals_spec_formula():
    block, x, M, R, keep_mask = _block_and_inputs()
    plain = copy.deepcopy(block)  # an unpatched timm Block computes z + Attn(LN1 z) + MLP(...) on its own
    with torch.no_grad():
        expected = torch.einsum("nk,bkc->bnc", R, plain(torch.einsum("kn,bnc->bkc", M, x)))
        expected = expected + (1 - keep_mask.float())[None, :, None] * x
        out = pm_kernels.fused_block(x, block, M, R, keep_mask, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_patched_block_uses_its_structure():
    model, _ = random_structure_model()
    blk = model.blocks[1]
    x = torch.randn(2, 17, 32)
    plain = Block(dim=32, num_heads=2, qkv_bias=True).eval()
    plain.load_state_dict({k: v for k, v in blk.state_dict().items() if k not in ("M", "R", "keep_mask")})
    with torch.no_grad():
        expected = blk.R @ plain(blk.M @ x) + (~blk.keep_mask).float()[:, None] * x
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)
    assert blk.M.shape[0] < 17


def test_chained_blocks_equal_block_by_block():
    model, _ = random_structure_model()
    assert type(model.blocks).__name__ == "PMBlocks"
    x = torch.randn(2, 17, 32, requires_grad=True)

    def one_by_one(h):
        for blk in model.blocks:
            h = blk(h)
        return h

    outs, grads = [], []
    for run in (model.blocks, one_by_one):  # chained reconstruct_merge vs merge/reconstruct per block
        model.zero_grad()
        x.grad = None
        out = run(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_fused_block_gradcheck():
    block, x, M, R, keep_mask = _block_and_inputs(torch.float64, n=6, k=4, c=8)
    for t in (x, M, R):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, M, R: pm_kernels.fused_block(x, block, M, R, keep_mask, backend="torch"), (x, M, R))


def test_compressed_model_trains_m_and_r():
    model, _ = random_structure_model()
    model.train()
    loss = model(torch.randn(2, 3, 16, 16)).logsumexp(-1).mean()
    loss.backward()
    for blk in model.blocks:
        assert blk.M.grad is not None and blk.M.grad.abs().sum() > 0
        assert blk.R.grad is not None and blk.R.grad.abs().sum() > 0


def _hooked_scores(model, batches):
    """The authors' way: eager attention, hook on the softmax output, A ⊙ dA per key."""
    probs = []

    def keep(_module, inputs, _out):
        inputs[0].retain_grad()
        probs.append(inputs[0])

    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(keep))
    n_layers, n = len(model.blocks), model.patch_embed.num_patches + 1
    scores = torch.zeros(n_layers, n - 1, dtype=torch.float64)
    model.eval()
    for images, targets in batches:
        probs.clear()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        for layer, A in enumerate(probs):
            b, h, _, _ = A.shape
            v = (A * A.grad).sum(dim=(0, 1, 2)) / (b * h * n)
            scores[layer] += v[1:].abs().double()
    for hook in hooks:
        hook.remove()
    return scores.float()


def test_calibrate_equals_hook_formula():
    torch.manual_seed(0)
    model = tiny_vit()
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)]
    expected = _hooked_scores(copy.deepcopy(model), batches)
    scores = pm_kernels.calibrate(pm_kernels.patch_timm(model), batches)
    assert scores.shape == (3, 16) and scores.dtype == torch.float32
    assert expected.abs().min() > 0
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-9)
    assert model.training, "calibrate must restore the training mode"
    assert all(p.grad is None for p in model.parameters()), "calibrate must not touch the weights' grads"


def test_registry_models_and_checkpoint_round_trip(tmp_path):
    model = timm.create_model("pm_deit_tiny_patch16_224", img_size=32, num_classes=7).eval()
    assert type(model).__name__ == "PMVisionTransformer" and pm_kernels.is_patched(model)
    scores = torch.rand(12, 4) + 0.1
    pm_kernels.compress(model, scores, keep_rate=0.5, prune_rate=0.25)
    path = tmp_path / "pm.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for loaded in (
            timm.create_model("pm_deit_tiny_patch16_224", img_size=32, num_classes=7, checkpoint_path=str(path)),
            timm.create_model("pm_deit_tiny_patch16_224", img_size=32, num_classes=7, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=7)),
        ):
            assert [b.M.shape for b in loaded.blocks] == [b.M.shape for b in model.blocks]
            assert torch.equal(loaded.eval()(x), expected)


def test_dense_checkpoint_loads_as_identity(tmp_path):
    dense = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=7).eval()
    path = tmp_path / "dense.pth"
    torch.save(dense.state_dict(), path)
    pm = timm.create_model("pm_deit_tiny_patch16_224", img_size=32, num_classes=7, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), dense(x), rtol=0, atol=1e-5)


class _RecordOps(TorchDispatchMode):
    """Records the pm_kernels custom ops that run, with their last string argument (the attention backend)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "pm_kernels" in str(func):
            self.seen.add((str(func).split(".")[1], args[-1] if args and isinstance(args[-1], str) else None))
        return func(*args, **(kwargs or {}))


# What proves the forced backend ran rather than a silent fallback to torch: the extension's token ops, or the
# attention custom op called with backend "triton" (the Triton token ops launch kernels, no dispatcher op).
_FORCED_BACKEND_OPS = {"cuda": {("merge_fwd", None), ("reconstruct_merge_fwd", None), ("reconstruct_fwd", None)},
                       "triton": {("attention_fwd", "triton")}}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_forced_backends_agree(backend):
    """The compressed model on a forced native backend equals the torch backend, forward and backward: on the
    CPU, Triton runs under the interpreter and "cuda" is the extension's C++ kernels (its attention stays on
    torch)."""
    if not usable(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend!r} cannot run here: {pm_kernels.backends()[backend]}")
    model, _ = random_structure_model(embed_dim=64)  # head dim 32, which the Triton attention supports
    images = torch.randn(2, 3, 16, 16)
    weights = [p for name, p in model.named_parameters() if name.endswith((".M", ".R"))]
    assert weights

    def run(name):
        """Logits and the gradients of the images, every M and R and the patch embedding, on backend ``name``."""
        pm_kernels.set_backend(model, name)
        model.zero_grad()
        x = images.clone().requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        return [out.detach(), x.grad, model.patch_embed.proj.weight.grad] + [p.grad.clone() for p in weights]

    expected = run("torch")
    with _RecordOps() as record:
        got = run(backend)
    assert _FORCED_BACKEND_OPS[backend] <= record.seen, record.seen
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"result {i}: {m}")


# ---------------------------------------------------------------- bad input


def test_patch_rejects_unsupported_models():
    from timm.models.eva import Eva
    from timm.models.vision_transformer import ParallelThingsBlock
    with pytest.raises(TypeError, match="model: expected a timm VisionTransformer, Eva"):
        pm_kernels.patch_timm(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model: expected a timm VisionTransformer, Eva"):
        pm_kernels.patch_timm(timm.create_model("resnet18"))
    with pytest.raises(TypeError, match=r"model.blocks\[0\]: Prune-and-Merge supports Block with Attention"):
        pm_kernels.patch_timm(tiny_vit(block_fn=ParallelThingsBlock))
    eva = dict(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, use_rot_pos_emb=True)
    with pytest.raises(ValueError, match="rotary embedding .*mixed"):
        pm_kernels.patch_timm(Eva(**eva, rope_type="mixed"))
    with pytest.raises(TypeError, match=r"model.blocks\[0\]: .*got EvaBlockPostNorm"):
        pm_kernels.patch_timm(Eva(**eva, use_post_norm=True))
    assert not pm_kernels.is_patched(tiny_vit(block_fn=ParallelThingsBlock))  # a refused model is left as it was


def test_patch_rejects_bad_scores_and_structure():
    model = tiny_vit()
    with pytest.raises(ValueError, match="scores"):
        pm_kernels.patch_timm(model, scores=torch.rand(4, 16))  # 4 layers for a 3-block model
    structure = pm_kernels.search_structure(torch.rand(3, 16) + 0.1)
    with pytest.raises(ValueError, match="scores"):
        pm_kernels.patch_timm(model, structure=structure)
    with pytest.raises(ValueError, match="structure"):
        pm_kernels.patch_timm(model, structure=structure[:2], scores=torch.rand(3, 16) + 0.1)
    with pytest.raises(ValueError, match="grid_size"):
        pm_kernels.patch_timm(model, structure=structure, scores=torch.rand(3, 16) + 0.1, grid_size=(2, 4))
    with pytest.raises(ValueError, match="keep_rate"):
        pm_kernels.compress(model, torch.rand(3, 16), keep_rate=1.2)


def test_fused_block_rejects_bad_shapes():
    block, x, M, R, keep_mask = _block_and_inputs()
    cases = [
        (dict(M=M[:, :-1]), ValueError, "M"), (dict(M=torch.randn(10, 9)), ValueError, "M"),
        (dict(R=R.t()), ValueError, "R"), (dict(R=R[:, :-1]), ValueError, "R"),
        (dict(keep_mask=keep_mask[:-1]), ValueError, "keep_mask"),
        (dict(keep_mask=keep_mask.float()), TypeError, "keep_mask"),
        (dict(x=x[0]), ValueError, "x"), (dict(M=M.long()), TypeError, "M"),
    ]
    for change, error, match in cases:
        args = {**dict(x=x, M=M, R=R, keep_mask=keep_mask), **change}
        with pytest.raises(error, match=match):
            pm_kernels.fused_block(args["x"], block, args["M"], args["R"], args["keep_mask"])
    with pytest.raises(ValueError, match="backend"):
        pm_kernels.fused_block(x, block, M, R, keep_mask, backend="cudnn")


def test_calibrate_rejects_wrong_models_and_batches():
    with pytest.raises(TypeError, match=r"model: Linear is not a model of a library pm_kernels supports"):
        pm_kernels.calibrate(torch.nn.Linear(3, 3), [])
    unpatched = tiny_vit()
    with pytest.raises(ValueError, match="batches"):  # patched on the way (the identity: nothing it computes changes)
        pm_kernels.calibrate(unpatched, [])
    assert pm_kernels.is_patched(unpatched)
    compressed, _ = random_structure_model()
    with pytest.raises(ValueError, match="dense"):
        pm_kernels.calibrate(compressed, [])
    dense = pm_kernels.patch_timm(tiny_vit())
    with pytest.raises(ValueError, match="batches"):
        pm_kernels.calibrate(dense, [])
    with pytest.raises(TypeError, match="batches: batch 0: expected images .* got a 3-tuple"):
        pm_kernels.calibrate(dense, [(torch.randn(2, 3, 16, 16),) * 3])
    scores = pm_kernels.calibrate(dense, [torch.randn(2, 3, 16, 16)])  # images alone: the head's pseudo-labels
    assert scores.shape == (3, 16) and torch.isfinite(scores).all()
    batch = (torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same image size"):
        pm_kernels.calibrate(pm_kernels.patch_timm(tiny_vit(dynamic_img_size=True)),
                             [batch, (torch.randn(2, 3, 24, 24), torch.tensor([0, 1]))])
