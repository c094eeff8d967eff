"""FlopCounterMode counts attention (torch lacks formulas for its CPU SDPA kernel and for our custom ops)."""
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pm_kernels


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_attention_ops_are_counted():
    b, h, n, d = 2, 3, 10, 8
    q = torch.randn(b, h, n, d, requires_grad=True)
    expected = 4 * b * h * n * n * d + 8 * b * h * n * n * d  # forward + backward
    assert _flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == expected
    score = torch.zeros(n)
    assert _flops(lambda: pm_kernels.attention(q, q, q, score=score, backend="torch").sum().backward()) == expected


def test_deit_small_counts_the_papers_4_6_gmacs():
    model = timm.create_model("deit_small_patch16_224").eval()
    with torch.no_grad():
        gmacs = _flops(lambda: model(torch.randn(1, 3, 224, 224))) / 2e9
    assert abs(gmacs - 4.6) < 0.01
