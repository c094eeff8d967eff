"""Peers for the side-by-side benchmark (bench/peers): ToMe, EViT, and the analytic FLOPs counter."""
import copy
import os
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: bench

from bench.peers import (default_locations, dense_flops, dims_from_config, evit_flops,  # noqa: E402
                         dims_from_model, match_evit_keep_rate, match_tome_r, patch_evit, patch_tome, tome_flops,
                         vit_flops)
from bench.peers.flops import evit_token_counts, tome_token_counts  # noqa: E402
from bench.peers.tome import bipartite_soft_matching, merge_wavg  # noqa: E402

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
N_TINY = 1 + (32 // 4) ** 2   # 65


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return VisionTransformer(**TINY).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- exactness
def test_tome_r0_equals_dense(tiny, images):
    with torch.no_grad():
        ref = tiny(images)
        out = patch_tome(copy.deepcopy(tiny), r=0)(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_evit_keep1_equals_dense(tiny, images):
    with torch.no_grad():
        ref = tiny(images)
        out = patch_evit(copy.deepcopy(tiny), keep_rate=1.0)(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_leaves_parameters_alone(tiny):
    names = [n for n, _ in tiny.named_parameters()]
    assert [n for n, _ in patch_tome(copy.deepcopy(tiny), 4).named_parameters()] == names
    assert [n for n, _ in patch_evit(copy.deepcopy(tiny), 0.5).named_parameters()] == names
    patch_tome(copy.deepcopy(tiny), 4).load_state_dict(tiny.state_dict())   # dense checkpoint loads


# ------------------------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("r", [0, 3, 8, [10, 0, 5, 40], 100])
def test_tome_token_counts_match_schedule(tiny, images, r):
    model = patch_tome(copy.deepcopy(tiny), r)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 10)
    expected = [n_mlp for _, n_mlp in tome_token_counts(N_TINY, 4, r)]
    assert model._tome_info["tokens"] == expected
    if r == 8:
        assert expected == [57, 49, 41, 33]


@pytest.mark.parametrize("keep,locations", [(0.7, None), (0.5, [1, 3]), ([0.9, 0.3], [0, 2]), (0.05, [0])])
def test_evit_token_counts_match_schedule(tiny, images, keep, locations):
    model = patch_evit(copy.deepcopy(tiny), keep, locations)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 10)
    locs = default_locations(4) if locations is None else locations
    expected = [n_mlp for _, n_mlp in evit_token_counts(N_TINY, 4, keep, locs)]
    assert model._evit_info["tokens"] == expected


def test_evit_default_locations():
    assert default_locations(12) == [3, 6, 9]
    assert evit_token_counts(197, 12, 0.7, [3, 6, 9])[3] == (197, 1 + 138 + 1)   # ceil(0.7·196 = 137.2)
    assert evit_token_counts(197, 12, 0.5, [3, 6, 9])[3] == (197, 1 + 98 + 1)


# ------------------------------------------------------------------------------------------ merge details
def test_tome_merge_is_size_weighted_and_protects_cls():
    torch.manual_seed(2)
    x = torch.randn(3, 11, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 11, 1)).double()
    merge = bipartite_soft_matching(torch.randn(3, 11, 4, dtype=torch.float64), r=4, protect_first=1)
    y, s = merge_wavg(merge, x, size)
    assert y.shape == (3, 7, 5) and s.shape == (3, 7, 1)
    torch.testing.assert_close(s.sum(1), size.sum(1))                      # sizes add up
    torch.testing.assert_close((y * s).sum(1), (x * size).sum(1))          # mass is conserved
    torch.testing.assert_close(y[:, 0], x[:, 0])                           # CLS untouched, first
    assert bipartite_soft_matching(torch.randn(1, 3, 4), r=5) is not None  # clipped to (3-1)//2 = 1
    assert bipartite_soft_matching(torch.randn(1, 2, 4), r=5) is None      # nothing left to merge


def test_tome_merges_the_most_similar_pair():
    # official split: A = CLS, 2, 4; B = 1, 3 (tests/test_tome_split.py); A token 4 is B token 3's twin.
    metric = torch.tensor([[[1., 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]])
    x = torch.arange(5.).view(1, 5, 1)
    y, s = merge_wavg(bipartite_soft_matching(metric, r=1), x, None)
    # out: CLS, unmerged A (token 2), B tokens (1, 3 merged with 4)
    torch.testing.assert_close(y.flatten(), torch.tensor([0., 2., 1., 3.5]))
    torch.testing.assert_close(s.flatten(), torch.tensor([1., 1., 1., 2.]))


def test_evit_fused_token_is_cls_attention_weighted(tiny):
    model = patch_evit(copy.deepcopy(tiny), 0.5, [0])
    blk = model.blocks[0]
    x = torch.randn(1, 5, 48)
    a = torch.tensor([[0.2, 0.1, 0.4, 0.05, 0.25]])        # CLS attention over CLS + 4 patches
    y = blk._reorganise(x, a, 0.5)                           # keep 2 of 4 patches: 2 (0.4) and 4 (0.25)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    torch.testing.assert_close(y[:, 1:3], x[:, [2, 4]])      # raster order
    torch.testing.assert_close(y[:, 3], 0.1 * x[:, 1] + 0.05 * x[:, 3])


def _patched(model, patch):
    return patch_tome(model, 8) if patch == "tome" else patch_evit(model, 0.5)


@pytest.mark.parametrize("patch", ["tome", "evit"])
def test_peers_train(tiny, images, patch):
    """Every parameter gets a gradient, and the gradients are the derivative of the forward: against a central
    finite difference along a random direction, in float64 (no merge or keep decision flips at ±1e-6)."""
    model = _patched(copy.deepcopy(tiny).double().train(), patch)
    x = images.double()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return model(x).logsumexp(-1).sum()

    loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-6
    with torch.no_grad():
        values = []
        for step in (eps, -2 * eps, eps):  # θ + εd, θ − εd, back to θ
            for p, d in zip(params, direction):
                p.add_(step * d)
            values.append(loss().item())
    numeric = (values[0] - values[1]) / (2 * eps)
    # Measured: ToMe 3e-8 relative; EViT 1e-5, as it ranks and weights tokens by a float32 CLS attention even in
    # a float64 model. A detached merge or fused-token weight is off by 1.7e-4 (EViT) to 2e-2 (ToMe).
    tol = 1e-6 if patch == "tome" else 5e-5
    assert abs(analytic - numeric) <= tol * abs(numeric), (analytic, numeric)


# ------------------------------------------------------------------------------------------------- FLOPs
def test_flops_deit_small_by_hand():
    N, C, L = 197, 384, 12
    block = 3 * N * C * C + 2 * N * N * C + N * C * C + 8 * N * C * C
    by_hand = (196 * 768 * C + L * block + C * 1000) / 1e9
    got = dense_flops(dims_from_config(224, 16, 384, 12, 6))
    assert got == pytest.approx(by_hand, rel=1e-12)
    assert got == pytest.approx(4.6, abs=0.05)                       # DeiT-S "4.6 GFLOPs" (1 MAC = 1 FLOP)
    assert dense_flops(dims_from_config(224, 16, 384, 12, 6), mac_factor=2) == pytest.approx(2 * by_hand)
    assert dense_flops(dims_from_config(224, 16, 192, 12, 3)) == pytest.approx(1.3, abs=0.06)
    assert dense_flops(dims_from_config(224, 16, 768, 12, 12)) == pytest.approx(17.6, abs=0.1)


def test_flops_tiny_config_by_hand(tiny):
    N, C = 65, 48
    block = 3 * N * C * C + 2 * N * N * C + N * C * C + 2 * N * C * 4 * C
    by_hand = (64 * 48 * C + 4 * block + C * 10) / 1e9
    assert dense_flops(tiny) == pytest.approx(by_hand, rel=1e-12)
    # per-layer counts: attention on n_attn, MLP on n_mlp
    n_a, n_m = 65, 40
    blk = 3 * n_a * C * C + 2 * n_a * n_a * C + n_a * C * C + 8 * n_m * C * C
    assert vit_flops(tiny, [65, 65, 65, (n_a, n_m)]) == pytest.approx(by_hand - (block - blk) / 1e9, rel=1e-12)


def test_flops_tome_evit_by_counts(tiny):
    d = tiny
    assert tome_flops(d, 0) == pytest.approx(dense_flops(d))
    assert evit_flops(d, 1.0, [1, 2]) == pytest.approx(dense_flops(d))
    assert tome_flops(d, 8, include_overheads=False) == pytest.approx(vit_flops(d, tome_token_counts(65, 4, 8)))
    assert tome_flops(d, 8) > tome_flops(d, 8, include_overheads=False)


def _pm_formula(d, ks):
    """PM's MACs written out: the blocks on K tokens, plus the merge K×N×C and reconstruct N×K×C of each block with
    K < N (a block with K = N is the plain block)."""
    d = d if hasattr(d, "num_tokens") else dims_from_model(d)
    extra = sum(2 * k * d.num_tokens * d.embed_dim for k in ks if k < d.num_tokens)
    return vit_flops(d, ks, extra_macs=extra)


def test_pm_macs_are_the_peers_formula(tiny):
    """The peers are matched to the MACs the PM model is reported with (pm_kernels.measure): the two counts are
    the same formula, so a matched ToMe / EViT does exactly the PM model's MACs by its own analytic count."""
    from pm_kernels import compress
    from pm_kernels.measure import analytic_macs, kept_tokens
    model = copy.deepcopy(tiny)
    assert analytic_macs(model) / 1e9 == pytest.approx(dense_flops(tiny), rel=1e-12)   # plain blocks: dense
    scores = torch.rand(4, N_TINY - 1, generator=torch.Generator().manual_seed(0)) + 0.01
    compress(model, scores, keep_rate=0.6, prune_rate=0.1, layers=[0, 1, 3])
    ks = kept_tokens(model)
    assert ks[2] == N_TINY and all(k < N_TINY for k in ks[:2] + ks[3:])
    assert analytic_macs(model) / 1e9 == pytest.approx(_pm_formula(tiny, ks), rel=1e-12)
    assert analytic_macs(model) / 1e9 < dense_flops(tiny)


# ---------------------------------------------------------------------------------------- FLOPs matching
@pytest.mark.parametrize("name,dim,heads", [("T", 192, 3), ("S", 384, 6), ("B", 768, 12)])
@pytest.mark.parametrize("keep", [0.6, 0.4])
def test_matching_lands_on_target(name, dim, heads, keep):
    d = dims_from_config(224, 16, dim, 12, heads)
    target = _pm_formula(d, [1 + round(keep * 196)] * 12)
    r, g = match_tome_r(d, target)
    assert g == pytest.approx(tome_flops(d, r)) and g == pytest.approx(target, rel=0.02)
    keep_rate, g = match_evit_keep_rate(d, target, [3, 6, 9])
    assert g == pytest.approx(evit_flops(d, keep_rate, [3, 6, 9])) and g == pytest.approx(target, rel=0.02)
    r_const, g_const = match_tome_r(d, target, constant=True)
    assert isinstance(r_const, int) and g_const == pytest.approx(target, rel=0.05)


# ------------------------------------------------------------------------------------- benchmark script
def test_compare_replot_and_table(tmp_path, capsys):
    import json
    from bench import compare
    args = compare.parse_args(["--device", "cpu"])
    assert (args.batch, args.dtype, args.models, args.keep_rates) == (8, "fp32", ["deit_tiny"], [0.6, 0.4])
    rows = [dict(model="deit_tiny", method="dense", keep_rate=None, gflops=1.25, gflops_vs_dense=1.0,
                 images_per_s=10.0, images_per_s_runs=[9.0, 10.0, 11.0], speedup_vs_dense=1.0),
            dict(model="deit_tiny", method="tome", keep_rate=0.6, gflops=0.83, gflops_vs_dense=0.66,
                 images_per_s=14.0, images_per_s_runs=[14.0], speedup_vs_dense=1.4),
            dict(model="deit_tiny", method="pm-kernels", keep_rate=0.6, gflops=0.83, gflops_vs_dense=0.66,
                 error="RuntimeError: x")]
    env = dict(label="CPU", device_type="cpu", device_name="cpu", batch=8, dtype="fp32", repeats=3,
               versions={"torch": torch.__version__}, loadavg_start=[1.0, 1.0, 1.0], cpu_count=2, cpu_threads=2)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"env": env, "rows": rows, "notes": ["n"]}))
    compare.main(["--replot", str(path)])
    assert (tmp_path / "r.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "[CPU]" in out and "ERROR" in out and "9.0-11.0" in out


def test_tome_proportional_attention(tiny):
    model = patch_tome(copy.deepcopy(tiny), 0)
    attn = model.blocks[0].attn
    torch.manual_seed(3)
    x = torch.randn(2, 7, 48)
    size = torch.randint(1, 5, (2, 7, 1)).float()
    out, metric = attn(x, size=size)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * 16 ** -0.5 + size.log()[:, None, None, :, 0]
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metric, k.mean(1))


@pytest.mark.parametrize("patch", ["tome", "evit"])
def test_peers_run_in_bfloat16(tiny, images, patch):
    """bf16 follows fp32: the same tokens per block, the output within bf16 rounding (measured norm-wise: ToMe
    0.8 %, EViT 1.9 %, the dense model 0.6 %; ToMe without its proportional attention in bf16: 6.6 %)."""
    fp32, bf16 = _patched(copy.deepcopy(tiny), patch), _patched(copy.deepcopy(tiny).to(torch.bfloat16), patch)
    with torch.inference_mode():
        want, out = fp32(images), bf16(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    info = "_tome_info" if patch == "tome" else "_evit_info"
    assert getattr(bf16, info)["tokens"] == getattr(fp32, info)["tokens"]
    err = ((out.double() - want.double()).norm() / want.double().norm()).item()
    assert err <= (2e-2 if patch == "tome" else 4e-2), err
