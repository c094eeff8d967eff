"""``optimize``: folded boundaries equal the unfolded PM model; static shapes compile without graph breaks."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import pm_kernels


def trained_like_pm_model(global_pool="token", seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5,
                              global_pool=global_pool).eval()
    pm_kernels.compress(model, torch.rand(4, 64) + 0.1, keep_rate=0.5, prune_rate=0.2)
    with torch.no_grad():  # M and R move away from their initial values during fine-tuning
        for blk in model.blocks:
            blk.M.add_(0.05 * torch.randn_like(blk.M))
            blk.R.add_(0.05 * torch.randn_like(blk.R))
    return model


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_optimized_equals_model(global_pool):
    model = trained_like_pm_model(global_pool)
    fast = pm_kernels.optimize(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
    # The folded state carries K_l + p_l tokens, never all N (except at the exit of an avg-pool head).
    n = model.blocks[0].keep_mask.numel()
    widths = [fast.get_buffer(f"W{i}").shape[1] for i in range(1, len(model.blocks) + 1)]
    assert all(w < n for w in widths)
    assert fast.get_buffer(f"W{len(model.blocks)}").shape[0] == n and fast.W_exit_prefix.shape[0] == 1
    assert fast._head_reads_prefix_only() == (global_pool == "token")


def test_optimized_identity_model_equals_dense():
    torch.manual_seed(0)
    dense = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = dense(x)
        torch.testing.assert_close(pm_kernels.optimize(pm_kernels.patch_timm(dense))(x), expected,
                                   rtol=1e-5, atol=1e-5)


def test_optimized_compiles_fullgraph():
    model = trained_like_pm_model()
    fast = pm_kernels.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_optimized_half_precision_dtype():
    model = trained_like_pm_model()
    fast = pm_kernels.optimize(model.to(torch.bfloat16))
    assert fast.W0.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.float()(x)
        torch.testing.assert_close(fast.to(torch.bfloat16)(x.bfloat16()).float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_optimized_cuda_graph_capture():
    model = trained_like_pm_model().cuda()
    fast = pm_kernels.optimize(model)
    static_x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = model(static_x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fast(static_x)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fast(static_x)
        graph.replay()
        torch.testing.assert_close(static_out, expected, rtol=1e-4, atol=1e-4)


def test_optimize_rejects_unpatched_and_bad_dtype():
    with pytest.raises(TypeError, match="model"):
        pm_kernels.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype"):
        pm_kernels.optimize(trained_like_pm_model(), dtype=torch.int8)
