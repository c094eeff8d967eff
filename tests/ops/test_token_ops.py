"""Tests of the token ops merge / reconstruct / reconstruct_merge (pm_kernels.token_ops, SPEC §1).

Backends "triton" and "torch" against the tests' own float64 formulas (tests/formulas.py: the torch backend
runs pm_kernels.reference, so comparing it with the reference would prove nothing), forward and gradients
(x, z, M, R), plus input validation through the public ops and gradcheck of the torch path.

Without a GPU, Triton runs under TRITON_INTERPRET=1 (tests/conftest.py sets it); with CUDA the kernels run on
the GPU.
"""
import pytest
import torch

import formulas
from helpers import assert_close, dtype_pairs, float64_leaf, leaf, token_op_inputs
from pm_kernels import dispatch, token_ops
from pm_kernels import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() and not dispatch.interpreting() else "cpu"

DTYPES = dtype_pairs("fp32", "fp16", "bf16", "bf16-x_fp32-MR")

# (B, N, K, K_next, C): N in {5, 17, 50}, K in {1, 3, N}, C in {8, 48}. K is M's rows for merge and
# R's columns for reconstruct; K_next is M_next's rows in reconstruct_merge.
SHAPES = [
    pytest.param(3, 5, 1, 5, 8, id="B3-N5-K1-Kn5-C8"),
    pytest.param(2, 5, 5, 3, 48, id="B2-N5-K5-Kn3-C48"),
    pytest.param(2, 17, 3, 1, 48, id="B2-N17-K3-Kn1-C48"),
    pytest.param(2, 17, 17, 3, 8, id="B2-N17-K17-Kn3-C8"),
    pytest.param(2, 50, 3, 50, 48, id="B2-N50-K3-Kn50-C48"),
    pytest.param(2, 50, 50, 1, 8, id="B2-N50-K50-Kn1-C8"),
]

BACKENDS = ["triton", "torch"]


def _inputs(B, N, K, K2, C, dtype, wdtype, seed=0):
    """The inputs as a dict by op-argument name, and the keep mask."""
    t = token_op_inputs(B, N, K, K2, C, dtype, wdtype, DEVICE, seed)._asdict()
    return t, t.pop("keep_mask")


def _run(op, backend, args, keep):
    if op == "merge":
        return (token_ops.merge(args["x"], args["M"], backend=backend),)
    if op == "reconstruct":
        return (token_ops.reconstruct(args["z"], args["R"], args["x"], keep, backend=backend),)
    return token_ops.reconstruct_merge(args["z"], args["R"], args["x"], keep, args["M_next"], backend=backend)


def _want(op, args, keep):
    """The float64 formula of ``op`` (tests/formulas.py)."""
    if op == "merge":
        return (formulas.merge(args["x"], args["M"]),)
    if op == "reconstruct":
        return (formulas.reconstruct(args["z"], args["R"], args["x"], keep),)
    return formulas.reconstruct_merge(args["z"], args["R"], args["x"], keep, args["M_next"])


_OP_INPUTS = {
    "merge": ("x", "M"),
    "reconstruct": ("z", "R", "x"),
    "reconstruct_merge": ("z", "R", "x", "M_next"),
}


def _check_op(op, backend, dtype, wdtype, B, N, K, K2, C, seed=0, transform=None):
    """Forward and all gradients of ``op`` against the float64 formula."""
    base, keep = _inputs(B, N, K, K2, C, dtype, wdtype, seed)
    names = _OP_INPUTS[op]
    args = {k: leaf(base[k]) for k in names}
    call_args = {k: (transform(k, v) if transform else v) for k, v in args.items()}
    outs = _run(op, backend, call_args, keep)

    args64 = {k: float64_leaf(base[k], dtype) for k in names}
    outs64 = _want(op, args64, keep)

    g = torch.Generator().manual_seed(seed + 1)
    grads_out = [torch.randn(o.shape, generator=g).to(DEVICE, dtype) for o in outs]
    if transform is not None:   # non-contiguous incoming gradients too
        grads_out = [gg.transpose(1, 2).contiguous().transpose(1, 2) for gg in grads_out]

    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert o.dtype == dtype, f"output {i}: dtype {o.dtype} != {dtype}"
        assert_close(f"{op}/{backend} output {i}", o, o64, dtype)

    grads = torch.autograd.grad(outs, [args[k] for k in names], grads_out)
    grads64 = torch.autograd.grad(outs64, [args64[k] for k in names], [gg.double() for gg in grads_out])
    for k, gr, gr64 in zip(names, grads, grads64):
        assert gr.dtype == args[k].dtype, f"d{k}: dtype {gr.dtype} != {args[k].dtype}"
        assert_close(f"{op}/{backend} d{k}", gr, gr64, dtype)


# ---------------------------------------------------------------------------------------------------
# Forward + gradients against float64
# ---------------------------------------------------------------------------------------------------


def _cases():
    # Every shape for fp32 and for the autocast-style mix; the same-dtype fp16 / bf16 runs take two
    # shapes under the (slow) interpreter, all of them on a GPU.
    reduced = dispatch.interpreting()
    for backend in BACKENDS:
        for dt in DTYPES:
            for i, shape in enumerate(SHAPES):
                if reduced and backend == "triton" and dt.id in ("fp16", "bf16") and i not in (2, 5):
                    continue
                yield pytest.param(*shape.values, *dt.values, backend, id=f"{shape.id}-{dt.id}-{backend}")


@pytest.mark.parametrize("B,N,K,K2,C,dtype,wdtype,backend", list(_cases()))
@pytest.mark.parametrize("op", ["merge", "reconstruct", "reconstruct_merge"])
def test_op_matches_float64(op, B, N, K, K2, C, dtype, wdtype, backend):
    _check_op(op, backend, dtype, wdtype, B, N, K, K2, C)


def _non_contiguous(name, t):
    # Same values, other strides: activations channel-major, weights transposed storage.
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.t().contiguous().t()


@pytest.mark.parametrize("dtype,wdtype", [DTYPES[0], DTYPES[3]])
@pytest.mark.parametrize("op", ["merge", "reconstruct", "reconstruct_merge"])
def test_triton_non_contiguous(op, dtype, wdtype):
    _check_op(op, "triton", dtype, wdtype, 2, 17, 5, 7, 24, seed=3, transform=_non_contiguous)


def test_triton_strided_slices():
    # Views with a gap between rows (a slice of a bigger tensor), read in place.
    base, keep = _inputs(2, 17, 4, 6, 16, torch.float32, torch.float32, seed=5)
    big_x = torch.randn(2, 20, 40, device=DEVICE)
    x = big_x[:, 2:19, 5:21]
    x.copy_(base["x"])
    M = torch.randn(10, 40, device=DEVICE)[2:8, 3:20]
    z = base["z"][:, :, :]
    x_new, z_new = token_ops.reconstruct_merge(z, base["R"], x, keep, M, backend="triton")
    x_ref, z_ref = formulas.reconstruct_merge(z, base["R"], x, keep, M)
    assert_close("x'", x_new, x_ref, torch.float32)
    assert_close("z'", z_new, z_ref, torch.float32)


def test_triton_deit_sized_tile():
    # N = 197 (DeiT-S/16 at 224): one 256-token tile, several K / K_next blocks.
    _check_op("reconstruct_merge", "triton", torch.float32, torch.float32, 1, 197, 118, 100, 16, seed=7)


# ---------------------------------------------------------------------------------------------------
# The fused op: partial use of its outputs, frozen inputs, agreement with the unfused ops
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use", ["x_only", "z_only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruct_merge_one_output_used(use, backend):
    base, keep = _inputs(2, 17, 3, 5, 16, torch.float32, torch.float32, seed=11)
    args = {k: leaf(base[k]) for k in _OP_INPUTS["reconstruct_merge"]}
    x_new, z_new = token_ops.reconstruct_merge(args["z"], args["R"], args["x"], keep, args["M_next"],
                                               backend=backend)
    args64 = {k: float64_leaf(base[k], torch.float32) for k in args}
    x64, z64 = formulas.reconstruct_merge(args64["z"], args64["R"], args64["x"], keep, args64["M_next"])
    out, out64 = (x_new, x64) if use == "x_only" else (z_new, z64)
    gout = torch.randn_like(out)
    loss, loss64 = (out * gout).sum(), (out64 * gout.double()).sum()
    names = list(args)
    grads = torch.autograd.grad(loss, [args[k] for k in names], allow_unused=True)
    grads64 = torch.autograd.grad(loss64, [args64[k] for k in names], allow_unused=True)
    for k, gr, gr64 in zip(names, grads, grads64):
        if gr64 is None or (k == "M_next" and use == "x_only"):
            assert gr is None or gr.abs().max() == 0, f"d{k} should be absent or zero"
            continue
        assert_close(f"d{k}", gr, gr64, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruct_merge_weights_only_trainable(backend):
    # Only M_next and R require grad (e.g. frozen activations): dR still needs dx'_total.
    base, keep = _inputs(2, 17, 3, 5, 16, torch.float32, torch.float32, seed=13)
    R, M = leaf(base["R"]), leaf(base["M_next"])
    x_new, z_new = token_ops.reconstruct_merge(base["z"], R, base["x"], keep, M, backend=backend)
    (x_new.square().sum() + z_new.sum()).backward()
    R64, M64 = float64_leaf(base["R"], torch.float32), float64_leaf(base["M_next"], torch.float32)
    x64, z64 = formulas.reconstruct_merge(base["z"], R64, base["x"], keep, M64)
    (x64.square().sum() + z64.sum()).backward()
    assert_close("dR", R.grad, R64.grad, torch.float32)
    assert_close("dM_next", M.grad, M64.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_unfused_triton(dtype):
    base, keep = _inputs(2, 17, 5, 9, 32, dtype, torch.float32, seed=17)
    with torch.no_grad():
        x_new, z_new = token_ops.reconstruct_merge(base["z"], base["R"], base["x"], keep, base["M_next"],
                                                   backend="triton")
        x_sep = token_ops.reconstruct(base["z"], base["R"], base["x"], keep, backend="triton")
        z_sep = token_ops.merge(x_sep, base["M_next"], backend="triton")
    # Same math; only the order of the fp32 accumulation may differ (other tile shapes).
    assert_close("x'", x_new, x_sep.double(), dtype)
    assert_close("z'", z_new, z_sep.double(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_block_and_pruned_passthrough(backend):
    B, N, C = 2, 17, 16
    x = torch.randn(B, N, C, device=DEVICE)
    eye = torch.eye(N, device=DEVICE)
    keep = torch.ones(N, dtype=torch.bool, device=DEVICE)
    # M = R = I, m = 1: merge and reconstruct are identities.
    z = token_ops.merge(x, eye, backend=backend)
    torch.testing.assert_close(z, x, rtol=0, atol=0)
    x_new, z_new = token_ops.reconstruct_merge(z, eye, x, keep, eye, backend=backend)
    torch.testing.assert_close(x_new, x, rtol=0, atol=0)
    torch.testing.assert_close(z_new, x, rtol=0, atol=0)
    # A pruned token has a zero row in R: it passes through exactly by the shortcut.
    keep[[3, 8]] = False
    R = torch.randn(N, 5, device=DEVICE)
    R[[3, 8]] = 0
    out = token_ops.reconstruct(torch.randn(B, 5, C, device=DEVICE), R, x, keep, backend=backend)
    torch.testing.assert_close(out[:, [3, 8]], x[:, [3, 8]], rtol=0, atol=0)


def test_triton_rejects_float64_and_auto_runs_it_elsewhere():
    # One rule for every op: a forced backend that cannot run the input raises, naming op, backend and reason.
    base, keep = _inputs(2, 5, 3, 4, 8, torch.float64, torch.float64)
    args = (base["z"], base["R"], base["x"], keep, base["M_next"])
    with pytest.raises(ValueError, match=r"x: the triton backend of reconstruct_merge supports dtypes .*got float64"):
        token_ops.reconstruct_merge(*args, backend="triton")
    with pytest.raises(ValueError, match=r"x: the triton backend of merge supports dtypes .*got float64"):
        token_ops.merge(base["x"], base["M_next"], backend="triton")
    want = ref.reconstruct_merge_reference(*args)
    for a, b in zip(token_ops.reconstruct_merge(*args, backend="auto"), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# gradcheck (float64, torch backend)
# ---------------------------------------------------------------------------------------------------


def test_gradcheck_torch_backend():
    base, keep = _inputs(2, 6, 3, 4, 5, torch.float64, torch.float64, seed=19)
    x, z, M, R, Mn = (leaf(base[k]) for k in ("x", "z", "M", "R", "M_next"))
    assert torch.autograd.gradcheck(lambda x, M: token_ops.merge(x, M, backend="torch"), (x, M))
    assert torch.autograd.gradcheck(
        lambda z, R, x: token_ops.reconstruct(z, R, x, keep, backend="torch"), (z, R, x))
    assert torch.autograd.gradcheck(
        lambda z, R, x, Mn: token_ops.reconstruct_merge(z, R, x, keep, Mn, backend="torch"), (z, R, x, Mn))


# ---------------------------------------------------------------------------------------------------
# Bad inputs, through the public ops (validation runs before any backend)
# ---------------------------------------------------------------------------------------------------


def _good(N=6, K=3, C=4):
    x = torch.randn(2, N, C)
    return dict(x=x, z=torch.randn(2, K, C), M=torch.randn(K, N), R=torch.randn(N, K),
                keep=torch.ones(N, dtype=torch.bool), M_next=torch.randn(K, N))


def _call(op, d, backend="torch"):
    if op == "merge":
        return token_ops.merge(d["x"], d["M"], backend=backend)
    if op == "reconstruct":
        return token_ops.reconstruct(d["z"], d["R"], d["x"], d["keep"], backend=backend)
    return token_ops.reconstruct_merge(d["z"], d["R"], d["x"], d["keep"], d["M_next"], backend=backend)


BAD = [
    # (op, field, bad value maker, exception, match)
    ("merge", "M", lambda d: torch.randn(3, 7), ValueError, "M"),                       # wrong N
    ("merge", "M", lambda d: torch.randn(7, 6), ValueError, "M"),                       # K > N
    ("merge", "M", lambda d: torch.randn(3, 6, 1), ValueError, "M"),                    # not 2-D
    ("merge", "M", lambda d: torch.ones(3, 6, dtype=torch.int64), TypeError, "M"),      # integer
    ("merge", "x", lambda d: torch.randn(6, 4), ValueError, "x"),                       # not 3-D
    ("merge", "M", lambda d: torch.randn(3, 6, device="meta"), ValueError, "M on meta"),  # device
    ("reconstruct", "R", lambda d: torch.randn(6, 4), ValueError, "R"),                 # (N, K+1)
    ("reconstruct", "R", lambda d: torch.randn(5, 3), ValueError, "R"),                 # (N-1, K)
    ("reconstruct", "z", lambda d: torch.randn(2, 7, 4), ValueError, "z"),              # K > N
    ("reconstruct", "z", lambda d: torch.randn(2, 3, 5), ValueError, "z"),              # wrong C
    ("reconstruct", "z", lambda d: torch.randn(2, 3, 4, dtype=torch.float16), TypeError, "z"),  # dtype
    ("reconstruct", "keep", lambda d: torch.ones(5, dtype=torch.bool), ValueError, "keep_mask"),
    ("reconstruct", "keep", lambda d: torch.ones(6), TypeError, "keep_mask"),
    ("reconstruct", "keep", lambda d: torch.ones(6, dtype=torch.bool, device="meta"), ValueError,
     "keep_mask on meta"),
    ("reconstruct_merge", "M_next", lambda d: torch.randn(3, 5), ValueError, "M_next"),
    ("reconstruct_merge", "M_next", lambda d: torch.randn(7, 6), ValueError, "M_next"),  # K > N
    ("reconstruct_merge", "keep", lambda d: torch.zeros(6, dtype=torch.int32), TypeError, "keep_mask"),
    ("reconstruct_merge", "R", lambda d: torch.randn(6, 3, dtype=torch.float64).to("meta"), ValueError,
     "R on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,field,make,exc,match", BAD)
def test_bad_inputs(op, field, make, exc, match, backend):
    d = _good()
    d[field] = make(d)
    with pytest.raises(exc, match=match):
        _call(op, d, backend=backend)


@pytest.mark.parametrize("op", ["merge", "reconstruct", "reconstruct_merge"])
@pytest.mark.parametrize("backend", ["tritonn", "", None, "TORCH"])
def test_bad_backend(op, backend):
    with pytest.raises(ValueError, match="backend"):
        _call(op, _good(), backend=backend)
