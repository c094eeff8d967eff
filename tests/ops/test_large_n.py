"""Large token counts (segmentation: N = 1025 at 512², 1601 at 640², 4097 at 1024² with patch 16).

Small channels and heads keep the Triton interpreter affordable; the token count is what is under test: offsets,
masks of ragged last blocks, the fused boundary's N-token tile (which cannot launch on a GPU above
``FUSED_MAX_TOKENS``: the launchers must take the two-product path, checked by recording launches with GPU
settings), the compiled extension's CPU kernels, and the merge-matrix construction at these N.
"""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pm_kernels  # noqa: E402
from pm_kernels import dispatch, reference as ref, token_ops  # noqa: E402
from pm_kernels.structure import build_merge_matrix, init_reconstruct, search_structure  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: triton_aot.py
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
N_LARGE = 4100  # > 4096: past 2^12 and past every power-of-two block of 4096, ragged last blocks
needs_triton = pytest.mark.skipif(not dispatch.usable("triton", torch.device(DEVICE)),
                                  reason="triton cannot run here (no CUDA, no TRITON_INTERPRET=1)")
needs_ext = pytest.mark.skipif(not dispatch.usable("cuda", torch.device("cpu")),
                               reason="the compiled extension pm_kernels._C is not built")


def _rel(out, want):
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    return (out - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def _token_inputs(B, N, K, K2, C, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(B, N, C, generator=g), torch.randn(B, K, C, generator=g)
    M, R, M2 = torch.randn(K, N, generator=g) / N ** 0.5, torch.randn(N, K, generator=g), \
        torch.randn(K2, N, generator=g) / N ** 0.5
    keep = torch.rand(N, generator=g) > 0.2
    gx, gz = torch.randn(B, N, C, generator=g), torch.randn(B, K2, C, generator=g)
    leaf = lambda t: t.to(device).requires_grad_()  # noqa: E731
    return [leaf(t) for t in (x, z, M, R, M2)], keep.to(device), gx.to(device), gz.to(device)


def _check_token_ops(backend, N, K=40, K2=24, C=16, B=1, tol=1e-5):
    (x, z, M, R, M2), keep, gx, gz = _token_inputs(B, N, K, K2, C, seed=N)
    cases = {
        "merge": (lambda a: (token_ops.merge(a[0], a[2], backend=backend),), lambda a: (ref.merge_reference(a[0], a[2]),)),
        "reconstruct": (lambda a: (token_ops.reconstruct(a[1], a[3], a[0], keep, backend=backend),),
                        lambda a: (ref.reconstruct_reference(a[1], a[3], a[0], keep),)),
        "reconstruct_merge": (lambda a: token_ops.reconstruct_merge(a[1], a[3], a[0], keep, a[4], backend=backend),
                              lambda a: ref.reconstruct_merge_reference(a[1], a[3], a[0], keep, a[4])),
    }
    for name, (run, want) in cases.items():
        ours = [t.detach().clone().requires_grad_() for t in (x, z, M, R, M2)]
        theirs = [t.detach().double().clone().requires_grad_() for t in (x, z, M, R, M2)]
        out, exp = run(ours), want(theirs)
        grads = [gx if o.shape == gx.shape else gz if o.shape == gz.shape else None for o in out]
        grads = [g if g is not None else torch.randn_like(o) for g, o in zip(grads, out)]
        torch.autograd.backward(out, grads)
        torch.autograd.backward(exp, [g.double() for g in grads])
        for i, (o, e) in enumerate(zip(out, exp)):
            assert o.shape == e.shape and _rel(o, e) <= tol, f"{name} output {i}: {_rel(o, e):.2e}"
        for arg, (a, b) in zip("x z M R M2".split(), zip(ours, theirs)):
            if b.grad is not None:
                assert a.grad is not None and _rel(a.grad, b.grad) <= tol, f"{name} d{arg}: {_rel(a.grad, b.grad):.2e}"


@pytest.mark.slow  # interpreter at N = 4100: 22 s (token ops) and 47 s (attention) on a quiet core
@needs_triton
def test_triton_token_ops_above_4096_tokens():
    # N > FUSED_MAX_TOKENS: reconstruct_merge takes the two-product path the GPU launch needs, under test here.
    from pm_kernels.kernels.token_ops_triton import FUSED_MAX_TOKENS
    assert N_LARGE > FUSED_MAX_TOKENS
    _check_token_ops("triton", N_LARGE)


@needs_triton
def test_triton_fused_boundary_at_its_largest_tile():
    from pm_kernels.kernels.token_ops_triton import FUSED_MAX_TOKENS
    _check_token_ops("triton", FUSED_MAX_TOKENS, K=20, K2=12, C=8)


@needs_ext
def test_extension_cpu_token_ops_above_4096_tokens():
    _check_token_ops("cuda", N_LARGE, K=300, K2=200, C=24, B=2, tol=1e-5)


@pytest.mark.slow  # interpreter at N = 4100: 22 s (token ops) and 47 s (attention) on a quiet core
@needs_triton
def test_triton_attention_above_4096_tokens():
    # One head of dim 32 (the smallest the kernels take), forward, backward and the SPEC §3 score.
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 1, N_LARGE, 32, generator=g).to(DEVICE) for _ in range(4))
    got, want = [], []
    for backend, dtype, out_list in (("triton", torch.float32, got), ("torch", torch.float64, want)):
        qq, kk, vv = (t.to(dtype).clone().requires_grad_() for t in (q, k, v))
        score = torch.zeros(N_LARGE, device=DEVICE, dtype=torch.float32 if backend == "triton" else torch.float64)
        if backend == "torch":  # float64 ground truth, written out: softmax(q kᵀ s) v and Σ_q P ⊙ dP per key
            p = torch.softmax(qq @ kk.transpose(-1, -2) * 32 ** -0.5, dim=-1)
            p.retain_grad()
            out = p @ vv
            out.backward(do.double())
            score = (p * p.grad).sum(dim=(0, 1, 2))
        else:
            out = pm_kernels.attention(qq, kk, vv, score=score, backend="triton")
            out.backward(do)
        out_list += [out, qq.grad, kk.grad, vv.grad, score]
    for name, a, b in zip(("out", "dq", "dk", "dv", "score"), got, want):
        assert torch.isfinite(a).all() and _rel(a, b) <= 1e-4, f"{name}: {_rel(a, b):.2e}"


def test_gpu_launches_never_hold_more_than_the_fused_tile():
    # Record what the launchers would launch on an H100 (no interpreter, no GPU needed) at segmentation sizes.
    code = ("import json, sys, torch; sys.path.insert(0, %r); import triton_aot as ta\n"
            "for n in (785, 1025, 1601, 4097):\n"
            "    for l in ta.token_op_launches(1, n, int(0.7 * n), int(0.6 * n), 64, torch.bfloat16):\n"
            "        print(json.dumps({'n': n, 'kernel': l.name, 'block_n': l.constexprs.get('BLOCK_N')}))\n" % TESTS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(TESTS))
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, proc.stderr[-2000:]
    fused = [r for r in rows if r["kernel"].startswith("_reconstruct_merge")]
    assert {r["n"] for r in fused} == {785}, "the fused boundary must launch at N <= 1024 only"
    assert all(r["block_n"] <= 1024 for r in fused)
    assert {r["n"] for r in rows} == {785, 1025, 1601, 4097}, "every size launches its two-product path"


def test_merge_matrix_closed_form_pinv_equals_svd_pinv():
    g = torch.Generator().manual_seed(0)
    grid = (17, 23)
    for keep, prune, prefix in ((0.7, 0.0, 1), (0.5, 0.2, 2), (0.9, 0.05, 0)):
        scores = torch.rand(1, grid[0] * grid[1], generator=g, dtype=torch.float64) + 0.01
        st = search_structure(scores, keep_rate=keep, prune_rate=prune, num_prefix=prefix)[0]
        M = build_merge_matrix(scores[0], st.pruned, st.centres, grid, prefix)
        R = init_reconstruct(M)
        assert torch.allclose(R, torch.linalg.pinv(M), atol=1e-12)
    dense = torch.rand(5, 9, generator=g, dtype=torch.float64)  # overlapping rows: the SVD path
    assert torch.allclose(init_reconstruct(dense), torch.linalg.pinv(dense), atol=1e-12)


def test_merge_matrix_at_1601_tokens():
    # 640² at patch 16: a 40 × 40 grid. M R = I (full row rank), and each kept patch is in exactly one row.
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(1, 1600, generator=g) + 0.01
    st = search_structure(scores, keep_rate=0.7, prune_rate=0.1, thresholds="per_layer")[0]
    M = build_merge_matrix(scores[0], st.pruned, st.centres, (40, 40))
    R = init_reconstruct(M)
    assert M.shape == (int(st.centres.sum()) + 1, 1601) and R.shape == (1601, M.shape[0])
    assert torch.allclose(M @ R, torch.eye(M.shape[0]), atol=1e-5)
    owners = (M[1:, 1:] != 0).sum(0)
    assert torch.equal(owners, (~st.pruned).long())
    assert torch.all(R[1:][st.pruned] == 0), "a pruned patch's row of R is 0 (it passes by the shortcut)"
