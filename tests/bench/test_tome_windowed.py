"""bench/peers/tome_windowed.py: ToMe with unmerge per window on a timm SAM encoder (the peer of issue 26)."""
import copy
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode
from timm.models.vision_transformer_sam import VisionTransformerSAM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root: bench

from bench.peers.tome import merge_by_plan, matching_plan  # noqa: E402
from bench.peers.tome_windowed import (_new_index, patch_tome_windowed, tome_windowed_macs,  # noqa: E402
                                       tome_windowed_tokens)


def sam(seed=0):
    torch.manual_seed(seed)
    model = VisionTransformerSAM(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2,
                                 mlp_ratio=2.0, window_size=4, global_attn_indexes=(1, 3), use_rel_pos=True,
                                 neck_chans=0, num_classes=0).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # SAM starts its relative-position tables at zero
    return model


def test_no_merging_is_the_dense_encoder_and_merging_keeps_every_position():
    dense = sam()
    tome = patch_tome_windowed(copy.deepcopy(dense), [0, 0, 0, 0])
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = dense.forward_features(x)
        assert (tome.forward_features(x) - want).abs().max() <= 1e-9
        tome._tome_r = [3, 2, 2, 1]
        out = tome.forward_features(x)
    assert out.shape == want.shape and tome._tome_tokens == tome_windowed_tokens(16, [3, 2, 2, 1])[1:]
    assert not torch.allclose(out, want)


def test_the_position_map_says_which_token_carries_each_input():
    g = torch.Generator().manual_seed(0)
    for n, r in ((16, 5), (13, 6)):
        plan = matching_plan(torch.randn(3, n, 8, generator=g), r, protect_first=0)
        holds = merge_by_plan(plan)(torch.eye(n).expand(3, n, n).contiguous())  # (B, n − r, n)
        new_index = _new_index(plan, n)
        assert torch.equal(holds.gather(1, new_index[:, None, :]).squeeze(1), torch.ones(3, n))


def test_analytic_macs_equal_the_traced_count():
    tome = patch_tome_windowed(sam().float(), [3, 2, 2, 1])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tome.forward_features(torch.randn(1, 1, 32, 32))
    assert tome_windowed_macs(tome, (8, 8), [3, 2, 2, 1]) == counter.get_total_flops() / 2
