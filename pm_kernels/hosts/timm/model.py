"""timm's Prune-and-Merge classes and ``patch_timm`` (ToMe-style class swap, in place).

The model's class becomes its PM class (``forward_features`` runs the blocks as one fused chain, gradient
checkpointing included, and checks the image size against the structure), ``model.blocks`` a ``PMBlocks``, each
block its family's PM block and each attention its PM attention. The identity structure is installed (the dense
model: outputs equal the model's). State-dict keys stay timm's, plus ``blocks.i.M / .R / .keep_mask`` (and
``.centre_index`` for EVA) where a block has a structure.

Families (``FAMILIES``, the timm host's one model table: patching, ``pm_*`` registry entries, checkpoint names and
arguments; ``families``): timm ``VisionTransformer`` and its subclasses (DeiT, distilled DeiT, ViT with
registers, DINOv2, CLIP, global-average-pool ViTs: any number of prefix tokens) and ``Eva`` (EVA, EVA-02).
"""
import warnings
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.layers import Attention, LayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter

from ...layers import PMAttentionMixin, PMBlockMixin, PMBlocks, _fx_symbolic_tracing, _no_mask
from ...structure import LayerStructure
from ..base import check_grid_matches, structure_grid
from .eva import PMEvaAttention, PMEvaBlock
from .families import (DIGITS_SEG_VIT, DIGITS_SEG_VIT_KWARGS, DIGITS_VIT, DIGITS_VIT_KWARGS, VIT_ARGS, CheckpointNames,
                       Registered, TimmFamily, heads_divide_width)

torch.fx.wrap("_no_mask")  # FX records the mask check as a call (see pm_kernels.layers)

__all__ = ["ViTBody", "PMAttention", "PMBlock", "PMModelMixin", "PMVisionTransformer",
           "PMVisionTransformerDistilled", "PMEva", "OptimizedPM", "patch_timm", "is_patched", "family_of",
           "head_reads_prefix_only", "FAMILIES"]


# ------------------------------------------------------------------------------------------ blocks

class ViTBody:
    """The ordinary pre-norm ViT block (timm ``Block``: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2)
    on the K merged tokens; a method, so TorchScript compiles it with the block."""

    def body(self, z: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = z + self.drop_path1(self.ls1(self.attn(self.norm1(z))))
        return z + self.drop_path2(self.ls2(self.mlp(self.norm2(z))))


class PMAttention(PMAttentionMixin, Attention):
    """timm ``Attention`` whose core is ``pm_kernels.attention``."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PMBlock(PMBlockMixin, ViTBody, Block):
    """timm pre-norm ``Block`` computing the PM block of SPEC §1 with its own ``M``, ``R`` and ``keep_mask``."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        return self.pm_forward(x)


# ------------------------------------------------------------------------------------------ models

class PMModelMixin:
    """What a PM model adds to its timm class: the fused block chain, the structure's patch grid."""

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
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(self.patch_embed.grid_size)
        check_grid_matches(self.structure_grid(), grid, tuple(self.patch_embed.patch_size))

    def structure_grid(self) -> Optional[Tuple[int, int]]:
        """The patch grid the installed structure is for (None: the identity runs any grid)."""
        return structure_grid(list(self.blocks), self.num_prefix_tokens, tuple(self.patch_embed.grid_size))

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


# ------------------------------------------------------------------------------------------ the one model table

_DEIT_FILTER = partial(vit_checkpoint_filter, adapt_layer_scale=True)
_EVA02 = dict(patch_size=14, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))


def _deit(size: str, dim: int, heads: int, distilled: bool = False) -> Tuple[str, Registered]:
    base = f"deit_{size}_{'distilled_' if distilled else ''}patch16_224"
    cls = PMVisionTransformerDistilled if distilled else PMVisionTransformer
    return f"pm_{base}", Registered(base, cls, _DEIT_FILTER, dict(patch_size=16, embed_dim=dim, depth=12,
                                                                  num_heads=heads))


def _vit(base: str, **args) -> Tuple[str, Registered]:
    return f"pm_{base}", Registered(base, PMVisionTransformer, vit_checkpoint_filter, args)


def _eva02(base: str, **args) -> Tuple[str, Registered]:
    return f"pm_{base}", Registered(base, PMEva, eva_checkpoint_filter, dict(_EVA02, img_size=224, **args))


_DINOV2 = dict(patch_size=14, depth=12, init_values=1e-5)

# Every timm family pm_kernels supports, and everything it knows about each (``families.TimmFamily``): how it is
# patched, its pm_* timm registry entries, the names and arguments a checkpoint may give the command line.
FAMILIES: Tuple[TimmFamily, ...] = (
    TimmFamily(
        base=VisionTransformer, mixin=PMVisionTransformerMixin, pm_class=PMVisionTransformer,
        blocks={Block: (PMBlock, Attention, PMAttention)},
        registered=dict([
            _deit("tiny", 192, 3), _deit("small", 384, 6), _deit("base", 768, 12),
            _deit("tiny", 192, 3, distilled=True), _deit("small", 384, 6, distilled=True),
            _deit("base", 768, 12, distilled=True),
            _vit("vit_small_patch14_dinov2", embed_dim=384, num_heads=6, **_DINOV2),
            _vit("vit_small_patch14_reg4_dinov2", embed_dim=384, num_heads=6, reg_tokens=4, no_embed_class=True,
                 **_DINOV2),
            _vit("vit_base_patch14_reg4_dinov2", embed_dim=768, num_heads=12, reg_tokens=4, no_embed_class=True,
                 **_DINOV2),
            _vit("vit_base_patch16_clip_224", patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
                 norm_layer=partial(LayerNorm, eps=1e-5)),
            _vit("vit_medium_patch16_gap_256", patch_size=16, embed_dim=512, depth=12, num_heads=8,
                 class_token=False, global_pool="avg", qkv_bias=False, init_values=1e-6, fc_norm=False),
            _vit("vit_little_patch16_reg1_gap_256", patch_size=16, embed_dim=320, depth=14, num_heads=5,
                 init_values=1e-5, mlp_ratio=5.6, class_token=False, no_embed_class=True, reg_tokens=1,
                 global_pool="avg"),
        ]),
        checkpoint_names=(
            CheckpointNames("the digits demo ViT", (DIGITS_VIT,), defaults=DIGITS_VIT_KWARGS),
            CheckpointNames("the digits segmentation demo's backbone ViT", (DIGITS_SEG_VIT,),
                            defaults=DIGITS_SEG_VIT_KWARGS),
            CheckpointNames("timm ViT/DeiT (one CLS token, pre-norm blocks)", ("vit_*", "deit_*", "pm_deit_*"),
                            exclude=("*distilled*",)),
        ),
        args=VIT_ARGS, check=heads_divide_width),
    TimmFamily(
        base=Eva, mixin=PMEvaMixin, pm_class=PMEva,
        blocks={EvaBlock: (PMEvaBlock, EvaAttention, PMEvaAttention)},
        registered=dict([_eva02("eva02_tiny_patch14_224", embed_dim=192, depth=12, num_heads=3),
                         _eva02("eva02_small_patch14_224", embed_dim=384, depth=12, num_heads=6)])),
)
_PM_CLASSES: Dict[type, type] = {VisionTransformerDistilled: PMVisionTransformerDistilled,
                                 **{family.base: family.pm_class for family in FAMILIES}}


def family_of(model) -> Optional[TimmFamily]:
    """The row of ``FAMILIES`` whose timm class ``model`` is an instance of (None: no timm family)."""
    for family in FAMILIES:
        if isinstance(model, family.base):
            return family
    return None


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
    """Make the timm ViT ``model`` a Prune-and-Merge model in place with the identity structure (the dense model:
    outputs equal the model's) and return it. A model already patched keeps its structure.
    (``pm_kernels.patch`` does the same for a model of any supported library.)

    ``structure`` / ``scores`` / ``grid_size`` are deprecated (use ``pm_kernels.compress``): they install a
    searched structure as before.
    """
    deprecated = structure is not None or scores is not None or grid_size is not None
    if deprecated:
        warnings.warn("patch_timm(model, structure=..., scores=..., grid_size=...) is deprecated and will be removed "
                      "in 0.3: call pm_kernels.patch_timm(model), then pm_kernels.compress(model, scores, ...)",
                      DeprecationWarning, stacklevel=2)
    if not is_patched(model):
        family = family_of(model)
        if family is None:
            names = ", ".join(f.base.__name__ for f in FAMILIES)
            raise TypeError(f"model: expected a timm {names} (DeiT, ViT, DINOv2, CLIP, EVA, ...), "
                            f"got {type(model).__name__}")
        mixin, blocks_table = family.mixin, family.blocks
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
        from ...pm_model import check_scores, install_structure  # the deprecated path only (removed in 0.3)
        from ...structure import search_structure
        if scores is None:
            raise ValueError("scores: needed with a structure, to weight the merge matrices (SPEC §2)")
        if structure is None:
            structure = search_structure(check_scores(model, scores, grid_size), num_prefix=model.num_prefix_tokens)
        install_structure(model, structure, scores, grid_size)
    return model


# ------------------------------------------------------------------------------------------ inference

class OptimizedPM(nn.Module):
    """Inference-only timm PM model with folded boundaries (``pm_kernels.optimize``); shares the weights of the
    model it was made from: ``forward`` (the model's logits) and ``forward_features`` (all N tokens after the
    final norm, for dense heads)."""

    def __init__(self, model: nn.Module, folded: nn.Module):
        super().__init__()
        self.model = model
        self.chain = folded

    @property
    def pm_source(self) -> nn.Module:
        return self.model

    @property
    def folded_dtype(self) -> torch.dtype:
        return self.chain.folded_dtype

    @property
    def kept(self):
        return self.chain.kept

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, rope = m.embed(images)
        return m.norm(self.chain(x, m.blocks, rope))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, rope = m.embed(images)
        # the head reading only the prefix is decided per call: reset_classifier(global_pool=...) is followed
        tokens = self.chain(x, m.blocks, rope, prefix_only=head_reads_prefix_only(m))
        return m.forward_head(m.norm(tokens))


def head_reads_prefix_only(model) -> bool:
    """The head reads the prefix tokens only (CLS pooling, no attention pool): the exit may reconstruct just them."""
    return model.num_prefix_tokens > 0 and model.global_pool == "token" and getattr(model, "attn_pool", None) is None
