"""pm_kernels.attention with an additive logit bias, on the Triton (the interpreter on the CPU) and torch backends,
against the float64 formula of tests/formulas.py: out, dq, dk, dv, the bias gradients and the SPEC §3 score.

Two kinds of bias: SAM's decomposed relative-position bias (per-query tables bias_h / bias_w, per-key grid
indices key_h / key_w: a raster window, or merged tokens at arbitrary, repeated positions) and a general
(B|1, H|1, N, N) bias. Shapes leave ragged query and key blocks (the interpreter's blocks are 32 × 32).
"""
import pytest
import torch
import torch.nn.functional as F

import formulas
from helpers import assert_attention_close, attention_inputs, attention_tol, norm_rel_err
from pm_kernels import dispatch
from pm_kernels.attention import attention, run_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(not dispatch.usable("triton", DEVICE),
                                  reason="triton cannot run here (no CUDA, no TRITON_INTERPRET=1)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REL_POS_NAMES = ("out", "dq", "dk", "dv", "d_bias_h", "d_bias_w", "score")


def positions(N, gh, gw, kind, B=None, seed=0):
    """(key_h, key_w) int64 on DEVICE: "grid" = an gh × gw raster window (N = gh·gw, SAM's unmerged tokens);
    "merged" = N tokens at random positions, some repeated, the first and last grid row and column used (merged tokens
    carry their centre token's position); shape (B, N) when B is given (one set of positions per batch element)."""
    if kind == "grid":
        assert N == gh * gw and B is None
        rows = torch.arange(N)
        return (rows // gw).to(DEVICE), (rows % gw).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if B is None else (B, N)
    key_h, key_w = torch.randint(0, gh, shape, generator=g), torch.randint(0, gw, shape, generator=g)
    # Both ends of each table used (with one position only, d bias_w = Σ_j dS = 0: nothing to compare), and a
    # repeated position at least.
    key_h[..., 0], key_h[..., 1], key_h[..., -1] = gh - 1, 0, 0
    key_w[..., -1], key_w[..., -2] = gw - 1, 0
    return key_h.to(DEVICE), key_w.to(DEVICE)


def tables(B, H, N, gh, gw, dtype, seed=1):
    """bias_h (B, H, N, gh), bias_w (B, H, N, gw): leaves that require grad, of the size SAM's are (|q·R| ~ 1)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, size, generator=g).to(DEVICE, dtype).requires_grad_() for size in (gh, gw))


def run(q, k, v, do, backend, *, scale=None, with_score=True, bias=None, bias_h=None, bias_w=None, key_h=None,
        key_w=None):
    """(out, dq, dk, dv, d_bias, d_bias_h, d_bias_w, score) from attention(...).backward(do); None where absent."""
    score = torch.zeros(q.shape[2], device=q.device) if with_score else None
    out = attention(q, k, v, scale=scale, score=score, bias=bias, bias_h=bias_h, bias_w=bias_w, key_h=key_h,
                    key_w=key_w, backend=backend)
    out.backward(do)
    grads = [None if t is None else t.grad for t in (q, k, v, bias, bias_h, bias_w)]
    return (out, *grads, score)


def formula(q, k, v, do, *, scale=None, **bias):
    return formulas.biased_attention_with_grads(q, k, v, do, q.shape[-1] ** -0.5 if scale is None else scale, **bias)


def check(got, want, dtype, names):
    """Compare the named results of ``run`` / ``formula`` (both in their (out, dq, dk, dv, d_bias, d_bias_h,
    d_bias_w, score) order)."""
    order = ("out", "dq", "dk", "dv", "d_bias", "d_bias_h", "d_bias_w", "score")
    pick = [order.index(name) for name in names]
    assert_attention_close([got[i] for i in pick], [want[i] for i in pick], dtype, names)


# ----------------------------------------------------------------------------- decomposed bias, Triton

# (B, H, N, D, Gh, Gw, positions): N below one block, ragged blocks, a raster window, tables padded to 16, 32 and
# 64 columns in the dQ kernel, one set of positions per batch element.
REL_POS_SHAPES = [
    (1, 2, 5, 32, 3, 2, "merged"),
    (1, 2, 49, 64, 7, 7, "grid"),
    (2, 2, 50, 64, 7, 8, "merged"),
    (1, 2, 65, 128, 20, 5, "merged"),
    (2, 1, 40, 32, 40, 3, "merged-per-batch"),
]


def _rel_pos_case(B, H, N, D, gh, gw, kind, dtype, seed=0):
    q, k, v, do = attention_inputs(B, H, N, D, dtype, DEVICE, seed=seed)
    key_h, key_w = positions(N, gh, gw, kind.split("-")[0], B=B if kind.endswith("per-batch") else None, seed=seed)
    bias_h, bias_w = tables(B, H, N, gh, gw, dtype, seed=seed + 1)
    return (q, k, v, do), dict(bias_h=bias_h, bias_w=bias_w, key_h=key_h, key_w=key_w)


@needs_triton
@pytest.mark.parametrize("shape", REL_POS_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-G{s[4]}x{s[5]}-{s[6]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_rel_pos_matches_float64_formula(shape, dtype):
    (q, k, v, do), rel_pos = _rel_pos_case(*shape, dtype)
    got = run(q, k, v, do, "triton", **rel_pos)
    assert got[5].dtype == dtype and got[6].dtype == dtype and got[7].dtype == torch.float32
    check(got, formula(q, k, v, do, **rel_pos), dtype, REL_POS_NAMES)


@needs_triton
def test_triton_rel_pos_sam_window():
    """SAM's windowed block unmerged: a 14 × 14 window, N = 196 (7 blocks of 32: the last one ragged)."""
    (q, k, v, do), rel_pos = _rel_pos_case(1, 1, 196, 64, 14, 14, "grid", torch.float32, seed=3)
    check(run(q, k, v, do, "triton", scale=0.125, **rel_pos), formula(q, k, v, do, scale=0.125, **rel_pos),
          torch.float32, REL_POS_NAMES)


@needs_triton
@pytest.mark.slow
def test_triton_rel_pos_global_grid_large_blocks():
    """SAM's global grid (64 × 64 positions: tables of 64 columns) past 1024 tokens, where the launcher takes its
    large blocks (128 × 64 under the interpreter): merged tokens at random positions of the grid."""
    (q, k, v, do), rel_pos = _rel_pos_case(1, 1, 1030, 64, 64, 64, "merged", torch.bfloat16, seed=20)
    check(run(q, k, v, do, "triton", **rel_pos), formula(q, k, v, do, **rel_pos), torch.bfloat16, REL_POS_NAMES)


@needs_triton
def test_triton_rel_pos_is_deterministic():
    (q, k, v, do), rel_pos = _rel_pos_case(2, 2, 45, 32, 6, 9, "merged", torch.float32, seed=4)
    first = run(q, k, v, do, "triton", **rel_pos)
    for t in (q, k, v, rel_pos["bias_h"], rel_pos["bias_w"]):
        t.grad = None
    second = run(q, k, v, do, "triton", **rel_pos)
    for name, a, b in zip(("out", "dq", "dk", "dv", "d_bias", "d_bias_h", "d_bias_w", "score"), first, second):
        assert a is None and b is None or torch.equal(a, b), f"{name} differs between two runs"


# ------------------------------------------------------------------------------------ general bias, Triton

@needs_triton
@pytest.mark.parametrize("bias_shape", ["BH", "1H", "B1", "11"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_general_bias_matches_float64_formula(bias_shape, dtype):
    B, H, N, D = 2, 2, 37, 32
    q, k, v, do = attention_inputs(B, H, N, D, dtype, DEVICE, seed=5)
    shape = (B if bias_shape[0] == "B" else 1, H if bias_shape[1] == "H" else 1, N, N)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype).requires_grad_()
    got = run(q, k, v, do, "triton", bias=bias)
    assert got[4].shape == shape and got[4].dtype == dtype
    check(got, formula(q, k, v, do, bias=bias), dtype, ("out", "dq", "dk", "dv", "d_bias", "score"))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_both_biases_strided(dtype):
    """A general bias that is a strided view (transposed) and a decomposed one with per-batch positions."""
    (q, k, v, do), rel_pos = _rel_pos_case(2, 2, 33, 64, 5, 6, "merged-per-batch", dtype, seed=7)
    base = torch.randn(2, 1, 33, 33, generator=torch.Generator().manual_seed(8)).to(DEVICE, dtype)
    bias = base.transpose(-2, -1).requires_grad_()
    assert not bias.is_contiguous()
    got = run(q, k, v, do, "triton", bias=bias, **rel_pos)
    check(got, formula(q, k, v, do, bias=bias, **rel_pos), dtype,
          ("out", "dq", "dk", "dv", "d_bias", "d_bias_h", "d_bias_w", "score"))


# ----------------------------------------------------------------------------------------- torch backend

@pytest.mark.parametrize("with_score", [True, False], ids=["score", "no-score"])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_torch_backend_matches_float64_formula(dtype, with_score):
    """The reference custom op (a score, or a bias that needs a gradient), and SDPA with the bias materialised as
    its attn_mask (inference)."""
    (q, k, v, do), rel_pos = _rel_pos_case(2, 2, 11, 16, 3, 4, "merged-per-batch", dtype, seed=9)
    bias = torch.randn(1, 2, 11, 11, generator=torch.Generator().manual_seed(10)).to(DEVICE, dtype).requires_grad_()
    got = run(q, k, v, do, "torch", with_score=with_score, bias=bias, **rel_pos)
    names = ("out", "dq", "dk", "dv", "d_bias", "d_bias_h", "d_bias_w") + (("score",) if with_score else ())
    want = formula(q, k, v, do, bias=bias, **rel_pos)
    check(got, want, dtype, names)
    with torch.no_grad():
        out = attention(q, k, v, bias=bias, backend="torch", **rel_pos)
    check((out,), want[:1], dtype, ("out",))


def test_torch_backend_dropout_with_bias():
    """Dropout (SDPA's, training) with a bias that needs a gradient: it runs, and the gradient reaches the tables."""
    (q, k, v, do), rel_pos = _rel_pos_case(1, 2, 16, 16, 3, 4, "merged", torch.float32, seed=18)
    torch.manual_seed(19)
    out = attention(q, k, v, dropout_p=0.5, backend="torch", **rel_pos)
    out.backward(do)
    without = formula(q, k, v, do, **rel_pos)[0]
    assert norm_rel_err(out, without) > 0.1  # dropped probabilities change the output
    for name in ("bias_h", "bias_w"):
        grad = rel_pos[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradients_only_where_asked(backend):
    (q, k, v, do), rel_pos = _rel_pos_case(1, 2, 20, 32, 4, 5, "merged", torch.float32, seed=11)
    rel_pos["bias_w"] = rel_pos["bias_w"].detach()
    got = run(q, k, v, do, backend, with_score=False, **rel_pos)
    assert got[6] is None  # bias_w needs no gradient
    check(got, formula(q, k, v, do, **rel_pos), torch.float32, ("out", "dq", "d_bias_h"))
    with torch.no_grad():
        out = attention(q, k, v, backend=backend, **rel_pos)
    assert norm_rel_err(out, got[0]) <= attention_tol(torch.float32)


# ------------------------------------------------------------------------------------ SAM's own formula

def _sam_block_inputs(grid=(6, 5), heads=2, head_dim=32, seed=12):
    """q, k, v (1, heads, N, D) of an h × w token grid, and SAM's relative-position parameters (2·size − 1, D)."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, get_rel_pos
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
    rel_pos_h = (torch.randn(2 * grid[0] - 1, head_dim, generator=g) * 0.3).requires_grad_()
    rel_pos_w = (torch.randn(2 * grid[1] - 1, head_dim, generator=g) * 0.3).requires_grad_()
    return q, k, v, rel_pos_h, rel_pos_w, get_rel_pos, get_decomposed_rel_pos_bias


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("tokens", ["all", "merged"])
def test_matches_timm_sam_attention(backend, tokens):
    """The call a SAM block makes (bias_h = q · Rh[h_q], key_h = the keys' grid rows) equals timm's SAM attention
    (its materialised decomposed bias through SDPA) on the same tokens: all of a 6 × 5 grid, or a subset of them
    (merged tokens at their centres' positions, the bias being SAM's restricted to those rows and columns).
    Gradients reach q and the relative-position parameters alike."""
    q, k, v, rel_pos_h, rel_pos_w, get_rel_pos, sam_bias = _sam_block_inputs()
    grid, (B, H, n, D) = (6, 5), q.shape
    keep = torch.arange(n) if tokens == "all" else torch.tensor([0, 3, 7, 8, 12, 13, 14, 22, 27, 29])
    pos_h, pos_w = keep // grid[1], keep % grid[1]

    # timm: bias over the whole grid, then the kept tokens' rows and columns.
    bias = sam_bias(q.reshape(B * H, n, D), rel_pos_h, rel_pos_w, grid, grid).reshape(B, H, n, n)
    bias = bias[:, :, keep][:, :, :, keep]
    qs, ks, vs = (t[:, :, keep] for t in (q, k, v))
    want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias)
    want_grads = torch.autograd.grad(want.square().sum(), (rel_pos_h, rel_pos_w))

    # pm_kernels: per-query tables from the query's own grid row / column, per-key indices.
    Rh = get_rel_pos(grid[0], grid[0], rel_pos_h)                             # (h_q, h_k, D)
    Rw = get_rel_pos(grid[1], grid[1], rel_pos_w)
    bias_h = torch.einsum("bhnd,ngd->bhng", qs, Rh[pos_h])
    bias_w = torch.einsum("bhnd,ngd->bhng", qs, Rw[pos_w])
    got = attention(qs.to(DEVICE), ks.to(DEVICE), vs.to(DEVICE), bias_h=bias_h.to(DEVICE), bias_w=bias_w.to(DEVICE),
                    key_h=pos_h.to(DEVICE), key_w=pos_w.to(DEVICE), backend=backend)
    got_grads = torch.autograd.grad(got.square().sum(), (rel_pos_h, rel_pos_w))
    assert norm_rel_err(got, want) <= attention_tol(torch.float32)
    for name, g, w in zip(("rel_pos_h", "rel_pos_w"), got_grads, want_grads):
        assert norm_rel_err(g, w) <= attention_tol(torch.float32), name


# --------------------------------------------------------------------------------------------- safety

@needs_triton
def test_triton_bias_outputs_fully_written(monkeypatch):
    """The bias gradient buffers start as NaN: any element left unwritten would show."""
    from pm_kernels.kernels import attention_triton as mod
    monkeypatch.setattr(mod, "_new_buffer", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                       dtype=dtype, device=device))
    (q, k, v, do), rel_pos = _rel_pos_case(2, 1, 35, 32, 17, 3, "merged", torch.float32, seed=13)
    bias = torch.randn(2, 1, 35, 35, generator=torch.Generator().manual_seed(14)).to(DEVICE).requires_grad_()
    check(run(q, k, v, do, "triton", bias=bias, **rel_pos), formula(q, k, v, do, bias=bias, **rel_pos),
          torch.float32, ("out", "dq", "dk", "dv", "d_bias", "d_bias_h", "d_bias_w", "score"))


@needs_triton
def test_triton_unchecked_index_out_of_range_gives_nan():
    """run_attention (no checks, as under torch.compile) with a key index past the table: no out-of-bounds read,
    but a NaN logit at that key, so every row comes out NaN, never a silently wrong number."""
    (q, k, v, _), rel_pos = _rel_pos_case(1, 1, 20, 32, 4, 4, "merged", torch.float32, seed=15)
    rel_pos["key_w"] = rel_pos["key_w"].clone()
    rel_pos["key_w"][7] = 4
    with torch.no_grad():
        out = run_attention(q, k, v, 32 ** -0.5, None, 0.0, "triton", **rel_pos)
    assert torch.isnan(out).all()


def _good(N=8, D=32):
    q, k, v = (torch.randn(2, 2, N, D) for _ in range(3))
    rel_pos = dict(bias_h=torch.randn(2, 2, N, 3), bias_w=torch.randn(2, 2, N, 4),
                   key_h=torch.arange(N) % 3, key_w=torch.arange(N) % 4)
    return q, k, v, rel_pos


@pytest.mark.parametrize("case, exc, match", [
    ("bias_shape", ValueError, r"^bias: expected shape \(B\|1, H\|1, N, N\) = \(2\|1, 2\|1, 8, 8\)"),
    ("bias_ndim", ValueError, r"^bias: expected a 4-D tensor"),
    ("bias_dtype", TypeError, r"^bias: expected dtype float32, got float64"),
    ("bias_device", ValueError, r"bias on meta"),
    ("rel_pos_partial", ValueError, r"^key_h, key_w: the decomposed bias needs bias_h, bias_w, key_h and key_w"),
    ("bias_h_shape", ValueError, r"^bias_h: expected shape \(B, H, N, G\) = \(2, 2, 8, G\)"),
    ("bias_w_dtype", TypeError, r"^bias_w: expected dtype float32"),
    ("bias_h_empty", ValueError, r"^bias_h: expected at least one grid position"),
    ("key_h_dtype", TypeError, r"^key_h: expected dtype int64, got int32"),
    ("key_h_shape", ValueError, r"^key_h: expected shape \(8,\) or \(2, 8\)"),
    ("key_w_shape", ValueError, r"^key_w: expected shape \(8,\) like key_h"),
    ("key_h_range", ValueError, r"^key_h: expected indices in \[0, 3\) \(bias_h's last dim\), got values in \[0, 3\]"),
    ("key_w_negative", ValueError, r"^key_w: expected indices in \[0, 4\) .*got values in \[-1, 3\]"),
    ("key_device", ValueError, r"key_w on meta"),
    ("triton_dropout", ValueError, r"^q: the triton backend of attention does not implement dropout"),
])
def test_bad_bias_inputs(case, exc, match):
    q, k, v, rel_pos = _good()
    kwargs = dict(rel_pos)
    if case == "bias_shape":
        kwargs["bias"] = torch.randn(2, 2, 8, 9)
    elif case == "bias_ndim":
        kwargs["bias"] = torch.randn(8, 8)
    elif case == "bias_dtype":
        kwargs["bias"] = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    elif case == "bias_device":
        kwargs["bias"] = torch.randn(1, 1, 8, 8, device="meta")
    elif case == "rel_pos_partial":
        del kwargs["key_h"], kwargs["key_w"]
    elif case == "bias_h_shape":
        kwargs["bias_h"] = torch.randn(2, 2, 9, 3)
    elif case == "bias_w_dtype":
        kwargs["bias_w"] = kwargs["bias_w"].half()
    elif case == "bias_h_empty":
        kwargs["bias_h"] = torch.randn(2, 2, 8, 0)
    elif case == "key_h_dtype":
        kwargs["key_h"] = kwargs["key_h"].int()
    elif case == "key_h_shape":
        kwargs["key_h"] = torch.zeros(1, 8, dtype=torch.int64)
    elif case == "key_w_shape":
        kwargs["key_w"] = kwargs["key_w"].expand(2, 8)
    elif case == "key_h_range":
        kwargs["key_h"] = torch.arange(8) % 4
    elif case == "key_w_negative":
        kwargs["key_w"] = torch.where(torch.arange(8) == 5, -1, torch.arange(8) % 4)
    elif case == "key_device":
        kwargs["key_w"] = kwargs["key_w"].to("meta")
    elif case == "triton_dropout":
        kwargs.update(dropout_p=0.1, backend="triton")
    with pytest.raises(exc, match=match):
        attention(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------- compile

class _SamAttention(torch.nn.Module):
    """A SAM-style attention on K tokens with grid positions: qkv, the decomposed bias from q, pm_kernels.attention."""

    def __init__(self, dim=64, heads=2, grid=5, backend="torch"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.rel_h = torch.nn.Parameter(torch.randn(grid, grid, dim // heads) * 0.2)  # Rh[h_q, h_k]
        self.rel_w = torch.nn.Parameter(torch.randn(grid, grid, dim // heads) * 0.2)

    def forward(self, x, pos_h, pos_w, score):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias_h = torch.einsum("bhnd,ngd->bhng", q, self.rel_h[pos_h])
        bias_w = torch.einsum("bhnd,ngd->bhng", q, self.rel_w[pos_w])
        return attention(q, k, v, score=score, bias_h=bias_h, bias_w=bias_w, key_h=pos_h, key_w=pos_w,
                         backend=self.backend)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = _SamAttention(backend=backend).to(DEVICE)
    x = torch.randn(2, 12, 64, device=DEVICE)
    pos_h, pos_w = positions(12, 5, 5, "merged", seed=17)

    def step(m):
        score = torch.zeros(12, device=DEVICE)
        model.zero_grad()
        out = m(x, pos_h, pos_w, score)
        out.square().sum().backward()
        return out.detach(), score, [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend=compile_backend))
    tol = attention_tol(torch.float32)
    assert compiled[1].abs().sum() > 0, "score was not mutated by the compiled backward"
    assert norm_rel_err(compiled[0], eager[0]) <= tol and norm_rel_err(compiled[1], eager[1]) <= tol
    for name, g_c, g_e in zip(("qkv.weight", "qkv.bias", "rel_h", "rel_w"), compiled[2], eager[2]):
        assert g_c.abs().sum() > 0 and norm_rel_err(g_c, g_e) <= tol, name
    torch._dynamo.reset()
