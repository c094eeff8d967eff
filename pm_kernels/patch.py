"""``patch_timm``: turn a timm ViT into a Prune-and-Merge model, in place (ToMe-style class swap).

The model's class becomes its PM class (``forward_features`` runs the blocks as one fused chain, gradient
checkpointing included, and checks the image size against the structure), ``model.blocks`` a ``PMBlocks``, each
block its family's PM block and each attention its PM attention. The identity structure is installed (the dense
model: outputs equal the model's). ``compress`` installs a searched structure through ``install_structure``.
State-dict keys stay timm's, plus ``blocks.i.M / .R / .keep_mask`` (and ``.centre_index`` for EVA) where a block
has a structure.

Families (``FAMILIES``): timm ``VisionTransformer`` and its subclasses (DeiT, distilled DeiT, ViT with
registers, DINOv2, CLIP, global-average-pool ViTs: any number of prefix tokens) and ``Eva`` (EVA, EVA-02).
"""
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from .dispatch import model_backend
from .eva import PMEvaAttention, PMEvaBlock
from .layers import PMAttention, PMBlock, PMBlockMixin, PMBlocks, _fx_symbolic_tracing, _no_mask
from .structure import LayerStructure, search_structure, structure_matrices

torch.fx.wrap("_no_mask")  # FX records the mask check as a call (see pm_kernels.layers)

__all__ = ["PMVisionTransformer", "PMVisionTransformerDistilled", "PMEva", "patch_timm", "install_structure", "is_patched", "num_tokens",
           "set_backend", "FAMILIES"]


class PMModelMixin:
    """What a PM model adds to its timm class: the fused block chain, the structure's patch grid."""

    pm_grid_size: Optional[Tuple[int, int]] = None  # the patch grid the structure is built for; None: identity

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.blocks.grad_checkpointing = enable  # checkpointed inside the chain: the fused boundaries survive

    def _check_grid(self, x: torch.Tensor) -> None:
        if not torch.jit.is_scripting():
            self._check_grid_eager(x)

    @torch.jit.unused
    def _check_grid_eager(self, x: torch.Tensor) -> None:
        """x: patch embeddings. A compressed structure runs only on the grid it was built for."""
        if _fx_symbolic_tracing():
            return
        want = self.structure_grid()
        if want is None:
            return
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        if grid != want:
            p = self.patch_embed.patch_size
            raise ValueError(f"x: this compressed model is built for {want[0] * p[0]}x{want[1] * p[1]} images (a "
                             f"{want[0]}x{want[1]} patch grid), got {grid[0] * p[0]}x{grid[1] * p[1]} ({grid[0]}x"
                             f"{grid[1]} patches); compress it for that size (img_size=...) or use the identity "
                             "structure")

    def structure_grid(self) -> Optional[Tuple[int, int]]:
        """The patch grid the installed structure is for (None: the identity runs any grid).

        Set by ``compress``; for a structure loaded from a checkpoint, the model's grid if its token count
        matches, else the square grid of that count.
        """
        n = next((b.num_tokens for b in self.blocks if b.num_tokens is not None), None)
        if n is None:
            return None
        patches = n - self.num_prefix_tokens
        grid = self.pm_grid_size
        if grid is None or grid[0] * grid[1] != patches:
            h, w = self.patch_embed.grid_size
            side = int(round(patches ** 0.5))
            if h * w == patches:
                grid = (h, w)
            elif side * side == patches:
                grid = (side, side)
            else:
                raise ValueError(f"model: the structure is for {patches} patches, which is not this model's "
                                 f"{h}x{w} grid nor a square one; compress with img_size=(H, W)")
            self.pm_grid_size = grid
        return grid

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        # timm's forward_features, except that the blocks always run as one PMBlocks chain (timm hands them to
        # checkpoint_seq one by one under gradient checkpointing, which would unfuse every boundary).
        _no_mask(attn_mask, is_causal)
        x, rope = self.embed(x)
        return self.norm(self.blocks(x, rope))


class PMVisionTransformerMixin(PMModelMixin):
    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images → the N tokens the first block takes (and no rotary embedding)."""
        x = self.patch_embed(images)
        self._check_grid(x)
        return self.norm_pre(self.patch_drop(self._pos_embed(x))), None


class PMEvaMixin(PMModelMixin):
    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images → the N tokens the first block takes, and the rotary embedding of the patches."""
        x = self.patch_embed(images)
        self._check_grid(x)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), rope


class PMVisionTransformer(PMVisionTransformerMixin, VisionTransformer):
    """A timm VisionTransformer whose blocks are Prune-and-Merge blocks (identity structure when built)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        patch_timm(self)


class PMVisionTransformerDistilled(PMVisionTransformerMixin, VisionTransformerDistilled):
    """A timm distilled DeiT (CLS + distillation token, two heads) with Prune-and-Merge blocks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        patch_timm(self)


class PMEva(PMEvaMixin, Eva):
    """A timm Eva (EVA, EVA-02) whose blocks are Prune-and-Merge blocks (identity structure when built)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        patch_timm(self)


# One row per family: timm model class → (PM model mixin, {timm block class: (PM block, timm attn, PM attn)}).
FAMILIES: Dict[type, Tuple[type, Dict[type, Tuple[type, type, type]]]] = {
    VisionTransformer: (PMVisionTransformerMixin, {Block: (PMBlock, Attention, PMAttention)}),
    Eva: (PMEvaMixin, {EvaBlock: (PMEvaBlock, EvaAttention, PMEvaAttention)}),
}
_PM_CLASSES: Dict[type, type] = {VisionTransformer: PMVisionTransformer, VisionTransformerDistilled:
                                  PMVisionTransformerDistilled, Eva: PMEva}


def _family(model) -> Tuple[type, Dict[type, Tuple[type, type, type]]]:
    for base, family in FAMILIES.items():
        if isinstance(model, base):
            return family
    names = ", ".join(base.__name__ for base in FAMILIES)
    raise TypeError(f"model: expected a timm {names} (DeiT, ViT, DINOv2, CLIP, EVA, ...), got {type(model).__name__}")


def _pm_class(cls: type, mixin: type) -> type:
    """The PM class of a timm model class (made once for a subclass, as ToMe does)."""
    if issubclass(cls, PMModelMixin):
        return cls
    if cls not in _PM_CLASSES:
        _PM_CLASSES[cls] = type(f"PM{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _PM_CLASSES[cls]


def is_patched(model) -> bool:
    return (isinstance(model, PMModelMixin) and len(model.blocks) > 0
            and all(isinstance(b, PMBlockMixin) for b in model.blocks))


def num_tokens(model, grid_size: Optional[Sequence[int]] = None) -> int:
    """N: prefix tokens + patches (of ``grid_size``, default the model's patch grid)."""
    h, w = model.patch_embed.grid_size if grid_size is None else grid_size
    return model.num_prefix_tokens + h * w


def set_backend(model, backend: str) -> None:
    """Route every patched block's token ops and attention to ``backend`` (auto | cuda | triton | torch).

    An op without that backend stays on "auto" (the extension, "cuda", has no attention kernel).
    """
    if backend not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch_timm), got {type(model).__name__}")
    for blk in model.blocks:
        blk.backend = model_backend("merge", backend)
        blk.attn.backend = model_backend("attention", backend)


def _check_supported(model, blocks_table) -> None:
    if not isinstance(model.blocks, (torch.nn.Sequential, torch.nn.ModuleList)) or len(model.blocks) == 0:
        raise TypeError(f"model.blocks: expected a non-empty nn.Sequential / nn.ModuleList of blocks, "
                        f"got {type(model.blocks).__name__}")
    for i, blk in enumerate(model.blocks):
        row = blocks_table.get(type(blk))
        if row is None or type(blk.attn) is not row[1]:
            known = ", ".join(f"{b.__name__} with {a.__name__}" for b, (_, a, _) in blocks_table.items())
            raise TypeError(f"model.blocks[{i}]: Prune-and-Merge supports {known}; got {type(blk).__name__} with "
                            f"{type(getattr(blk, 'attn', None)).__name__}")
    if getattr(model, "rope_mixed", False) or getattr(model, "rope", None) is not None and not hasattr(
            model.rope, "feat_shape"):
        raise ValueError("model: this rotary embedding (per-depth 'mixed' / MRoPE) is not supported by "
                         "Prune-and-Merge; use rope_type='cat' (EVA-02's)")


def patch_timm(model, structure: Optional[Sequence[LayerStructure]] = None,
               scores: Optional[torch.Tensor] = None, grid_size: Optional[Sequence[int]] = None):
    """Make ``model`` a Prune-and-Merge model in place with the identity structure (the dense model: outputs
    equal the model's) and return it. A model already patched keeps its structure.

    ``structure`` / ``scores`` / ``grid_size`` are deprecated (use ``pm_kernels.compress``): they install a
    searched structure as before.
    """
    deprecated = structure is not None or scores is not None or grid_size is not None
    if deprecated:
        warnings.warn("patch_timm(model, structure=..., scores=..., grid_size=...) is deprecated and will be removed "
                      "in 0.3: call pm_kernels.patch_timm(model), then pm_kernels.compress(model, scores, ...)",
                      DeprecationWarning, stacklevel=2)
    if not is_patched(model):
        mixin, blocks_table = _family(model)
        _check_supported(model, blocks_table)
        for blk in model.blocks:
            pm_block, _, pm_attn = blocks_table[type(blk)]
            blk.__class__ = pm_block
            blk.init_pm(model.num_prefix_tokens)
            blk.attn.__class__ = pm_attn
            blk.attn.init_pm()
        model.blocks.__class__ = PMBlocks
        model.blocks.grad_checkpointing = bool(getattr(model, "grad_checkpointing", False))
        model.__class__ = _pm_class(type(model), mixin)
    if deprecated:
        if scores is None:
            raise ValueError("scores: needed with a structure, to weight the merge matrices (SPEC §2)")
        if structure is None:
            structure = search_structure(check_scores(model, scores, grid_size), num_prefix=model.num_prefix_tokens)
        install_structure(model, structure, scores, grid_size)
    return model


def check_scores(model, scores, grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    h, w = model.patch_embed.grid_size if grid_size is None else grid_size
    expected = (len(model.blocks), h * w)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a tensor of shape (L, num_patches) = {expected} for this model "
                         f"({h}x{w} patches), got {got}")
    return scores


def _grid(model, grid_size) -> Tuple[int, int]:
    if grid_size is None:
        return tuple(model.patch_embed.grid_size)
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid_size)):
        raise ValueError(f"grid_size: expected (h, w), two positive ints, got {grid_size!r}")
    if tuple(grid_size) != tuple(model.patch_embed.grid_size) and not getattr(model, "dynamic_img_size", False):
        raise ValueError(f"grid_size: this model takes {tuple(model.patch_embed.img_size)} images only "
                         f"(a {tuple(model.patch_embed.grid_size)} patch grid), got {tuple(grid_size)}; build it "
                         "with dynamic_img_size=True for other sizes")
    return tuple(grid_size)


def install_structure(model, structure: Sequence[LayerStructure], scores: torch.Tensor,
                      grid_size: Optional[Sequence[int]] = None) -> None:
    """Install per-layer ``structure`` into a PM model: M from ``scores`` (SPEC §2), R = pinv(M), keep masks.

    ``grid_size`` (h, w): the patch grid the structure is for (default the model's); another than the model's
    needs ``dynamic_img_size=True``. A layer whose structure is the identity gets none (the dense block).
    """
    if not is_patched(model):
        raise TypeError(f"model: expected a PM model (pm_kernels.patch_timm), got {type(model).__name__}")
    grid = _grid(model, grid_size)
    check_scores(model, scores, grid)
    if len(structure) != len(model.blocks):
        raise ValueError(f"structure: expected {len(model.blocks)} per-layer structures (one per block), "
                         f"got {len(structure)}")
    P = model.num_prefix_tokens
    for layer, st in enumerate(structure):
        if not isinstance(st, LayerStructure) or st.num_prefix != P:
            raise ValueError(f"structure[{layer}]: expected a LayerStructure with num_prefix={P} "
                             f"(this model's prefix tokens), got {st!r:.80}")
    patch_drop = getattr(getattr(model, "patch_drop", None), "prob", 0.0) or 0.0
    if patch_drop > 0 and any(bool(st.pruned.any() or not st.centres.all()) for st in structure):
        raise ValueError(f"model: patch dropout (patch_drop_rate={patch_drop}) changes the token count; a "
                         "compressed structure needs a fixed one (build the model with patch_drop_rate=0)")
    n = num_tokens(model, grid)
    for blk, matrices in zip(model.blocks, structure_matrices(structure, scores, grid)):
        if matrices is None:  # every patch its own centre: the identity, run as the dense block
            blk.set_identity()
        else:
            blk.set_structure(*matrices, n_tokens=n)
    model.pm_grid_size = grid
