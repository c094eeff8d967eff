"""ToMe's bipartite split follows the official code (facebookresearch/ToMe, tome/merge.py): every token, CLS
included, alternates into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); protected tokens get similarity −inf.
Hand examples pin which tokens land in A and B; a loop-by-loop reference checks random cases."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repo root: bench

from bench.peers.tome import bipartite_soft_matching, merge_wavg  # noqa: E402


def _e(*coords):
    v = torch.zeros(4)
    for axis, value in coords:
        v[axis] = value
    return v


def _run(metric_rows, x_values, r, protect_first):
    metric = torch.stack(metric_rows).unsqueeze(0).double()
    x = torch.tensor(x_values, dtype=torch.float64).view(1, -1, 1)
    y, s = merge_wavg(bipartite_soft_matching(metric, r, protect_first=protect_first), x, None)
    return y.flatten().tolist(), s.flatten().tolist()


def test_cls_in_set_a_protected():
    # tokens 0..4 = CLS, p1..p4.  A = {CLS, 2, 4}, B = {1, 3}  (the old split had A = {1, 3}, B = {2, 4}).
    # CLS is token 3's twin (similarity 1) but protected; 4 is 1's twin; 2 leans to 3 (similarity 0.71).
    r2 = 2 ** -0.5
    metric = [_e((3, 1)), _e((1, 1)), _e((2, r2), (3, r2)), _e((3, 1)), _e((1, 1))]
    x = [10., 1., 2., 4., 8.]
    # r = 1: the best pair (4 -> 1) merges; out = CLS, unmerged A (2), then B (1+4, 3)
    y, s = _run(metric, x, 1, 1)
    assert y == pytest.approx([10., 2., 4.5, 4.]) and s == [1., 1., 2., 1.]
    # r = 2 (the most: (5 - 1) // 2): 2 -> 3 as well; CLS is never merged although it is 3's twin
    y, s = _run(metric, x, 2, 1)
    assert y == pytest.approx([10., 4.5, 3.]) and s == [1., 2., 2.]


def test_distillation_token_in_set_b_protected():
    # tokens 0..5 = CLS, DIST, p1..p4.  A = {CLS, 2, 4}, B = {DIST, 3, 5}; nothing merges into DIST, although
    # token 2 is its twin: 2 goes to 3 (0.6) instead; 4 -> 5 (twins).  Output: CLS, DIST, then B 3 and 5.
    metric = [_e((0, 1)), _e((1, 1)), _e((1, 1)), _e((1, .6), (2, .8)), _e((3, 1)), _e((3, 1))]
    y, s = _run(metric, [100., 50., 2., 4., 8., 16.], 2, 2)
    assert y == pytest.approx([100., 50., 3., 12.]) and s == [1., 1., 2., 2.]


def test_no_prefix_token():
    # no protection: token 0 is in A and may merge (into its twin, token 1)
    metric = [_e((0, 1)), _e((0, 1)), _e((1, 1)), _e((2, 1))]
    y, s = _run(metric, [2., 4., 8., 16.], 1, 0)
    assert y == pytest.approx([8., 3., 16.]) and s == [1., 2., 1.]


def _reference(metric, x, r, p):
    """The split and matching written out token by token, for one image."""
    n = metric.shape[0]
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    r = min(r, (n - p) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    best = {}
    for i in a_set:
        if i < p:
            continue
        sims = [(float(m[i] @ m[j]), j) for j in b_set if j >= p]
        best[i] = max(sims, key=lambda t: (t[0], -t[1]))
    merged = sorted(best, key=lambda i: -best[i][0])[:r]
    groups = {j: [j] for j in b_set}
    for i in merged:
        groups[best[i][1]].append(i)
    unmerged_a = [i for i in a_set if i not in merged]
    order = list(range(p)) + [i for i in unmerged_a if i >= p] + [j for j in b_set if j >= p]
    out = [x[groups[t]].mean(0) if t in groups else x[t] for t in order]
    return torch.stack(out), [len(groups.get(t, [t])) for t in order]


@pytest.mark.parametrize("n,p,r", [(9, 1, 3), (10, 1, 4), (10, 2, 4), (7, 0, 3), (65, 1, 16), (8, 3, 2)])
def test_matches_token_by_token_reference(n, p, r):
    torch.manual_seed(n * 10 + p)
    metric = torch.randn(2, n, 6, dtype=torch.float64)
    x = torch.randn(2, n, 5, dtype=torch.float64)
    y, s = merge_wavg(bipartite_soft_matching(metric, r, protect_first=p), x, None)
    expect_len = n - min(r, (n - p) // 2)
    assert y.shape == (2, expect_len, 5)
    for b in range(2):
        ref, sizes = _reference(metric[b], x[b], r, p)
        torch.testing.assert_close(y[b], ref)
        assert s[b].flatten().tolist() == sizes
    assert not math.isnan(float(y.sum()))
