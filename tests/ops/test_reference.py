"""pm_kernels.reference, the ground truth of the package, against the tests' independent float64 formulas.

The torch backend runs these functions, so every backend test leans on them; here they are called directly,
including the pieces the public ops do not expose (the attention LSE, the hand-written backward, the score).
"""
import pytest
import torch

import formulas
from helpers import assert_close, token_op_inputs
from pm_kernels import reference as ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_token_op_references(dtype):
    t = token_op_inputs(2, 9, 4, 3, 6, dtype, torch.float32, seed=3)
    # Weights are used in the activations' dtype: round them as the op does before the float64 formula.
    M, R, M_next = (w.to(dtype) for w in (t.M, t.R, t.M_next))
    assert_close("merge", ref.merge_reference(t.x, t.M), formulas.merge(t.x, M), dtype)
    assert_close("reconstruct", ref.reconstruct_reference(t.z, t.R, t.x, t.keep_mask),
                 formulas.reconstruct(t.z, R, t.x, t.keep_mask), dtype)
    x_next, z_next = ref.reconstruct_merge_reference(t.z, t.R, t.x, t.keep_mask, t.M_next)
    want_x, want_z = formulas.reconstruct_merge(t.z, R, t.x, t.keep_mask, M_next)
    assert x_next.dtype == z_next.dtype == dtype
    assert_close("x'", x_next, want_x, dtype)
    assert_close("z'", z_next, want_z, dtype)


def test_pruned_tokens_take_the_shortcut():
    # One hand-checkable case: R = 0, so x' is x on the pruned tokens and 0 on the kept ones.
    x = torch.arange(12, dtype=torch.float64).view(1, 4, 3)
    keep = torch.tensor([True, False, True, False])
    out = ref.reconstruct_reference(torch.ones(1, 2, 3, dtype=torch.float64), torch.zeros(4, 2), x, keep)
    assert torch.equal(out, torch.where(keep[None, :, None], 0.0, x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_attention_reference_forward_backward_score(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 3, 11, 8, generator=g).to(dtype) for _ in range(4))
    scale = 0.4
    out, lse = ref.attention_forward_reference(q, k, v, scale)
    want_out, A = formulas.attention(q, k, v, scale)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    want_lse = torch.log(torch.exp(logits).sum(dim=-1))
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    assert (out.double() - want_out).norm() <= tol * want_out.norm()
    assert (lse.double() - want_lse).abs().max() <= max(tol, 1e-6) * want_lse.abs().max()

    score = torch.full((11,), 0.25)  # the reference adds into the score, it never overwrites it
    dq, dk, dv = ref.attention_backward_reference(do, q, k, v, out, lse, scale, score)
    _, want_dq, want_dk, want_dv, want_score = formulas.attention_with_grads(q, k, v, do, scale)
    for name, got, want in (("dq", dq, want_dq), ("dk", dk, want_dk), ("dv", dv, want_dv)):
        assert got.dtype == dtype
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= tol, f"{name}: relative error {err:.2e}"
    err = ((score.double() - 0.25 - want_score).abs().max() / want_score.abs().max()).item()
    assert err <= 1e-5, f"score: relative error {err:.2e}"  # accumulated into fp32


def test_attention_reference_autograd_matches_its_backward():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    score = torch.zeros(7)
    ref.attention_reference(q, k, v, score=score).sum().backward()  # default scale: head dim ** -0.5
    _, dq, dk, dv, want_score = formulas.attention_with_grads(q, k, v, torch.ones(1, 2, 7, 4), 4 ** -0.5)
    for got, want in ((q.grad, dq), (k.grad, dk), (v.grad, dv)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-7)
