"""``patch_timm``: turn a timm VisionTransformer into a Prune-and-Merge model, in place (ToMe-style class swap).

Each block becomes a ``PMBlock`` (a timm ``Block`` with parameters ``M`` (K×N), ``R`` (N×K) and a bool buffer
``keep_mask`` (N,)), and its attention a ``PMAttention`` that runs ``pm_kernels.attention`` (fused, and able to
emit the calibration score). State-dict keys stay timm's, plus ``blocks.i.M / .R / .keep_mask``.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from . import token_ops
from .attention import attention
from .block import check_block_inputs, fused_block, transformer_body
from .structure import LayerStructure, build_merge_matrix, identity_structure, init_reconstruct, search_structure

__all__ = ["PMBlock", "PMBlocks", "PMAttention", "patch_timm", "is_patched", "num_tokens", "set_backend"]


class PMAttention(Attention):
    """timm ``Attention`` whose core is ``pm_kernels.attention``.

    ``score_accumulator``: when set to a float32 (N,) tensor, the backward pass adds Σ_{b,h,q} P ⊙ dP into it.
    """

    backend: str = "auto"
    score_accumulator: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask: Prune-and-Merge attention takes no mask and no causal flag")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.training and self.attn_drop.p > 0:
            # Attention dropout is not in our kernels: fall back to SDPA (no score possible there).
            if self.score_accumulator is not None:
                raise RuntimeError("calibration score needs attention dropout off (call model.eval())")
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p, scale=self.scale)
        else:
            x = attention(q, k, v, scale=self.scale, score=self.score_accumulator, backend=self.backend)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PMBlock(Block):
    """timm pre-norm ``Block`` computing the PM block of SPEC §1 with its own ``M``, ``R`` and ``keep_mask``."""

    backend: str = "auto"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask: Prune-and-Merge blocks take no mask and no causal flag")
        return fused_block(x, self, self.M, self.R, self.keep_mask, backend=self.backend)

    def set_structure(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> None:
        """Install new M, R (as trainable parameters, in the block's dtype/device) and keep_mask."""
        ref = self.norm1.weight if getattr(self.norm1, "weight", None) is not None else self.attn.qkv.weight
        self.M = torch.nn.Parameter(M.detach().to(ref.device, ref.dtype).clone())
        self.R = torch.nn.Parameter(R.detach().to(ref.device, ref.dtype).clone())
        self.register_buffer("keep_mask", keep_mask.detach().to(ref.device, torch.bool).clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A PM checkpoint may carry another structure (other K): take its shapes before loading.
        # A dense timm checkpoint (no M/R/keep_mask at all) loads as the identity structure.
        keys = [prefix + name for name in ("M", "R", "keep_mask")]
        if all(k in state_dict for k in keys):
            M, R, mask = (state_dict[k] for k in keys)
            if M.shape != self.M.shape or R.shape != self.R.shape or mask.shape != self.keep_mask.shape:
                self.set_structure(torch.empty_like(M), torch.empty_like(R), mask.bool())
        elif not any(k in state_dict for k in keys) and any(k.startswith(prefix) for k in state_dict):
            n = self.keep_mask.shape[0]
            eye = torch.eye(n, dtype=self.M.dtype)
            state_dict = dict(state_dict)
            state_dict.update(zip(keys, (eye, eye, torch.ones(n, dtype=torch.bool))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PMBlocks(torch.nn.Sequential):
    """``model.blocks`` of a PM model: runs the blocks with each boundary as one fused op.

    Block by block, SPEC §1 is merge → body → reconstruct; chained, the reconstruct of block l and the merge of
    block l+1 become one ``reconstruct_merge`` (one pass over the N-token activations instead of two).
    Same math, same state-dict keys; each block still works alone (``blocks[i](x)``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        for blk in blocks:  # every check once, before any compute; the token ops below then skip theirs
            check_block_inputs(x, blk.M, blk.R, blk.keep_mask)
        z = token_ops.dispatch_merge(x, blocks[0].M, blocks[0].backend)
        for layer, blk in enumerate(blocks):
            z = transformer_body(blk, z)
            if layer + 1 < len(blocks):
                x, z = token_ops.dispatch_reconstruct_merge(z, blk.R, x, blk.keep_mask, blocks[layer + 1].M,
                                                            blk.backend)
            else:
                x = token_ops.dispatch_reconstruct(z, blk.R, x, blk.keep_mask, blk.backend)
        return x


def is_patched(model) -> bool:
    return isinstance(model, VisionTransformer) and len(model.blocks) > 0 and all(
        isinstance(b, PMBlock) for b in model.blocks)


def num_tokens(model: VisionTransformer) -> int:
    """N: CLS + patches."""
    return model.num_prefix_tokens + model.patch_embed.num_patches


def set_backend(model, backend: str) -> None:
    """Route every patched block's token ops and attention to ``backend`` (auto | cuda | triton | torch).

    The compiled extension ("cuda") has no attention kernel: with it, attention stays on "auto".
    """
    if backend not in ("auto", "cuda", "triton", "torch"):
        raise ValueError(f"backend: expected one of 'auto', 'cuda', 'triton', 'torch', got {backend!r}")
    for blk in model.blocks:
        blk.backend = backend
        blk.attn.backend = "auto" if backend == "cuda" else backend


def _check_vit(model) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model: expected a timm VisionTransformer (DeiT/ViT), got {type(model).__name__}")
    if getattr(model, "dist_token", None) is not None or type(model).__name__ == "VisionTransformerDistilled":
        raise ValueError("model: distilled DeiT (a distillation token) is not supported; "
                         "use the non-distilled DeiT/ViT")
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise ValueError(f"model: expected exactly one prefix token (CLS), got num_prefix_tokens="
                         f"{model.num_prefix_tokens} (class_token={model.cls_token is not None})")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("model: dynamic_img_size=True is not supported (PM needs a fixed token count N)")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(f"model.blocks[{i}]: expected a timm pre-norm Block with Attention, "
                            f"got {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}")


def patch_timm(model: VisionTransformer, structure: Optional[Sequence[LayerStructure]] = None,
               scores: Optional[torch.Tensor] = None, grid_size: Optional[Sequence[int]] = None
               ) -> VisionTransformer:
    """Make ``model`` a Prune-and-Merge model in place and return it.

    - no structure, no scores: the identity structure (M = I, R = I, keep_mask = 1), outputs equal the model's;
    - ``scores`` (L, N−1) only: the structure is searched with the default rates (see ``compress``);
    - ``structure`` (L per-layer ``pruned`` / ``centres``) and ``scores``: M from the scores (SPEC §2), R = pinv(M).
    ``grid_size`` (h, w) defaults to the patch grid of ``model.patch_embed``.
    """
    _check_vit(model)
    n_layers, n_patches = len(model.blocks), model.patch_embed.num_patches
    grid_size = tuple(model.patch_embed.grid_size) if grid_size is None else grid_size
    if scores is not None:
        expected = (n_layers, n_patches)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"scores: expected a tensor of shape (L, N-1) = {expected} for this model, got {got}")
        if structure is None:
            structure = search_structure(scores)
    if structure is None:
        structure = [identity_structure(n_patches) for _ in range(n_layers)]
    elif scores is None:
        raise ValueError("scores: needed with a structure, to weight the merge matrices (SPEC §2)")
    if len(structure) != n_layers:
        raise ValueError(f"structure: expected {n_layers} per-layer structures (one per block), got {len(structure)}")

    for layer, (blk, st) in enumerate(zip(model.blocks, structure)):
        layer_scores = scores[layer] if scores is not None else torch.ones(n_patches)
        M = build_merge_matrix(layer_scores.float(), st.pruned.cpu(), st.centres.cpu(), grid_size)
        R = init_reconstruct(M)
        keep_mask = torch.cat([torch.ones(1, dtype=torch.bool), ~st.pruned.cpu()])
        if not isinstance(blk, PMBlock):
            blk.__class__ = PMBlock
            blk.attn.__class__ = PMAttention
        blk.set_structure(M, R, keep_mask)
    if isinstance(model.blocks, torch.nn.Sequential) and not isinstance(model.blocks, PMBlocks):
        model.blocks.__class__ = PMBlocks
    return model
