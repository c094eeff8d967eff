"""The Prune-and-Merge block of SPEC §1, written once, and the checks of a block's structure.

    shortcut = (1 − m) ⊙ x                 pruned tokens only
    z = M x                                 K tokens (merge)
    z = z + Attn(LN1(z)); z = z + MLP(LN2(z))      the block's own body, on K tokens
    out = R z + shortcut                    all N tokens back (reconstruct)

``ViTBody.body`` is the pre-norm body of a timm ``Block`` (EVA's lives in ``pm_kernels.eva``); every PM block
class has a ``body``, and ``pm_kernels.layers`` runs merge → body → reconstruct (one block) or the chained form
with fused boundaries (``PMBlocks``); ``optimize`` runs the same ``body`` between folded boundaries.
"""
from typing import Optional

import torch
from torch import nn

from . import token_ops
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["fused_block", "ViTBody", "check_structure", "check_tokens"]


class ViTBody:
    """The ordinary pre-norm ViT block (timm ``Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2)
    on the K merged tokens; a method, so TorchScript compiles it with the block."""

    def body(self, z: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = z + self.drop_path1(self.ls1(self.attn(self.norm1(z))))
        return z + self.drop_path2(self.ls2(self.mlp(self.norm2(z))))


def check_structure(M, R, keep_mask, n_tokens: int, where: str = "", values: bool = True) -> None:
    """A block's structure, checked where it changes (install, checkpoint load), never per forward.

    M (K, N) and R (N, K) float with 1 <= K <= N = ``n_tokens``, finite (``values``: the one check that reads
    the data, a device sync on a GPU); keep_mask bool (N,). ``where`` prefixes the argument names in errors.
    """
    check_tensor(f"{where}M", M, ndim=2, dtypes=FLOAT_DTYPES, what=f"shape (K, {n_tokens}) with 1 <= K <= {n_tokens}")
    k = M.shape[0]
    if M.shape[1] != n_tokens or not 1 <= k <= n_tokens:
        raise ValueError(f"{where}M: expected shape (K, {n_tokens}) with 1 <= K <= {n_tokens}, got {tuple(M.shape)}")
    token_ops.check_reconstruct_matrix(R, keep_mask, n_tokens, k, name=f"{where}R")
    check_same_device(**{f"{where}M": M, f"{where}R": R, f"{where}keep_mask": keep_mask})
    for name, t in ((f"{where}M", M), (f"{where}R", R)) if values else ():
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite values")


def check_tokens(x: torch.Tensor, n_tokens: int, ref: torch.Tensor) -> None:
    """A block's input: float (B, N, C) with N = ``n_tokens``, on ``ref``'s device: the only per-forward check."""
    token_ops.check_x("x", x)
    if x.shape[1] != n_tokens:
        raise ValueError(f"x: expected {n_tokens} tokens (shape (B, {n_tokens}, C)) for this block's structure, "
                         f"got shape {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"x: expected a tensor on {ref.device} like the block's M, got {x.device}")


def fused_block(x: torch.Tensor, block: nn.Module, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                *, backend: str = "auto") -> torch.Tensor:
    """One PM block: x (B, N, C), M (K, N), R (N, K), keep_mask bool (N,) → (B, N, C).

    ``block`` is a timm pre-norm ``Block`` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) or any
    PM block (its own ``body``). ``backend`` picks the merge/reconstruct kernels (auto | cuda | triton | torch).
    """
    token_ops.check_x("x", x)
    check_structure(M, R, keep_mask, x.shape[1], values=False)
    check_same_device(x=x, M=M)
    z = token_ops.run_merge(x, M, backend)
    z = block.body(z) if hasattr(block, "body") else ViTBody.body(block, z)
    return token_ops.run_reconstruct(z, R, x, keep_mask, backend)
