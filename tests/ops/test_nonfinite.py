"""Backends agree on non-finite input: inf and NaN propagate as docs/architecture.md ("Non-finite input")
defines it, on every backend available here, against the float64 formulas of tests/formulas.py.

Agreement is exact on the kind of every entry (NaN, +inf, −inf or finite); finite entries are compared with a
relative tolerance. The shapes leave a ragged last block (N = 10 tokens under the token ops' 16-row tiles, 40
keys under the attention kernels' 32-key blocks), where padding rows meet the non-finite values.
"""
import math

import pytest
import torch

import formulas
from helpers import leaf, token_op_inputs
from pm_kernels import dispatch, token_ops
from pm_kernels.attention import attention

# The Triton interpreter computes with numpy, which warns on the inf − inf, log2(0) and NaN these inputs make.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INF, NAN = math.inf, math.nan
FP32_TOL = 1e-4   # fp32 kernels against float64, relative to the largest finite entry


KINDS = {"NaN": torch.isnan, "+inf": torch.isposinf, "-inf": torch.isneginf}


def assert_same_ieee(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = FP32_TOL) -> None:
    """NaN, +inf and −inf exactly where ``want`` has them; finite entries within ``tol`` (max-norm relative)."""
    assert got is not None, f"{name} is missing (None)"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    for kind, where in KINDS.items():
        g, w = where(got), where(want)
        assert torch.equal(g, w), (f"{name}: {kind} at {g.nonzero().tolist()[:8]} ({int(g.sum())} entries), "
                                   f"expected at {w.nonzero().tolist()[:8]} ({int(w.sum())} entries)")
    finite = torch.isfinite(want)
    if finite.any():
        err = (got[finite] - want[finite]).abs().max() / want[finite].abs().max().clamp_min(1e-30)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e} on the finite entries"


# -------------------------------------------------------------------------------------------- token ops

TOKEN_BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(not dispatch.usable(name, DEVICE),
                                                              reason=f"backend {name} cannot run here"))
                  for name in ("torch", "cuda", "triton")]


def _token_inputs(case: str):
    """Token-op inputs (fp32, B=2, N=10, K=4, K'=3, C=5) with one non-finite value planted by ``case``."""
    t = token_op_inputs(2, 10, 4, 3, 5, torch.float32, device=DEVICE)
    x, z, M, R, M_next, keep = (a.clone() for a in t)
    kept, pruned = int(keep.nonzero()[1]), int((~keep).nonzero()[0])
    if case == "x_kept_inf":        # (1 − m) ⊙ x is a product: 0 · inf = NaN at that entry of x'
        x[0, kept, 1] = INF
    elif case == "x_kept_nan":
        x[1, kept, 3] = NAN
    elif case == "x_pruned_-inf":   # passes by the shortcut: −inf in x', ±inf in z'
        x[0, pruned, 2] = -INF
    elif case == "z_inf":           # every x'[:, c] +inf, every z'[:, c] +inf (no padding row may turn it NaN)
        z[0, 2, 1] = INF
        R[:, 2] = R[:, 2].abs() + 0.1
        M_next = M_next.abs() + 0.1
    elif case == "R_nan":
        R[3, 2] = NAN
    elif case == "M_zero_x_inf":    # a zero weight times inf is NaN (no product skipped)
        x[1, pruned, 0] = INF
        M[0, pruned] = 0.0
    else:
        raise ValueError(case)
    return x, z, M, R, M_next, keep


TOKEN_CASES = ["x_kept_inf", "x_kept_nan", "x_pruned_-inf", "z_inf", "R_nan", "M_zero_x_inf"]


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_token_ops_forward(case, backend):
    x, z, M, R, M_next, keep = _token_inputs(case)
    assert_same_ieee("merge", token_ops.merge(x, M, backend=backend), formulas.merge(x, M))
    assert_same_ieee("reconstruct", token_ops.reconstruct(z, R, x, keep, backend=backend),
                     formulas.reconstruct(z, R, x, keep))
    want = formulas.reconstruct_merge(z, R, x, keep, M_next)
    for name, g, w in zip(("x'", "z'"), token_ops.reconstruct_merge(z, R, x, keep, M_next, backend=backend), want):
        assert_same_ieee(f"reconstruct_merge {name}", g, w)


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
@pytest.mark.parametrize("case", ["dz'_inf", "dx'_nan"])
def test_token_ops_backward_of_non_finite_gradient(case, backend):
    # An upstream gradient with one non-finite entry, through the fused block boundary (and its padding rows).
    x, z, M, R, M_next, keep = _token_inputs("z_inf")
    z[0, 2, 1] = 0.5  # finite forward
    args = [leaf(t) for t in (z, R, x, M_next)]
    args64 = [leaf(t.double()) for t in (z, R, x, M_next)]
    g = torch.Generator().manual_seed(1)
    g_x, g_z = (torch.randn(2, n, 5, generator=g).to(DEVICE) for n in (10, 3))
    if case == "dz'_inf":
        g_z[0, 1, 1] = INF
    else:
        g_x[1, 4, 2] = NAN
    za, Ra, xa, Ma = args
    torch.autograd.backward(token_ops.reconstruct_merge(za, Ra, xa, keep, Ma, backend=backend), [g_x, g_z])
    za, Ra, xa, Ma = args64
    torch.autograd.backward(formulas.reconstruct_merge(za, Ra, xa, keep, Ma), [g_x.double(), g_z.double()])
    for name, got, want in zip(("dz", "dR", "dx", "dM_next"), args, args64):
        assert_same_ieee(name, got.grad, want.grad)


# -------------------------------------------------------------------------------------------- attention

B, H, N, D = 1, 2, 40, 32
SCALE = D ** -0.5
TRITON = pytest.mark.skipif(not dispatch.usable("triton", DEVICE), reason="triton cannot run here")
# (backend, with a score): the torch backend runs SDPA without a score and the reference custom op with one.
ATTENTION_BACKENDS = [pytest.param("torch", False, id="torch-sdpa"), pytest.param("torch", True, id="torch-score"),
                      pytest.param("triton", True, id="triton-score", marks=TRITON)]


def _attention_inputs(case: str):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    if case == "k_inf":              # rows with a +inf logit: P NaN at that key only, the score NaN at 1 key
        k[0, 0, 5, 2] = INF
    elif case == "row_all_-inf":     # query 3 of head 0: every logit −inf, L = −inf, its row of P NaN
        q[0, 0, 3, 0] = INF
        k[0, 0, :, 0] = -(k[0, 0, :, 0].abs() + 0.1)
    elif case == "first_keys_-inf":  # head 0: keys 0..32 (a whole first key block) −inf for every query,
        q[0, 0, :, 0] = q[0, 0, :, 0].abs() + 0.1    # the rest finite: P = 0 there, a finite output
        k[0, 0, :33, 0] = -INF
    elif case == "q_nan":            # a NaN logit: L = NaN, that row of P NaN
        q[0, 1, 7, 4] = NAN
    elif case == "v_inf":            # dP = +inf at key 9 for every query: its score +inf (padding queries
        v[0, 1, 9, 3] = INF          # of the last block add 0, not 0 · inf = NaN)
        do = do.abs() + 0.1
    elif case == "dO_inf":           # a non-finite upstream gradient (padding keys add 0 to dQ)
        do[0, 0, 6, 1] = INF
    elif case != "none":
        raise ValueError(case)
    return (*(t.to(DEVICE).requires_grad_() for t in (q, k, v)), do.to(DEVICE))


ATTENTION_CASES = ["k_inf", "row_all_-inf", "first_keys_-inf", "q_nan", "v_inf", "dO_inf"]


@pytest.mark.parametrize("backend, with_score", ATTENTION_BACKENDS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(case, backend, with_score):
    q, k, v, do = _attention_inputs(case)
    score = torch.zeros(N, device=DEVICE) if with_score else None
    out = attention(q, k, v, scale=SCALE, score=score, backend=backend)
    out.backward(do)
    want = formulas.attention_ieee(q, k, v, do, SCALE)
    if case == "row_all_-inf" and not with_score:
        # The documented exception: SDPA gives 0 for a row whose logits are all −inf (its convention for a
        # fully masked row), and gradients that follow from it; every other row is as defined.
        assert torch.equal(out[0, 0, 3], torch.zeros_like(out[0, 0, 3])), out[0, 0, 3]
        assert torch.isnan(want[0][0, 0, 3]).all()
        rows = torch.ones(H, N, dtype=torch.bool)
        rows[0, 3] = False
        assert_same_ieee("out (other rows)", out[0][rows], want[0][0][rows])
        return
    for name, got, w in zip(("out", "dq", "dk", "dv", "score"), (out, q.grad, k.grad, v.grad, score), want):
        if name == "score" and not with_score:
            continue
        assert_same_ieee(name, got, w)
    if case == "k_inf" and with_score:
        assert torch.isnan(score).nonzero().flatten().tolist() == [5]  # one key's score, not every key's


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=["fp16", "bf16"])
def test_attention_half_precision_sdpa_on_the_cpu(dtype, tol):
    """The second documented exception (issue 24): fp16 / bf16 on the CPU without a score, SDPA's CPU flash kernel
    gives 0 (not NaN) for a row with a +inf logit; every other row is as defined (fp32 gives NaN: test_attention)."""
    q, k, v, do = (t.detach().cpu() for t in _attention_inputs("k_inf"))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    with torch.no_grad():
        out = attention(q, k, v, scale=SCALE, backend="torch")
    want = formulas.attention_ieee(q, k, v, do, SCALE)[0]
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double())
    plus_inf = torch.isposinf(logits).any(-1)  # (B, H, N): the rows with a +inf logit
    assert plus_inf.any() and torch.isnan(want[plus_inf]).all()
    assert torch.equal(out[plus_inf], torch.zeros_like(out[plus_inf]))
    assert_same_ieee("out (other rows)", out[~plus_inf], want[~plus_inf], tol)


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("scale", [NAN, INF, -INF, 0.0, -0.125, 0, 10 ** 400],
                         ids=["nan", "inf", "-inf", "0.0", "-0.125", "int-0", "int-1e400"])
def test_attention_rejects_scale(scale, backend):
    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    for score in (None, torch.zeros(4, device=DEVICE)):
        with pytest.raises(ValueError, match=r"^scale: expected a finite float > 0"):
            attention(q, q, q, scale=scale, score=score, backend=backend)


# ------------------------------------------------------------------------------------- attention with a bias

G_H, G_W = 5, 8


def _biased_attention_inputs(case: str):
    """q, k, v, dO as above (finite unless ``case`` says), a general bias (1, H, N, N) and a decomposed one (tables
    (B, H, N, G_H | G_W), merged-token positions with repeats), one non-finite value planted by ``case``."""
    q, k, v, do = (t.detach().cpu() for t in _attention_inputs("none"))
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(1, H, N, N, generator=g)
    bias_h, bias_w = torch.randn(B, H, N, G_H, generator=g), torch.randn(B, H, N, G_W, generator=g)
    key_h, key_w = torch.randint(0, G_H, (N,), generator=g), torch.randint(0, G_W, (N,), generator=g)
    key_h[:3], key_w[:3] = torch.tensor([2, 2, 1]), torch.tensor([3, 0, 3])
    if case == "bias_+inf":             # row 4 of head 0: P NaN at key 9 only, a NaN output row
        bias[0, 0, 4, 9] = INF
    elif case == "bias_-inf_mask":      # keys 10..19 masked for head 1: P = 0 there, everything finite
        bias[0, 1, :, 10:20] = -INF
    elif case == "bias_row_all_-inf":   # query 3 of head 0 sees no key: its row NaN (SDPA: 0)
        bias[0, 0, 3, :] = -INF
    elif case == "bias_nan":
        bias[0, 1, 6, 2] = NAN
    elif case == "bias_h_-inf":         # the keys at grid row 2 masked for every query of head 0
        bias_h[0, 0, :, 2] = -INF
    elif case == "bias_w_+inf":         # query 7 of head 1: P NaN at the keys of grid column 3
        bias_w[0, 1, 7, 3] = INF
    elif case == "bias_h_nan":          # query 5 of head 0: a NaN logit at the keys of grid row 1, a NaN row
        bias_h[0, 0, 5, 1] = NAN
    elif case == "v_inf":               # dS rows non-finite: d bias_h rows NaN (the one-hot product: 0 · inf)
        v[0, 1, 9, 3] = INF
        do = do.abs() + 0.1
    elif case == "dO_inf":
        do[0, 0, 6, 1] = INF
    else:
        raise ValueError(case)
    leaves = [t.to(DEVICE).requires_grad_() for t in (q, k, v, bias, bias_h, bias_w)]
    return leaves, key_h.to(DEVICE), key_w.to(DEVICE), do.to(DEVICE)


BIAS_CASES = ["bias_+inf", "bias_-inf_mask", "bias_row_all_-inf", "bias_nan", "bias_h_-inf", "bias_w_+inf",
              "bias_h_nan", "v_inf", "dO_inf"]


@pytest.mark.parametrize("backend, with_score", ATTENTION_BACKENDS)
@pytest.mark.parametrize("case", BIAS_CASES)
def test_attention_with_bias(case, backend, with_score):
    (q, k, v, bias, bias_h, bias_w), key_h, key_w, do = _biased_attention_inputs(case)
    score = torch.zeros(N, device=DEVICE) if with_score else None
    out = attention(q, k, v, scale=SCALE, score=score, bias=bias, bias_h=bias_h, bias_w=bias_w, key_h=key_h,
                    key_w=key_w, backend=backend)
    out.backward(do)
    want = formulas.biased_attention_ieee(q, k, v, do, SCALE, bias, bias_h, bias_w, key_h, key_w)
    got = (out, q.grad, k.grad, v.grad, score, bias.grad, bias_h.grad, bias_w.grad)
    names = ("out", "dq", "dk", "dv", "score", "d_bias", "d_bias_h", "d_bias_w")
    # A bias that needs a gradient keeps the torch backend off SDPA (run_attention): no exception, even without a
    # score, for a fully masked row.
    for name, g, w in zip(names, got, want):
        if name == "score" and not with_score:
            continue
        assert_same_ieee(name, g, w)


@pytest.mark.parametrize("case", BIAS_CASES[:7])
def test_attention_with_bias_inference_sdpa(case):
    """The torch backend's inference path (no gradient: SDPA, the bias materialised as its attn_mask) forward."""
    (q, k, v, bias, bias_h, bias_w), key_h, key_w, do = _biased_attention_inputs(case)
    with torch.no_grad():
        out = attention(q, k, v, scale=SCALE, bias=bias, bias_h=bias_h, bias_w=bias_w, key_h=key_h, key_w=key_w,
                        backend="torch")
    want = formulas.biased_attention_ieee(q, k, v, do, SCALE, bias, bias_h, bias_w, key_h, key_w)[0]
    if case == "bias_row_all_-inf":
        # SDPA's convention for a fully masked row (the documented exception): 0, not NaN; the other rows as defined.
        assert torch.equal(out[0, 0, 3], torch.zeros_like(out[0, 0, 3])) and torch.isnan(want[0, 0, 3]).all()
        rows = torch.ones(H, N, dtype=torch.bool)
        rows[0, 3] = False
        out, want = out[0][rows], want[0][rows]
    assert_same_ieee("out", out, want)
