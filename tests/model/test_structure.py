"""SPEC §2 (merge matrix, R = pinv M) and §4 (structure search), against independent re-derivations."""
import math

import pytest
import torch

import pm_kernels
from pm_kernels.structure import LayerStructure


def _random_layer(grid=(6, 7), seed=0, p_prune=0.15, p_centre=0.5):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    scores = torch.rand(n, generator=g, dtype=torch.float64) + 0.05
    u = torch.rand(n, generator=g)
    pruned = u < p_prune
    centres = (u > 1 - p_centre) & ~pruned
    return scores, pruned, centres


def _segment_of_each_patch(M):
    """Row that owns each patch column (by nonzero weight), -1 for a zero column."""
    nz = M[1:, 1:] != 0
    owner = torch.full((M.shape[1] - 1,), -1, dtype=torch.long)
    for j in range(nz.shape[1]):
        rows = torch.nonzero(nz[:, j]).flatten()
        assert rows.numel() <= 1, f"patch {j} is merged into several centres"
        if rows.numel():
            owner[j] = rows.item()
    return owner


@pytest.mark.parametrize("seed", range(4))
def test_merge_matrix_properties(seed):
    grid = (6, 7)
    scores, pruned, centres = _random_layer(grid, seed)
    M = pm_kernels.build_merge_matrix(scores, pruned, centres, grid)
    k, n = int(centres.sum()) + 1, scores.numel() + 1
    assert M.shape == (k, n) and M.dtype == scores.dtype
    assert torch.equal(M[0], torch.nn.functional.one_hot(torch.tensor(0), n).to(M.dtype))  # row 0 = e_0
    assert torch.all(M[1:, 0] == 0)
    assert torch.all(M[:, 1:][:, pruned] == 0), "pruned columns must be zero"

    centre_idx = torch.nonzero(centres).flatten()
    owner = _segment_of_each_patch(M)
    for row, c in enumerate(centre_idx.tolist()):
        assert M[row + 1, c + 1] == 1.0, "centre weight must be 1"
        members = torch.nonzero(owner == row).flatten()
        assert torch.allclose(M[row + 1, members + 1], scores[members] / scores[c])
    # Every kept (non-pruned) patch belongs to exactly one centre; segments are contiguous raster runs.
    assert torch.all(owner[~pruned] >= 0)
    kept_owner = owner[~pruned]
    assert torch.all(kept_owner[1:] >= kept_owner[:-1]), "segments must follow raster order"


def test_segments_hand_example_and_row_clip():
    # 3 × 4 grid; centres at patch 3 (last column of row 0) and 9. Midpoint ceil((3+9)/2) = 6, but
    # centre 3's row ends at 4: patches 4, 5 go to centre 9 (the authors' (c+1)//w test would keep them at 3).
    grid, n = (3, 4), 12
    scores = torch.arange(1, n + 1, dtype=torch.float64)
    pruned = torch.zeros(n, dtype=torch.bool)
    centres = torch.zeros(n, dtype=torch.bool)
    centres[[3, 9]] = True
    M = pm_kernels.build_merge_matrix(scores, pruned, centres, grid)
    owner = _segment_of_each_patch(M).tolist()
    assert owner == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    # Same row: centres 1 and 2 → midpoint ceil(1.5) = 2 ends centre 1's segment.
    centres = torch.zeros(n, dtype=torch.bool)
    centres[[1, 2]] = True
    owner = _segment_of_each_patch(pm_kernels.build_merge_matrix(scores, pruned, centres, grid)).tolist()
    assert owner == [0, 0] + [1] * 10
    # Midpoint inside a row: centres 0 and 3 → ceil(1.5) = 2: patches 0, 1 | 2, 3, ...
    centres = torch.zeros(n, dtype=torch.bool)
    centres[[0, 3]] = True
    owner = _segment_of_each_patch(pm_kernels.build_merge_matrix(scores, pruned, centres, grid)).tolist()
    assert owner == [0, 0] + [1] * 10


def test_identity_structure_is_identity():
    n = 12
    ones = torch.ones(n)
    M = pm_kernels.build_merge_matrix(ones, torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), (3, 4))
    assert torch.equal(M, torch.eye(n + 1))
    assert torch.equal(pm_kernels.init_reconstruct(M), torch.eye(n + 1))


@pytest.mark.parametrize("seed", range(3))
def test_pinv_passes_pruned_tokens_through_shortcut(seed):
    grid = (5, 5)
    scores, pruned, centres = _random_layer(grid, seed, p_prune=0.3)
    M = pm_kernels.build_merge_matrix(scores, pruned, centres, grid)
    R = pm_kernels.init_reconstruct(M)
    assert R.shape == (M.shape[1], M.shape[0])
    # R is the Moore-Penrose inverse: the four conditions that define it, checked without computing a pinv.
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M @ R @ M, M, **tol)
    torch.testing.assert_close(R @ M @ R, R, **tol)
    torch.testing.assert_close((M @ R).t(), M @ R, **tol)
    torch.testing.assert_close((R @ M).t(), R @ M, **tol)
    # The segments partition the patches, so M's rows have disjoint supports and pinv has a closed form:
    # R[j, i] = M[i, j] / ‖M_i‖².
    torch.testing.assert_close(R, M.t() / (M * M).sum(dim=1), **tol)
    assert torch.all(R[1:][pruned] == 0), "a pruned token's row of R must be zero"
    assert torch.allclose(M @ R, torch.eye(M.shape[0], dtype=M.dtype), atol=1e-12)
    keep_mask = torch.cat([torch.ones(1, dtype=torch.bool), ~pruned])
    x = torch.randn(2, M.shape[1], 6, dtype=torch.float64)
    z = torch.randn(2, M.shape[0], 6, dtype=torch.float64)  # whatever the transformer made of M x
    out = pm_kernels.reconstruct(z, R, x, keep_mask)
    assert torch.equal(out[:, 1:][:, pruned], x[:, 1:][:, pruned]), "pruned tokens must pass through exactly"


def _search_by_hand(scores, keep_rate, prune_rate, depth_discount):
    n_layers, n = scores.shape
    values = []
    s_hat = []
    for layer in range(n_layers):
        row = scores[layer].tolist()
        norm = math.sqrt(sum(v * v for v in row))
        row = [(1 - depth_discount * layer) * v / norm for v in row]
        s_hat.append(row)
        values += row
    ascending = sorted(values)
    tau_p = ascending[int(n * prune_rate) * n_layers]
    tau_k = sorted(values, reverse=True)[int(n * keep_rate) * n_layers - 1]
    return [([v < tau_p for v in row], [v >= tau_k and not v < tau_p for v in row]) for row in s_hat]


@pytest.mark.parametrize("keep_rate,prune_rate", [(0.6, 0.1), (0.4, 0.2), (0.7, 0.0), (1.0, 0.0)])
def test_search_structure_matches_spec(keep_rate, prune_rate):
    torch.manual_seed(1)
    n_layers, n = 12, 196
    scores = torch.rand(n_layers, n, dtype=torch.float64) * torch.linspace(0.5, 2, n_layers).unsqueeze(1)
    structure = pm_kernels.search_structure(scores, keep_rate=keep_rate, prune_rate=prune_rate)
    expected = _search_by_hand(scores, keep_rate, prune_rate, 0.025)
    assert len(structure) == n_layers
    for st, (pruned, centres) in zip(structure, expected):
        assert st.pruned.dtype == torch.bool and st.centres.dtype == torch.bool
        assert st.pruned.tolist() == pruned and st.centres.tolist() == centres
        assert st.keep == sum(centres) + 1
    mean_keep_fraction = sum(st.keep - 1 for st in structure) / (n_layers * n)
    assert abs(mean_keep_fraction - keep_rate) <= 1 / n, "mean keep fraction must equal keep_rate (±1 token)"
    assert sum(int(st.pruned.sum()) for st in structure) == int(n * prune_rate) * n_layers


def test_depth_discount_is_applied():
    # Identical scores in every layer: only the discount tells layers apart, so deeper layers keep fewer.
    n_layers, n = 12, 196
    scores = torch.rand(1, n).repeat(n_layers, 1)
    keeps = [st.keep for st in pm_kernels.search_structure(scores)]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] > keeps[-1]
    flat = [st.keep for st in pm_kernels.search_structure(scores, depth_discount=0.0)]
    assert len(set(flat)) == 1


def test_layer_structure_masks():
    st = LayerStructure(pruned=torch.tensor([True, False, False]), centres=torch.tensor([False, True, False]))
    assert st.keep == 2
    assert st.merged.tolist() == [False, False, True]
    assert st.keep_mask.tolist() == [True, False, True, True]


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_rate=0.0), "keep_rate"), (dict(keep_rate=1.5), "keep_rate"), (dict(keep_rate=-0.1), "keep_rate"),
    (dict(keep_rate=0.8, prune_rate=0.3), "prune_rate \\+ keep_rate"), (dict(prune_rate=1.0), "prune_rate"),
    (dict(keep_rate="0.6"), "keep_rate"), (dict(depth_discount=0.5), "depth_discount"),
])
def test_search_structure_rejects_bad_rates(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pm_kernels.search_structure(torch.rand(12, 16), **kwargs)


def test_search_structure_rejects_bad_scores():
    with pytest.raises(ValueError, match="scores"):
        pm_kernels.search_structure(torch.rand(16))
    with pytest.raises(TypeError, match="scores"):
        pm_kernels.search_structure(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="scores"):
        pm_kernels.search_structure(torch.tensor([[1.0, float("nan")]]))


def test_build_merge_matrix_rejects_bad_input():
    scores, pruned, centres = _random_layer((3, 4))
    with pytest.raises(ValueError, match="grid_size"):
        pm_kernels.build_merge_matrix(scores, pruned, centres, (4, 4))
    with pytest.raises(ValueError, match="grid_size"):
        pm_kernels.build_merge_matrix(scores, pruned, centres, 12)
    with pytest.raises(TypeError, match="pruned"):
        pm_kernels.build_merge_matrix(scores, pruned.float(), centres, (3, 4))
    with pytest.raises(TypeError, match="centres"):
        pm_kernels.build_merge_matrix(scores, pruned, centres.int(), (3, 4))
    with pytest.raises(ValueError, match="centres"):
        pm_kernels.build_merge_matrix(scores, pruned, centres[:-1], (3, 4))
    with pytest.raises(ValueError, match="scores"):
        pm_kernels.build_merge_matrix(-scores, pruned, centres, (3, 4))
    both = pruned.clone()
    both[centres.nonzero()[0]] = True
    with pytest.raises(ValueError, match="centres"):
        pm_kernels.build_merge_matrix(scores, both, centres, (3, 4))
    with pytest.raises(ValueError, match="M"):
        pm_kernels.init_reconstruct(torch.rand(5, 3))


def test_layer_without_centre_gets_its_best_patch():
    # After normalisation layer 1's top two patches outrank every patch of the flat layer 0, so with two
    # centres in all, layer 0 would merge its patches into nothing: its best (first, by argmax) patch is promoted.
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.9, 0.9]])
    structure = pm_kernels.search_structure(scores, keep_rate=0.25, prune_rate=0.0, depth_discount=0.0)
    assert structure[1].centres.tolist() == [True, True, False, False]
    assert int(structure[0].centres.sum()) == 1
    M = pm_kernels.build_merge_matrix(scores[0], structure[0].pruned, structure[0].centres, (2, 2))
    assert M.shape == (2, 5) and torch.all(M[1, 1:] > 0)
