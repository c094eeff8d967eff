"""The modules of a PM model: ``PMAttention``, ``PMBlock`` and ``PMBlocks`` (what ``patch_timm`` swaps in).

A PM block is a timm block subclass with parameters ``M`` (K×N), ``R`` (N×K) and a bool buffer ``keep_mask``
(N,); its ``body`` is the family's own math on K tokens, and ``forward`` is SPEC §1: merge → body →
reconstruct. ``PMBlocks`` (a model's ``blocks``) runs the same blocks with each boundary fused into one
``reconstruct_merge``. The structure is validated when it changes (``set_structure``, checkpoint load); a
forward checks only its input x.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from . import dispatch, token_ops
from .attention import attention_features, run_attention
from .block import check_structure, check_tokens, vit_body

__all__ = ["PMAttention", "PMBlock", "PMBlockMixin", "PMBlocks"]


def _no_mask(attn_mask, is_causal, what: str) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError(f"attn_mask: Prune-and-Merge {what} take no mask and no causal flag")


class PMAttention(Attention):
    """timm ``Attention`` whose core is ``pm_kernels.attention`` (fused, and able to emit the SPEC §3 score).

    ``score_accumulator``: when set to a float32 (N,) tensor, the backward pass adds Σ_{b,h,q} P ⊙ dP into it.
    ``backend``: auto | triton | torch (set by ``pm_kernels.set_backend``).
    """

    backend: str = "auto"
    score_accumulator: Optional[torch.Tensor] = None

    def init_pm(self) -> None:
        """Instance state of a swapped-in attention (class attributes are only defaults)."""
        self.backend = "auto"
        self.score_accumulator = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal, "attention layers")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        score = self.score_accumulator
        name = dispatch.select("attention", self.backend, q.device, q.dtype, head_dim=q.shape[-1],
                               features=attention_features(score, dropout_p), arg="q")
        x = run_attention(q, k, v, float(self.scale), score, dropout_p, name)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PMBlockMixin:
    """SPEC §1 around a family's ``body``: the parameters M, R, the buffer keep_mask, and their installation."""

    backend: str = "auto"

    def body(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every family defines it
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        return self.keep_mask.numel()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal, "blocks")
        check_tokens(x, self.num_tokens, self.M)
        z = token_ops.run_merge(x, self.M, self.backend)
        return token_ops.run_reconstruct(self.body(z), self.R, x, self.keep_mask, self.backend)

    def set_structure(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> None:
        """Install M, R (trainable parameters, in the block's dtype/device) and keep_mask, after checking them.

        The token count N (M's columns) must stay the block's own once it has a structure.
        """
        n = self.num_tokens if hasattr(self, "keep_mask") else (M.shape[1] if M.dim() == 2 else -1)
        check_structure(M, R, keep_mask, n)
        self._install(M, R, keep_mask)

    def _install(self, M, R, keep_mask) -> None:
        ref = self.norm1.weight if getattr(self.norm1, "weight", None) is not None else self.attn.qkv.weight
        self.M = torch.nn.Parameter(M.detach().to(ref.device, ref.dtype).clone())
        self.R = torch.nn.Parameter(R.detach().to(ref.device, ref.dtype).clone())
        self.register_buffer("keep_mask", keep_mask.detach().to(ref.device, torch.bool).clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A PM checkpoint may carry another structure (other K): check it and take its shapes before loading.
        # A dense timm checkpoint (no M/R/keep_mask at all) loads as the identity structure.
        keys = [prefix + name for name in ("M", "R", "keep_mask")]
        present = [k in state_dict for k in keys]
        if all(present):
            M, R, mask = (state_dict[k] for k in keys)
            check_structure(M, R, mask, self.num_tokens, where=prefix)
            if M.shape != self.M.shape or R.shape != self.R.shape:
                self._install(torch.empty_like(M), torch.empty_like(R), mask)
        elif any(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"state_dict: {prefix}M, R and keep_mask come together (a PM structure), "
                             f"missing {', '.join(missing)}")
        elif any(k.startswith(prefix) for k in state_dict):
            eye = torch.eye(self.num_tokens, dtype=self.M.dtype)
            state_dict = dict(state_dict)
            state_dict.update(zip(keys, (eye, eye, torch.ones(self.num_tokens, dtype=torch.bool))))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PMBlock(PMBlockMixin, Block):
    """timm pre-norm ``Block`` computing the PM block of SPEC §1 with its own ``M``, ``R`` and ``keep_mask``."""

    def body(self, z: torch.Tensor) -> torch.Tensor:
        return vit_body(self, z)


class PMBlocks(torch.nn.Sequential):
    """``model.blocks`` of a PM model: the blocks with each boundary as one fused op.

    Block by block, SPEC §1 is merge → body → reconstruct; chained, the reconstruct of block l and the merge of
    block l+1 become one ``reconstruct_merge`` (one pass over the N-token activations instead of two).
    Same math, same state-dict keys; each block still works alone (``blocks[i](x)``). With
    ``grad_checkpointing`` (``model.set_grad_checkpointing()``) each step (body + boundary) is checkpointed.
    """

    grad_checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        check_tokens(x, blocks[0].num_tokens, blocks[0].M)
        z = token_ops.run_merge(x, blocks[0].M, blocks[0].backend)
        for layer, blk in enumerate(blocks):
            after = blocks[layer + 1] if layer + 1 < len(blocks) else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, z = checkpoint(_step, blk, after, x, z, use_reentrant=False)
            else:
                x, z = _step(blk, after, x, z)
        return x


def _step(blk, after, x, z):
    """Block ``blk``'s body on its K tokens, then the boundary to block ``after`` (or the exit)."""
    z = blk.body(z)
    if after is None:
        return token_ops.run_reconstruct(z, blk.R, x, blk.keep_mask, blk.backend), None
    return token_ops.run_reconstruct_merge(z, blk.R, x, blk.keep_mask, after.M, blk.backend)
