"""Attention benchmarks (pytest-benchmark; needs a CUDA GPU): ``pytest bench/test_bench_attention.py --benchmark-only``.

ViT-S/16 shapes (B=256, H=6, D=64, bf16) at N = 197 (224²), 577 (384²), 785 (448²):

- ``sdpa_fwd`` / ``ours_fwd``: inference forward, PyTorch SDPA (flash backend) vs our Triton kernel.
- ``sdpa_fwd_bwd``: SDPA forward + backward (no score possible).
- ``ours_fwd_bwd_score``: our forward + backward, accumulating the gradient-weighted key score.
- ``eager_hook_fwd_bwd_score``: the authors' way: materialised softmax, a hook on it adds Σ A ⊙ ∂L/∂A.

SAM's attention with its decomposed relative-position bias (``test_bench_attention_rel_pos``; ViT-B: H=12, D=64, bf16):
windowed blocks (200 windows of 14 × 14 = 8 images at 1024², N = 196, G = 14) and global blocks (8 images, 64 × 64,
N = 4096, G = 64), token positions shuffled (as merged tokens have them), forward + backward with every gradient
(q, k, v and the bias tables):

- ``sdpa_materialised_bias_fwd_bwd``: what SAM does, the (B, H, N, N) bias gathered from the tables, then SDPA
  (PyTorch's choice of kernel for a bias that needs a gradient).
- ``ours_rel_pos_fwd_bwd``: ``pm_kernels.attention`` with the tables and key indices (Triton, no N×N tensor).
  GPU target (issue 26): at most 1.3 × the SDPA case.

Each records its peak CUDA memory above the inputs (``torch.cuda.max_memory_allocated``) in
``benchmark.extra_info["peak_mem_mib"]``.
"""
import pytest
import torch
import torch.nn.functional as F

from pm_kernels.attention import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="attention benchmarks need a CUDA GPU")

B, H, D = 256, 6, 64
DTYPE = torch.bfloat16
SEQ_LENS = (197, 577, 785)


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _eager_with_hook(q, k, v, score):
    attn = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
    if attn.requires_grad:
        def hook(grad):
            score.add_((attn * grad).float().sum(dim=(0, 1, 2)))  # returns None: the grad is unchanged
        attn.register_hook(hook)
    return attn @ v


def _make(n: int, requires_grad: bool):
    g = torch.Generator(device="cuda").manual_seed(n)
    # timm layout: q, k, v are strided views of one (B, N, 3, H, D) activation.
    qkv = torch.randn(B, n, 3, H, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_(requires_grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=g)
    return qkv, q, k, v, do


def _case(kind: str, n: int):
    """A no-argument function running one step of ``kind`` (it keeps its tensors alive)."""
    needs_grad = kind.endswith("bwd") or kind.endswith("score")
    qkv, q, k, v, do = _make(n, needs_grad)
    score = torch.zeros(n, device="cuda", dtype=torch.float32)

    if kind == "sdpa_fwd":
        def step():
            with torch.no_grad():
                _sdpa_flash(q, k, v)
    elif kind == "ours_fwd":
        def step():
            with torch.no_grad():
                attention(q, k, v, backend="triton")
    elif kind == "sdpa_fwd_bwd":
        def step():
            qq, kk, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            torch.autograd.grad(_sdpa_flash(qq, kk, vv), (qkv,), do)
    elif kind == "ours_fwd_bwd_score":
        def step():
            qq, kk, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            torch.autograd.grad(attention(qq, kk, vv, score=score, backend="triton"), (qkv,), do)
    elif kind == "eager_hook_fwd_bwd_score":
        def step():
            qq, kk, vv = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            torch.autograd.grad(_eager_with_hook(qq, kk, vv, score), (qkv,), do)
    else:
        raise ValueError(kind)
    return step


KINDS = ("sdpa_fwd", "ours_fwd", "sdpa_fwd_bwd", "ours_fwd_bwd_score", "eager_hook_fwd_bwd_score")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SEQ_LENS)
def test_bench_attention(benchmark, n, kind):
    torch.cuda.empty_cache()
    _measure(benchmark, _case(kind, n), f"attention B={B} H={H} N={n} D={D} bf16",
             {"kind": kind, "B": B, "H": H, "N": n, "D": D})


def _measure(benchmark, step, group: str, info: dict):
    """Run ``step`` (synchronised) once to compile / autotune, once for its peak memory above the inputs, then 20
    timed rounds."""
    def fn():
        step()
        torch.cuda.synchronize()

    fn()  # compile / autotune outside the measurements
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    peak = torch.cuda.max_memory_allocated() - base

    benchmark.group = group
    benchmark.extra_info.update(info, dtype=str(DTYPE).replace("torch.", ""), peak_mem_mib=round(peak / 2**20, 1),
                                device=torch.cuda.get_device_name())
    benchmark.pedantic(fn, rounds=20, warmup_rounds=3, iterations=1)


# (label, batch, N, grid side): SAM ViT-B at 1024², 8 images.
SAM_CASES = (("window", 200, 196, 14), ("global", 8, 4096, 64))
SAM_H = 12
REL_POS_KINDS = ("sdpa_materialised_bias_fwd_bwd", "ours_rel_pos_fwd_bwd")


def _rel_pos_case(kind: str, batch: int, n: int, grid: int):
    g = torch.Generator(device="cuda").manual_seed(n)
    qkv = torch.randn(batch, n, 3, SAM_H, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
    tables = [(torch.randn(batch, SAM_H, n, grid, device="cuda", dtype=DTYPE, generator=g) * 0.5).requires_grad_()
              for _ in range(2)]
    position = torch.randperm(n, device="cuda", generator=g) % (grid * grid)
    key_h, key_w = position // grid, position % grid
    do = torch.randn(batch, SAM_H, n, D, device="cuda", dtype=DTYPE, generator=g)
    leaves = (qkv, *tables)

    if kind == "sdpa_materialised_bias_fwd_bwd":
        def step():
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            bias_h, bias_w = tables
            bias = bias_h[..., key_h] + bias_w[..., key_w]  # (B, H, N, N): gathered, as SAM's broadcast add
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), leaves, do)
    elif kind == "ours_rel_pos_fwd_bwd":
        def step():
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = attention(q, k, v, bias_h=tables[0], bias_w=tables[1], key_h=key_h, key_w=key_w, backend="triton")
            torch.autograd.grad(out, leaves, do)
    else:
        raise ValueError(kind)
    return step


@pytest.mark.parametrize("kind", REL_POS_KINDS)
@pytest.mark.parametrize("case", SAM_CASES, ids=lambda c: c[0])
def test_bench_attention_rel_pos(benchmark, case, kind):
    label, batch, n, grid = case
    torch.cuda.empty_cache()
    _measure(benchmark, _rel_pos_case(kind, batch, n, grid),
             f"SAM attention, decomposed bias, {label}: B={batch} H={SAM_H} N={n} D={D} G={grid} bf16",
             {"kind": kind, "B": batch, "H": SAM_H, "N": n, "D": D, "G": grid})
