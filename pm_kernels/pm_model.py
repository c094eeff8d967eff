"""Operations on a Prune-and-Merge model of any host (timm, transformers, open_clip), through its ``Host``.

``is_patched``, ``num_tokens``, ``structure_grid``, ``check_scores``, ``install_structure`` (the one installer of
a searched structure: ``patch`` gives the identity, ``compress`` calls this), ``set_backend`` and the functional
``fused_block``. None of them knows a host library's names.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from . import token_ops
from ._checks import check_same_device
from .block import check_structure
from .dispatch import model_backend
from .hosts import host_of, layer_body, resolve
from .hosts.base import structure_grid as _structure_grid
from .structure import LayerStructure

__all__ = ["is_patched", "num_tokens", "structure_grid", "check_scores", "grid_of_size", "install_structure",
           "set_backend", "fused_block", "require_patched"]


def is_patched(model) -> bool:
    """``model`` (or the backbone a task model names) is a Prune-and-Merge model of a supported host."""
    try:
        host, backbone = resolve(model)
    except TypeError:
        return False
    return host.is_patched(backbone)


def require_patched(model, what: str = "a PM model (pm_kernels.patch / compress)"):
    """(host, backbone) of a patched model; TypeError otherwise."""
    host, backbone = resolve(model)
    if not host.is_patched(backbone):
        raise TypeError(f"model: expected {what}, got {type(backbone).__name__} with unpatched layers")
    return host, backbone


def num_tokens(model, grid_size: Optional[Sequence[int]] = None) -> int:
    """N: prefix tokens + patches (of ``grid_size``, default the model's patch grid)."""
    host = host_of(model)
    h, w = host.grid(model) if grid_size is None else grid_size
    return host.num_prefix(model) + h * w


def structure_grid(model) -> Optional[Tuple[int, int]]:
    """The patch grid the installed structure is for (None: the identity runs any grid); see
    ``hosts.base.structure_grid``."""
    host = host_of(model)
    return _structure_grid(host.layers(model), host.num_prefix(model), host.grid(model))


def check_scores(model, scores, grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    host = host_of(model)
    h, w = host.grid(model) if grid_size is None else grid_size
    expected = (len(host.layers(model)), h * w)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor of shape (L, num_patches) = {expected} for this model "
                         f"({h}x{w} patches), got {got}")
    return scores


def _grid(model, grid_size) -> Tuple[int, int]:
    host = host_of(model)
    own = tuple(host.grid(model))
    if grid_size is None:
        return own
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid_size)):
        raise ValueError(f"grid_size: expected (h, w), two positive ints, got {grid_size!r}")
    if tuple(grid_size) != own and not host.any_size(model):
        p = host.patch_size(model)
        raise ValueError(f"grid_size: this model takes {(own[0] * p[0], own[1] * p[1])} images only (a {own} "
                         f"patch grid), got {tuple(grid_size)}; build it for other sizes (timm: "
                         "dynamic_img_size=True)")
    return tuple(grid_size)


def grid_of_size(model, img_size) -> Optional[Tuple[int, int]]:
    """The patch grid of an image size (H, W) or int, checked against the model's patch size; None for None."""
    if img_size is None:
        return None
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    ph, pw = host_of(model).patch_size(model)
    if (not isinstance(img_size, (tuple, list)) or len(img_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in img_size)
            or img_size[0] % ph or img_size[1] % pw):
        raise ValueError(f"img_size: expected (H, W), positive ints that are multiples of the patch size "
                         f"{(ph, pw)}, got {img_size!r}")
    return img_size[0] // ph, img_size[1] // pw


def install_structure(model, structure: Sequence[LayerStructure], scores: torch.Tensor,
                      grid_size: Optional[Sequence[int]] = None) -> None:
    """Install per-layer ``structure`` into a PM model: M from ``scores`` (SPEC §2), R = pinv(M), keep masks.

    ``grid_size`` (h, w): the patch grid the structure is for (default the model's); another than the model's
    needs a model that runs other sizes. A layer whose structure is the identity gets none (the dense layer).
    """
    host, model = require_patched(model)
    grid = _grid(model, grid_size)
    check_scores(model, scores, grid)
    layers = host.layers(model)
    if len(structure) != len(layers):
        raise ValueError(f"structure: expected {len(layers)} per-layer structures (one per layer), "
                         f"got {len(structure)}")
    P = host.num_prefix(model)
    for layer, st in enumerate(structure):
        if not isinstance(st, LayerStructure) or st.num_prefix != P:
            raise ValueError(f"structure[{layer}]: expected a LayerStructure with num_prefix={P} "
                             f"(this model's prefix tokens), got {st!r:.80}")
    if any(bool(st.pruned.any() or not st.centres.all()) for st in structure):
        host.check_compressible(model)
    for blk, st, layer_scores in zip(layers, structure, scores):
        blk.install_searched(st, layer_scores, grid)


def set_backend(model, backend: str) -> None:
    """Route every PM layer's token ops and attention to ``backend`` (auto | cuda | triton | torch).

    An op without that backend stays on "auto" (the extension, "cuda", has no attention kernel).
    """
    if backend not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch), got {type(model).__name__}")
    host, backbone = resolve(model)
    for layer in host.layers(backbone):
        layer.backend = model_backend("merge", backend)
        host.attention(layer).backend = model_backend("attention", backend)


def fused_block(x: torch.Tensor, block: nn.Module, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                *, backend: str = "auto") -> torch.Tensor:
    """One PM block: x (B, N, C), M (K, N), R (N, K), keep_mask bool (N,) → (B, N, C).

    ``block``: a PM layer of any host (its own ``body``) or a supported host's plain pre-norm layer (e.g. a timm
    ``Block``). ``backend`` picks the merge/reconstruct kernels (auto | cuda | triton | torch).
    """
    token_ops.check_x("x", x)
    check_structure(M, R, keep_mask, x.shape[1], values=False)
    check_same_device(x=x, M=M)
    body = block.body if hasattr(block, "body") else layer_body(block)
    z = token_ops.run_merge(x, M, backend)
    return token_ops.run_reconstruct(body(z), R, x, keep_mask, backend)
