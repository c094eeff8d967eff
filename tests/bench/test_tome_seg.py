"""bench/peers/tome_seg.py: ToMe's merging (the same as bench/peers/tome.py) with tomesd-style unmerge at the exit."""
import os
import sys

import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root: bench

from bench.peers.tome import bipartite_soft_matching, patch_tome  # noqa: E402
from bench.peers.tome_seg import bipartite_matching_with_map, patch_tome_seg  # noqa: E402
from pm_kernels import Segmenter  # noqa: E402


def test_same_merge_as_tome_and_a_correct_position_map():
    g = torch.Generator().manual_seed(0)
    for protect, n, r in ((1, 17, 5), (0, 16, 8), (2, 21, 3)):
        metric, x = torch.randn(3, n, 8, generator=g), torch.randn(3, n, 6, generator=g)
        merge, new_index = bipartite_matching_with_map(metric, r, protect)
        torch.testing.assert_close(merge(x), bipartite_soft_matching(metric, r, protect)(x))
        # merging the identity says which input tokens each output token holds: input i sits in new_index[i]
        holds = merge(torch.eye(n).expand(3, n, n).contiguous())  # (B, n - r, n)
        assert holds.shape[1] == n - r
        assert torch.equal(holds.gather(1, new_index[:, None, :]).squeeze(1), torch.ones(3, n))
        assert torch.equal(new_index[:, :protect], torch.arange(protect).expand(3, -1))


def test_unmerged_features_and_segmenter():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=3, num_heads=1)
    dense, tome, plain = VisionTransformer(**kw).eval(), VisionTransformer(**kw).eval(), VisionTransformer(**kw)
    tome.load_state_dict(dense.state_dict())
    plain.load_state_dict(dense.state_dict())
    patch_tome_seg(tome, [10, 10, 10])
    patch_tome(plain, [10, 10, 10])
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        full = tome.forward_features(x)
        merged = plain.forward_features(x)  # ToMe without unmerge: 65 - 30 tokens, same values
        assert full.shape == (2, 65, 32) and merged.shape == (2, 35, 32)
        assert tome._tome_info["tokens"] == [55, 45, 35]
        src = tome._tome_info["source"]
        torch.testing.assert_close(full, merged.gather(1, src[..., None].expand(-1, -1, 32)))
        assert len(torch.unique(src[0])) == 35, "every merged token is copied to all of its sources"
        tome.r = 0  # nothing merged: the dense model
        torch.testing.assert_close(tome.forward_features(x), dense.forward_features(x))
        tome.r = [10, 10, 10]
    seg = Segmenter(tome, 11, "mask", dropout=0.0).eval()
    with torch.no_grad():
        assert seg(x).shape == (2, 11, 32, 32)
