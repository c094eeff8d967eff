"""pm_kernels.attention: Triton (FA2-style) and torch backends against the tests' float64 formula
(tests/formulas.py), score included.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes, and on one
large shape per sequence length; the full large-shape matrix runs on a GPU.
"""
import importlib
import re

import pytest
import torch

import formulas
from helpers import (assert_attention_close, attention_inputs, attention_score_tol, attention_tol, norm_rel_err,
                     rel_err)
from pm_kernels.attention import attention

_backends = importlib.import_module("pm_kernels.dispatch")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HAS_TRITON = _backends.usable("triton", DEVICE)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here (no CUDA, no TRITON_INTERPRET=1)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("out", "dq", "dk", "dv", "score")


def _inputs(B, H, N, D, dtype, scale=1.0, seed=0):
    return attention_inputs(B, H, N, D, dtype, DEVICE, scale=scale, seed=seed)


def _reference(q, k, v, do, scale=None):
    """out, dq, dk, dv, score of the float64 formula on the same (rounded) inputs."""
    return formulas.attention_with_grads(q, k, v, do, scale)


def _run(q, k, v, do, backend, scale=None, with_score=True):
    score = torch.zeros(q.shape[2], dtype=torch.float32, device=q.device) if with_score else None
    out = attention(q, k, v, scale=scale, score=score, backend=backend)
    out.backward(do)
    return out, q.grad, k.grad, v.grad, score


def _assert_close(got, ref, dtype, names=NAMES):
    assert_attention_close(got, ref, dtype, names)


# ------------------------------------------------------------------------------------- accuracy

SMALL_SHAPES = [(1, 2, 5, 32), (2, 2, 50, 64), (1, 2, 65, 128)]


@needs_triton
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_float64_reference(shape, dtype):
    q, k, v, do = _inputs(*shape, dtype)
    got = _run(q, k, v, do, "triton")
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[4].dtype == torch.float32
    _assert_close(got, _reference(q, k, v, do), dtype)


@needs_triton
def test_triton_several_blocks_fp32():
    # N = 197 (ViT-S/16 at 224): several query and key blocks, ragged last block.
    q, k, v, do = _inputs(1, 1, 197, 64, torch.float32, seed=1)
    _assert_close(_run(q, k, v, do, "triton", scale=0.3), _reference(q, k, v, do, scale=0.3), torch.float32)


# ViT sequence lengths 197, 577, 785 (224², 384², 448² at patch 16). Under the interpreter one (head dim, dtype)
# per length runs, at B = 1, H = 1 (batch and heads only add independent programs): 4 s, 20 s and 24 s on a
# 2-core CPU; the 27 cases at B = 2, H = 6 would take tens of minutes (issue 16 timed three: 6 s, 49 s, 71 s).
# A GPU runs the whole matrix.
LARGE_N = (197, 577, 785)
ON_THE_INTERPRETER = {(197, 64, torch.float16), (577, 128, torch.bfloat16), (785, 32, torch.float32)}


def _large_cases():
    for n in LARGE_N:
        for d in (32, 64, 128):
            for dtype in DTYPES:
                marks = [pytest.mark.gpu]  # run first on a GPU (tests/conftest.py)
                if CUDA:
                    pass
                elif (n, d, dtype) not in ON_THE_INTERPRETER:
                    marks.append(pytest.mark.skip(reason="too slow for the Triton interpreter (one case per N runs "
                                                         "on the CPU); the full matrix runs on a GPU"))
                elif n > 197:
                    marks.append(pytest.mark.slow)
                yield pytest.param(n, d, dtype, marks=marks, id=f"{n}-{d}-{str(dtype)[6:]}")


@needs_triton
@pytest.mark.parametrize("n, d, dtype", list(_large_cases()))
def test_triton_large_shapes(n, d, dtype):
    B, H = (2, 6) if CUDA else (1, 1)
    q, k, v, do = _inputs(B, H, n, d, dtype, seed=n + d)
    _assert_close(_run(q, k, v, do, "triton"), _reference(q, k, v, do), dtype)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_torch_backend_matches_reference(dtype):
    q, k, v, do = _inputs(2, 2, 9, 16, dtype)
    _assert_close(_run(q, k, v, do, "torch"), _reference(q, k, v, do), dtype)


@needs_triton
def test_torch_and_triton_backends_agree():
    q, k, v, do = _inputs(2, 2, 33, 32, torch.float32, seed=3)
    got_triton = _run(q, k, v, do, "triton")
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    got_torch = _run(q2, k2, v2, do, "torch")
    _assert_close(got_triton, got_torch, torch.float32)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_without_score_same_gradients(backend):
    q, k, v, do = _inputs(1, 2, 20, 32, torch.float32, seed=4)
    got = _run(q, k, v, do, backend, with_score=False)
    _assert_close(got[:4], _reference(q, k, v, do)[:4], torch.float32, names=NAMES[:4])


@needs_triton
def test_triton_without_ragged_block():
    q, k, v, do = _inputs(1, 2, 64, 64, torch.float32, seed=5)  # N a multiple of the block: no ragged block
    score = torch.zeros(64, device=DEVICE)
    out = attention(q, k, v, score=score, backend="triton")
    out.backward(do)
    _assert_close((out, q.grad, k.grad, v.grad, score), _reference(q, k, v, do), torch.float32)


# ------------------------------------------------------------------------------------------ score

def _hook_score(q, k, v, do, scale):
    """The authors' way: materialise A = softmax(q kᵀ·scale), keep its grad, sum A ⊙ ∂L/∂A over b, h, q."""
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    attn = torch.softmax((qd @ kd.transpose(-2, -1)) * scale, dim=-1)
    attn.requires_grad_()
    attn.retain_grad()
    (attn @ vd).backward(do.double())
    return (attn * attn.grad).sum(dim=(0, 1, 2))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_score_matches_hook_formula(backend):
    q, k, v, do = _inputs(2, 2, 37, 32, torch.float32, seed=6)
    got = _run(q, k, v, do, backend, scale=0.2)
    err = rel_err(got[4], _hook_score(q, k, v, do, 0.2))
    assert err <= attention_score_tol(torch.float32), err
    # The backward that produced the score produced the gradients too: all of them, and right.
    _assert_close(got, _reference(q, k, v, do, scale=0.2), torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_score_accumulates_and_is_deterministic(backend):
    q, k, v, do = _inputs(1, 2, 40, 32, torch.float32, seed=7)
    fresh = []
    for _ in range(2):
        score = torch.zeros(40, device=DEVICE)
        attention(q, k, v, score=score, backend=backend).backward(do)
        fresh.append(score)
    assert torch.equal(fresh[0], fresh[1])  # no atomics: bitwise reproducible
    score = torch.full((40,), 0.5, device=DEVICE)
    for _ in range(2):
        attention(q, k, v, score=score, backend=backend).backward(do)
    assert torch.allclose(score, 0.5 + 2 * fresh[0], rtol=1e-5, atol=1e-6)  # adds, never overwrites


# ------------------------------------------------------------------------------- layout and safety

@needs_triton
def test_timm_strided_views_no_copy(monkeypatch):
    """q, k, v from timm's qkv.reshape(B,N,3,H,D).permute(2,0,3,1,4).unbind(0) reach the kernel as is."""
    from pm_kernels.kernels import attention_triton as mod
    B, N, H, D = 2, 21, 2, 32
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, N, 3 * H * D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = x.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    seen = []

    class _Spy:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(tuple(a.data_ptr() for a in args[:3]))
                return self.fn[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(mod, "_fwd_launch", _Spy(mod._fwd_launch))
    monkeypatch.setattr(mod, "_dkdv_launch", _Spy(mod._dkdv_launch))
    do = torch.randn(B, H, N, D, generator=g).to(DEVICE)
    score = torch.zeros(N, device=DEVICE)
    out = attention(q, k, v, score=score, backend="triton")
    out.backward(do)
    assert seen and all(ptrs == (q.data_ptr(), k.data_ptr(), v.data_ptr()) for ptrs in seen)
    ref = _reference(q, k, v, do)
    _assert_close((out, score), (ref[0], ref[4]), torch.float32, names=("out", "score"))
    # Gradient w.r.t. the packed qkv activations, against the reference's dq, dk, dv packed the same way.
    packed = torch.stack(ref[1:4]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)
    assert norm_rel_err(x.grad, packed) <= attention_tol(torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_outputs_fully_written(monkeypatch, dtype):
    """Every buffer the kernels allocate starts as NaN: any element left unwritten would show."""
    from pm_kernels.kernels import attention_triton as mod

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_new_buffer", poisoned)
    q, k, v, do = _inputs(2, 2, 45, 32, dtype, seed=9)
    got = _run(q, k, v, do, "triton")
    for name, t in zip(("out", "dq", "dk", "dv", "score"), got):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    _assert_close(got, _reference(q, k, v, do), dtype)


# Logits of order 1e4 carry absolute fp32 rounding errors of order 1e-3 (2^-24 · 1e4) in every backend, so the
# softmax and everything after it is good to about 1e-3 relative whatever the dtype: tolerance 1e-2 below.
HUGE_TOL = 1e-2


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_nan_with_huge_logits(backend, dtype):
    # |q·k| · scale beyond 1e4: softmax is nearly one-hot, nothing may overflow into inf / NaN.
    q, k, v, do = _inputs(1, 2, 40, 32, dtype, scale=25.0, seed=10)
    logits = q.detach().float() @ k.detach().float().transpose(-2, -1)
    assert logits.max().item() > 1e4 and logits.min().item() < -1e4
    got = _run(q, k, v, do, backend, scale=1.0)
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    ref = _reference(q, k, v, do, scale=1.0)
    assert norm_rel_err(got[0], ref[0]) <= HUGE_TOL
    assert norm_rel_err(got[3], ref[3]) <= HUGE_TOL
    assert rel_err(got[4], ref[4]) <= HUGE_TOL
    # dq and dk are compared in the test below: here the float64 softmax is one-hot to within e^-(logit gaps),
    # its dq, dk are ~0 and the kernels' are the rounding noise of the logits, with nothing to compare.


def _shifted_inputs(dtype, seed, N=40, D=32):
    """Random q, k, v, except a last channel q = ±128 (by row), k = 256: at scale 0.5 every logit of a row is
    shifted by ±16384, which leaves its softmax, not one-hot, unchanged; dq, dk and the score are O(1)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, N, D, generator=g) for _ in range(4))
    q[..., -1] = 128.0 * torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0)
    k[..., -1] = 256.0
    q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v))
    return q, k, v, do.to(DEVICE, dtype)


# The interpreter warns of exp2 overflowing in padded lanes (keys past N load as 0, logit 0 − LSE = +16384·log2 e);
# the kernels mask those lanes to 0 right after, as on a GPU, where exp2 gives inf there without a warning.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits_gradients_match_reference(backend, dtype):
    q, k, v, do = _shifted_inputs(dtype, seed=12)
    logits = (q.detach().double() @ k.detach().double().transpose(-2, -1)) * 0.5
    assert logits.max().item() > 1.6e4 and logits.min().item() < -1.6e4
    out, dq, dk, dv, score = _run(q, k, v, do, backend, scale=0.5)
    ref = _reference(q, k, v, do, scale=0.5)
    for name, t in zip(NAMES, (out, dq, dk, dv, score)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    # dq's shift channel is 256 · Σ_k dS[q, k] = 0 exactly (softmax rows sum to 1): only noise to compare there.
    for name, got, want in (("out", out, ref[0]), ("dq", dq[..., :-1], ref[1][..., :-1]), ("dk", dk, ref[2]),
                            ("dv", dv, ref[3])):
        assert norm_rel_err(got, want) <= HUGE_TOL, f"{name}: relative error {norm_rel_err(got, want):.2e}"
    assert rel_err(score, ref[4]) <= HUGE_TOL, f"score: relative error {rel_err(score, ref[4]):.2e}"


# ----------------------------------------------------------------------------------------- errors

def _good(D=32, dtype=torch.float32):
    return [torch.randn(1, 2, 8, D, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("case, exc, match", [
    ("k_shape", ValueError, "k"),
    ("v_dtype", TypeError, "v"),
    ("q_ndim", ValueError, "q"),
    ("device", ValueError, "k on meta"),
    ("score_shape", ValueError, "score"),
    ("score_dtype", TypeError, "score"),
    ("score_device", ValueError, "score on meta"),
    ("scale_type", TypeError, "scale"),
    ("backend_name", ValueError, "backend"),
])
def test_bad_inputs(case, exc, match):
    q, k, v = _good()
    kwargs = {}
    if case == "k_shape":
        k = torch.randn(1, 2, 9, 32)
    elif case == "v_dtype":
        v = v.double()
    elif case == "q_ndim":
        q = q[0]
    elif case == "device":
        k = k.to("meta")
    elif case == "score_shape":
        kwargs["score"] = torch.zeros(9)
    elif case == "score_dtype":
        kwargs["score"] = torch.zeros(8, dtype=torch.float64)
    elif case == "score_device":
        kwargs["score"] = torch.zeros(8, device="meta")
    elif case == "scale_type":
        kwargs["scale"] = "0.5"
    elif case == "backend_name":
        kwargs["backend"] = "cudnn"
    with pytest.raises(exc, match=match):
        attention(q, k, v, **kwargs)


@needs_triton
@pytest.mark.parametrize("D, dtype, match", [
    (48, torch.float32, r"q: .*head dims 32, 64, 128, got 48"),
    (16, torch.float16, r"q: .*head dims 32, 64, 128, got 16"),
    (32, torch.float64, r"q: .*float32, float16, bfloat16, got float64"),
])
def test_triton_unsupported_inputs(D, dtype, match):
    q, k, v = (t.to(DEVICE) for t in _good(D, dtype))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, backend="triton")
    # "auto" falls back to the torch backend instead.
    out = attention(q, k, v, backend="auto")
    assert torch.allclose(out.double(), formulas.attention(q, k, v)[0], atol=1e-2)


# ---------------------------------------------------------------------------------------- compile

class _TinyAttention(torch.nn.Module):
    """timm's Attention layout: qkv linear, reshape/permute/unbind, pm_kernels.attention, proj."""

    def __init__(self, dim=64, heads=2, backend="torch"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, score):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = attention(q, k, v, scale=(C // self.heads) ** -0.5, score=score, backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(11)
    model = _TinyAttention(backend=backend).to(DEVICE)
    x = torch.randn(2, 10, 64, device=DEVICE)

    def step(m, inp, score):
        out = m(inp, score)
        out.square().sum().backward()
        return out

    score_eager = torch.zeros(10, device=DEVICE)
    out_eager = step(model, x, score_eager)
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    score_c = torch.zeros(10, device=DEVICE)
    out_c = step(compiled, x, score_c)
    tol = attention_tol(torch.float32)
    assert norm_rel_err(out_c, out_eager) <= tol
    assert score_c.abs().sum() > 0, "score was not mutated by the compiled backward"
    assert norm_rel_err(score_c, score_eager) <= tol
    for g_c, g_e in zip((p.grad for p in model.parameters()), grads_eager):
        assert norm_rel_err(g_c, g_e) <= tol
    torch._dynamo.reset()


def test_custom_ops_registered():
    fwd = str(torch.ops.pm_kernels.attention_fwd.default._schema)
    bwd = str(torch.ops.pm_kernels.attention_bwd.default._schema)
    assert "!" not in fwd
    assert re.search(r"Tensor\(a\d*!\)\? score", bwd), bwd  # the score mutation is declared
