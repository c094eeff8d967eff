"""``fused_block``: the Prune-and-Merge block of SPEC §1, as a function of a timm pre-norm ``Block``.

    shortcut = (1 − m) ⊙ x                 pruned tokens only
    z = M x                                 K tokens (merge)
    z = z + Attn(LN1(z)); z = z + MLP(LN2(z))
    out = R z + shortcut                    all N tokens back (reconstruct)
"""
import torch
from torch import nn

from . import token_ops
from ._checks import check_same_device

__all__ = ["fused_block", "check_block_inputs"]


def check_block_inputs(x: torch.Tensor, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> None:
    """All shape/dtype/device checks of a PM block, before any compute."""
    token_ops._check_x("x", x)
    token_ops._check_merge_matrix("M", M, x.shape[1])
    token_ops._check_reconstruct_matrix(R, keep_mask, x.shape[1], M.shape[0])
    check_same_device(x=x, M=M, R=R, keep_mask=keep_mask)


def transformer_body(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The ordinary pre-norm ViT block on the K merged tokens."""
    z = z + block.drop_path1(block.ls1(block.attn(block.norm1(z))))
    return z + block.drop_path2(block.ls2(block.mlp(block.norm2(z))))


def fused_block(x: torch.Tensor, block: nn.Module, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                *, backend: str = "auto") -> torch.Tensor:
    """One PM block: x (B, N, C), M (K, N), R (N, K), keep_mask bool (N,) → (B, N, C).

    ``block`` is a timm pre-norm ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2).
    ``backend`` picks the merge/reconstruct kernels (auto | cuda | triton | torch).
    """
    check_block_inputs(x, M, R, keep_mask)
    z = token_ops.dispatch_merge(x, M, backend)
    z = transformer_body(block, z)
    return token_ops.dispatch_reconstruct(z, R, x, keep_mask, backend)
