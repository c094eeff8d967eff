"""The checks of a Prune-and-Merge block's structure and input (SPEC §1):

    shortcut = (1 − m) ⊙ x                 pruned tokens only
    z = M x                                 K tokens (merge)
    z = z + Attn(LN1(z)); z = z + MLP(LN2(z))      the layer's own body, on K tokens
    out = R z + shortcut                    all N tokens back (reconstruct)

Every PM layer class has a ``body`` (its host's layer computation); ``pm_kernels.layers`` runs merge → body →
reconstruct (one layer) or the chained form with fused boundaries (``PMBlocks``); ``optimize`` runs the same
``body`` between folded boundaries; ``pm_model.fused_block`` is the functional form.
"""
import torch

from . import token_ops
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["check_structure", "check_tokens"]


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
