"""Tests of the compiled extension pm_kernels._C (backend "cuda"; csrc/, pm_kernels/_extension.py).

Skipped when the extension is not built (`pip install --no-build-isolation -e .`). On CPU tensors the ops
run the C++ kernels; on CUDA tensors (when a GPU is present and the extension was built with CUDA) the CUDA
kernels. Checked against the tests' float64 formulas (tests/formulas.py): forward and gradients (x, z, M, R,
M_next) through pm_kernels.token_ops(..., backend="cuda"), fp64 gradcheck, torch.library.opcheck (schema,
autograd registration, fake tensors, AOT dispatch with dynamic shapes), torch.compile tracing and the
native input checks.
"""
import pytest
import torch

_C = pytest.importorskip("pm_kernels._C", reason="native extension pm_kernels._C not built")

import formulas  # noqa: E402
from helpers import assert_close, dtype_pairs, leaf, token_op_inputs  # noqa: E402
from pm_kernels import _extension as ext  # noqa: E402
from pm_kernels import token_ops  # noqa: E402

OPS = torch.ops.pm_kernels
HAS_GPU = torch.cuda.is_available() and bool(getattr(_C, "WITH_CUDA", False))

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_GPU, reason="needs a CUDA device and an extension built with CUDA")]),
]

DTYPES = dtype_pairs("fp32", "fp64", "fp16", "bf16", "bf16-x_fp32-MR", "fp16-x_fp32-MR")

# (B, N, K, K_next, C)
SHAPES = [
    pytest.param(2, 5, 1, 5, 8, id="B2-N5-K1-Kn5-C8"),
    pytest.param(2, 17, 3, 1, 40, id="B2-N17-K3-Kn1-C40"),
    pytest.param(3, 17, 17, 6, 33, id="B3-N17-K17-Kn6-C33"),
    pytest.param(1, 50, 12, 30, 8, id="B1-N50-K12-Kn30-C8"),
]


def _inputs(B, N, K, Kn, C, dtype, wdtype, device, seed=0):
    return token_op_inputs(B, N, K, Kn, C, dtype, wdtype, device, seed)


def _f64(t, dtype=None):
    """float64 CPU leaf of an op input; weights rounded to the activations' ``dtype`` first (autocast-style)."""
    if not t.is_floating_point():
        return t.cpu()
    return t.detach().to(dtype or t.dtype).double().cpu().requires_grad_(True)


def _weights_like(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]


def _check_grads(names, leaves, ref_leaves, dtype):
    for name, a, b in zip(names, leaves, ref_leaves):
        assert a.grad is not None, f"d{name} missing"
        assert a.grad.dtype == a.dtype, f"d{name}: dtype {a.grad.dtype}, expected {a.dtype}"
        assert a.grad.device == a.device
        assert_close(f"d{name}", a.grad, b.grad, dtype)


# ---- forward + backward against the float64 reference, through the public ops ------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,wdtype", DTYPES)
@pytest.mark.parametrize("B,N,K,Kn,C", SHAPES)
def test_merge(B, N, K, Kn, C, dtype, wdtype, device):
    x, _, M, _, _, _ = _inputs(B, N, K, Kn, C, dtype, wdtype, device)
    x, M = leaf(x), leaf(M)
    out = token_ops.merge(x, M, backend="cuda")
    assert out.dtype == dtype and out.device == x.device and out.shape == (B, K, C)
    x64, M64 = _f64(x), _f64(M, dtype)
    want = formulas.merge(x64, M64)
    assert_close("z", out, want, dtype)
    (w,) = _weights_like([out])
    (out * w).sum().backward()
    (want * w.double().cpu()).sum().backward()
    _check_grads("xM", (x, M), (x64, M64), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,wdtype", DTYPES)
@pytest.mark.parametrize("B,N,K,Kn,C", SHAPES)
def test_reconstruct(B, N, K, Kn, C, dtype, wdtype, device):
    x, z, _, R, _, keep = _inputs(B, N, K, Kn, C, dtype, wdtype, device)
    x, z, R = leaf(x), leaf(z), leaf(R)
    out = token_ops.reconstruct(z, R, x, keep, backend="cuda")
    assert out.dtype == dtype and out.shape == (B, N, C)
    x64, z64, R64 = _f64(x), _f64(z), _f64(R, dtype)
    want = formulas.reconstruct(z64, R64, x64, keep.cpu())
    assert_close("x'", out, want, dtype)
    (w,) = _weights_like([out])
    (out * w).sum().backward()
    (want * w.double().cpu()).sum().backward()
    _check_grads("zRx", (z, R, x), (z64, R64, x64), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,wdtype", DTYPES)
@pytest.mark.parametrize("B,N,K,Kn,C", SHAPES)
@pytest.mark.parametrize("use", ["both", "x_next", "z_next"])
def test_reconstruct_merge(B, N, K, Kn, C, dtype, wdtype, device, use):
    x, z, _, R, Mn, keep = _inputs(B, N, K, Kn, C, dtype, wdtype, device)
    x, z, R, Mn = leaf(x), leaf(z), leaf(R), leaf(Mn)
    x_next, z_next = token_ops.reconstruct_merge(z, R, x, keep, Mn, backend="cuda")
    assert x_next.dtype == dtype and z_next.dtype == dtype
    assert x_next.shape == (B, N, C) and z_next.shape == (B, Kn, C)
    x64, z64, R64, Mn64 = _f64(x), _f64(z), _f64(R, dtype), _f64(Mn, dtype)
    want_x, want_z = formulas.reconstruct_merge(z64, R64, x64, keep.cpu(), Mn64)
    assert_close("x'", x_next, want_x, dtype)
    assert_close("z'", z_next, want_z, dtype)
    # The fused z' is M_next applied to x' as stored: it matches the unfused merge of x'.
    assert_close("z' vs merge(x')", z_next, ext.merge(x_next.detach(), Mn.detach()), dtype)

    wx, wz = _weights_like([x_next, z_next])
    pairs = {"both": [(x_next, want_x, wx), (z_next, want_z, wz)], "x_next": [(x_next, want_x, wx)],
             "z_next": [(z_next, want_z, wz)]}[use]
    sum((o * w).sum() for o, _, w in pairs).backward()
    sum((r * w.double().cpu()).sum() for _, r, w in pairs).backward()
    if use == "x_next":  # M_next does not touch x'
        assert Mn.grad is None or Mn.grad.abs().max().item() == 0
        _check_grads("zRx", (z, R, x), (z64, R64, x64), dtype)
    else:
        _check_grads(["z", "R", "x", "M_next"], (z, R, x, Mn), (z64, R64, x64, Mn64), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_partial_requires_grad(device):
    """Only some inputs need a gradient (frozen M/R, or frozen activations)."""
    x, z, M, R, Mn, keep = _inputs(2, 9, 4, 3, 16, torch.float32, torch.float32, device)
    R = leaf(R)
    x_next, z_next = ext.reconstruct_merge(z, R, x, keep, Mn)
    z_next.sum().backward()
    R64 = _f64(R)
    formulas.reconstruct_merge(_f64(z), R64, _f64(x), keep.cpu(), _f64(Mn))[1].sum().backward()
    assert_close("dR", R.grad, R64.grad, torch.float32)
    x = leaf(x)
    ext.merge(x, M).sum().backward()
    assert_close("dx", x.grad, M.double().cpu().sum(0)[None, :, None].expand(2, 9, 16), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, z, M, R, Mn, keep = _inputs(2, 11, 5, 4, 12, torch.float32, torch.float32, device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)
    Mt, Rt, Mnt = M.t().contiguous().t(), R.t().contiguous().t(), Mn.t().contiguous().t()
    assert not xt.is_contiguous() and not Mt.is_contiguous()
    assert_close("merge", ext.merge(xt, Mt), formulas.merge(x.double(), M.double()), torch.float32)
    got = ext.reconstruct_merge(zt, Rt, xt, keep, Mnt)
    want = formulas.reconstruct_merge(z.double(), R.double(), x.double(), keep, Mn.double())
    for name, a, b in zip(("x'", "z'"), got, want):
        assert_close(name, a, b, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_identity_block_passthrough(device):
    """M = R = I, m = 1: reconstruct(merge(x)) == x, and a pruned token passes by the shortcut exactly."""
    x, _, _, _, _, _ = _inputs(2, 7, 7, 7, 10, torch.bfloat16, torch.float32, device)
    eye = torch.eye(7, device=device)
    keep = torch.ones(7, dtype=torch.bool, device=device)
    z = ext.merge(x, eye)
    assert torch.equal(z, x)
    x_next, z_next = ext.reconstruct_merge(z, eye, x, keep, eye)
    assert torch.equal(x_next, x) and torch.equal(z_next, x)
    keep[3] = False
    R = eye.clone()
    R[3] = 0
    out = ext.reconstruct(torch.zeros_like(x), R, x, keep)
    assert torch.equal(out[:, 3], x[:, 3]) and out[:, :3].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, z, M, R, Mn, keep = _inputs(0, 6, 3, 2, 8, torch.float32, torch.float32, device)
    assert ext.merge(x, M).shape == (0, 3, 8)
    x_next, z_next = ext.reconstruct_merge(z, R, x, keep, Mn)
    assert x_next.shape == (0, 6, 8) and z_next.shape == (0, 2, 8)
    assert OPS.matrix_grad(x, x, torch.float32).abs().max() == 0


# ---- fp64 gradcheck of the registered autograd formulas -----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x, z, M, R, Mn, keep = _inputs(2, 6, 3, 4, 5, torch.float64, torch.float64, device)
    x, z, M, R, Mn = map(leaf, (x, z, M, R, Mn))
    assert torch.autograd.gradcheck(lambda x, M: ext.merge(x, M), (x, M))
    assert torch.autograd.gradcheck(lambda z, R, x: ext.reconstruct(z, R, x, keep), (z, R, x))
    assert torch.autograd.gradcheck(lambda z, R, x, Mn: ext.reconstruct_merge(z, R, x, keep, Mn), (z, R, x, Mn))


# ---- torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch -----------------------

def _opcheck_cases(device):
    x, z, M, R, Mn, keep = _inputs(2, 7, 3, 4, 6, torch.float32, torch.float32, device)
    xb, zb = x.bfloat16(), z.bfloat16()
    g = lambda t: leaf(t)  # noqa: E731
    return [
        ("merge_fwd", (g(x), g(M))),
        ("merge_fwd", (g(xb), g(M))),
        ("reconstruct_fwd", (g(z), g(R), g(x), keep)),
        ("reconstruct_merge_fwd", (g(z), g(R), g(x), keep, g(Mn))),
        ("reconstruct_merge_fwd", (g(zb), g(R), g(xb), keep, g(Mn))),
        ("transposed_apply", (M, z, None)),
        ("transposed_apply", (M, z, x)),
        ("matrix_grad", (z, x, torch.float32)),
        ("matrix_grad", (zb, xb, torch.float32)),
    ]


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs torch >= 2.4")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_cases(device):
        torch.library.opcheck(getattr(OPS, name).default, args)


def test_meta_shapes():
    x = torch.empty(2, 9, 16, device="meta", dtype=torch.bfloat16)
    z = torch.empty(2, 4, 16, device="meta", dtype=torch.bfloat16)
    M, R, Mn = (torch.empty(s, device="meta") for s in ((4, 9), (9, 4), (3, 9)))
    keep = torch.empty(9, dtype=torch.bool, device="meta")
    assert OPS.merge_fwd(x, M).shape == (2, 4, 16)
    assert OPS.reconstruct_fwd(z, R, x, keep).shape == (2, 9, 16)
    a, b = OPS.reconstruct_merge_fwd(z, R, x, keep, Mn)
    assert a.shape == (2, 9, 16) and b.shape == (2, 3, 16) and b.dtype == torch.bfloat16
    assert OPS.transposed_apply(M, z, x).shape == (2, 9, 16)
    t = OPS.matrix_grad(z, x, torch.float32)
    assert t.shape == (4, 9) and t.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces(device):
    """The ops trace under torch.compile (fake tensors, dynamic shapes, autograd) without graph breaks."""
    x, z, M, R, Mn, keep = _inputs(2, 8, 3, 5, 6, torch.float32, torch.float32, device)

    def boundary(z, R, x, keep, Mn):
        x_next, z_next = ext.reconstruct_merge(z, R, x, keep, Mn)
        return x_next.sum() + z_next.square().sum()

    compiled = torch.compile(boundary, backend="aot_eager", fullgraph=True, dynamic=True)
    leaves = [leaf(t) for t in (z, R, x, Mn)]
    compiled(leaves[0], leaves[1], leaves[2], keep, leaves[3]).backward()
    eager = [leaf(t) for t in (z, R, x, Mn)]
    boundary(eager[0], eager[1], eager[2], keep, eager[3]).backward()
    for a, b in zip(leaves, eager):
        assert_close("compiled grad", a.grad, b.grad, torch.float32)


# ---- native input checks (the ops called directly, bypassing token_ops' Python checks) ----------------------

def test_native_input_checks():
    x, z, M, R, Mn, keep = _inputs(2, 6, 3, 4, 5, torch.float32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="M must have shape"):
        OPS.merge_fwd(x, M[:, :5])
    with pytest.raises(RuntimeError, match="3-D"):
        OPS.merge_fwd(x[0], M)
    with pytest.raises(RuntimeError, match="keep_mask must be bool"):
        OPS.reconstruct_fwd(z, R, x, keep.float())
    with pytest.raises(RuntimeError, match="keep_mask must have shape"):
        OPS.reconstruct_fwd(z, R, x, keep[:5])
    with pytest.raises(RuntimeError, match="share a dtype"):
        OPS.reconstruct_fwd(z.double(), R, x, keep)
    with pytest.raises(RuntimeError, match="R must have shape"):
        OPS.reconstruct_merge_fwd(z, R[:, :2], x, keep, Mn)
    with pytest.raises(RuntimeError, match="float16/bfloat16/float32/float64"):
        OPS.merge_fwd(x.int(), M)
    with pytest.raises(RuntimeError, match="addend must have shape"):
        OPS.transposed_apply(M, z, x[:, :5])


# ---- CUDA only: the fused kernel's tile choices ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and an extension built with CUDA")
@pytest.mark.parametrize("N,C,dtype", [
    (197, 384, torch.bfloat16),     # DeiT-S: 32-channel tile in the default 48 KiB
    (577, 64, torch.float32),       # 577 × 32 × 4 B = 72 KiB: opt-in shared memory
    (1025, 40, torch.float64),      # 16-channel tile in fp64, C not a multiple of the tile
])
def test_cuda_fused_large(N, C, dtype):
    K, Kn = N // 2, N // 3
    x, z, _, R, Mn, keep = _inputs(2, N, K, Kn, C, dtype, torch.float32 if dtype != torch.float64 else dtype,
                                   "cuda")
    got = ext.reconstruct_merge(z, R, x, keep, Mn)
    want = formulas.reconstruct_merge(z.double(), R.double(), x.double(), keep, Mn.double())
    for name, a, b in zip(("x'", "z'"), got, want):
        assert_close(name, a, b, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device and an extension built with CUDA")
def test_cuda_matches_cpu():
    x, z, _, R, Mn, keep = _inputs(3, 33, 9, 7, 20, torch.float32, torch.float32, "cpu")
    cpu = ext.reconstruct_merge(z, R, x, keep, Mn)
    gpu = ext.reconstruct_merge(z.cuda(), R.cuda(), x.cuda(), keep.cuda(), Mn.cuda())
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
