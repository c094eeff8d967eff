"""FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode`` that it lacks: our attention custom ops and
torch's CPU flash-attention kernel (SDPA on the CPU). Without them, attention counts as 0 FLOPs and every
GFLOPs figure taken on a CPU is short by 4·B·H·N²·D per attention forward.

Convention (torch's): 2 FLOPs per multiply-add. Forward: QKᵀ and PV, 4·B·H·N²·D. Backward: dV, dP, dQ, dK,
8·B·H·N²·D (the recomputation of P is not counted, as torch does for its own kernels).
"""
import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["attention_forward_flops", "attention_backward_flops"]


def attention_forward_flops(q_shape) -> int:
    b, h, n, d = q_shape
    return 4 * b * h * n * n * d


def attention_backward_flops(q_shape) -> int:
    return 2 * attention_forward_flops(q_shape)


def _register(op_names, count):
    for name in op_names:
        namespace, op = name.split("::")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is None:  # an op this torch does not have
            continue

        @register_flop_formula(packet)
        def _formula(*shapes, out_shape=None, **kwargs):
            return count(shapes[0])


_register(("pm_kernels::attention_fwd", "aten::_scaled_dot_product_flash_attention_for_cpu"),
          lambda q_shape: attention_forward_flops(q_shape))
# The backward ops take grad_out first; its shape equals q's.
_register(("pm_kernels::attention_bwd", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
          lambda grad_shape: attention_backward_flops(grad_shape))
