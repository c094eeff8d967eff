"""The host-neutral parts of a PM model: the state of a PM attention and a PM layer, and the fused chain.

A PM layer is a host's own layer class with ``PMBlockMixin`` (the hosts make the subclasses: timm's ``PMBlock``,
transformers' and open_clip's layers). A layer with a structure holds parameters ``M`` (K×N), ``R`` (N×K) and a
bool buffer ``keep_mask`` (N,); its ``pm_forward`` is SPEC §1: merge → ``body`` (the host layer's own math, on K
tokens) → reconstruct. A layer without one (the identity structure, ``M is None``) is the dense layer: no
product by I, any token count. ``PMBlocks`` runs a list of PM layers with each boundary between two compressed
layers fused into one ``reconstruct_merge``. The structure is validated when it changes (``set_structure``,
checkpoint load); a forward checks only its input x.

TorchScript (``torch.jit.script``) and FX symbolic tracing see the same math in standard ops (SDPA, matmuls),
not the dispatch; torch.compile and torch.export trace the custom ops themselves.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.fx._symbolic_trace as _fx
from torch.utils.checkpoint import checkpoint

from . import dispatch, token_ops
from .attention import attention_features, run_attention
from .block import check_structure, check_tokens
from .structure import LayerStructure, layer_matrices

__all__ = ["PMAttentionMixin", "PMBlockMixin", "PMBlocks", "attend"]


def _no_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("attn_mask: Prune-and-Merge models take no mask and no causal flag")


torch.fx.wrap("_no_mask")  # FX records the check as a call: a traced module still refuses a mask when it runs


def _merge_plain(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(M.to(x.dtype), x)


def _reconstruct_plain(R: torch.Tensor, z: torch.Tensor, keep_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(R.to(x.dtype), z) + (~keep_mask).to(x.dtype).unsqueeze(-1) * x


def _fx_symbolic_tracing() -> bool:
    """True under FX symbolic tracing (torch.fx, torchvision feature extraction), not under torch.compile/export."""
    symbolic = getattr(_fx, "is_fx_symbolic_tracing", None)  # torch >= 2.12; older: the raw flag
    if symbolic is not None:
        return symbolic()
    return _fx._get_is_fx_tracing() and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------- attention

class PMAttentionMixin:
    """The state of a PM attention: its core is ``pm_kernels.attention`` (fused, and able to emit the SPEC §3
    score). ``init_pm`` also works on a host's attention module that is not swapped (as a plain function).

    ``score_accumulator``: when set to a float32 (N,) tensor, the backward pass adds Σ_{b,h,q} P ⊙ dP into it.
    ``backend``: auto | triton | torch (set by ``pm_kernels.set_backend``).
    ``score_queries`` (class attribute, optional): the queries that see a key when not all N do (a windowed
    attention's window); calibration normalises by it.
    """

    def init_pm(self) -> None:
        self.backend: str = "auto"
        self.score_accumulator: Optional[torch.Tensor] = None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                dropout_p: float) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        else:
            return attend(self, q, k, v, scale, dropout_p)


@torch.jit.unused
def attend(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """q, k, v (B, H, N, D) → (B, H, N, D) through ``pm_kernels.attention`` on ``module``'s backend, adding the
    SPEC §3 score into ``module.score_accumulator`` when it is set (FX symbolic tracing sees SDPA)."""
    if _fx_symbolic_tracing():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    score = getattr(module, "score_accumulator", None)
    backend = getattr(module, "backend", "auto")
    name = dispatch.select("attention", backend, q.device, q.dtype, head_dim=q.shape[-1],
                           features=attention_features(score, dropout_p), arg="q")
    return run_attention(q, k, v, float(scale), score, dropout_p, name)


# ------------------------------------------------------------------------------------------------- blocks

class PMBlockMixin:
    """SPEC §1 around a host layer's ``body(z, *extra)``: M, R, keep_mask (or none: the identity), their
    installation. ``pm_grid``: the patch grid the installed structure is for (set by the installer)."""

    structure_keys = ("M", "R", "keep_mask")  # state-dict entries of a structure (a family may add its own)

    def init_pm(self, num_prefix: int) -> None:
        """State of a swapped-in block: the identity structure (no M, R, keep_mask)."""
        self.backend: str = "auto"
        self.num_prefix: int = num_prefix
        self.pm_grid: Optional[Tuple[int, int]] = None
        self.register_parameter("M", None)
        self.register_parameter("R", None)
        self.register_buffer("keep_mask", None)

    @property
    def is_identity(self) -> bool:
        return self.M is None

    @property
    def num_tokens(self) -> Optional[int]:
        """N the structure is built for (None for the identity, which runs any N)."""
        return None if self.keep_mask is None else self.keep_mask.numel()

    def num_kept(self, n_tokens: int) -> int:
        """K: tokens the body runs on for an N-token input."""
        return n_tokens if self.M is None else self.M.shape[0]

    @property
    def num_pruned(self) -> int:
        return 0 if self.keep_mask is None else int((~self.keep_mask).sum())

    def pm_forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """merge → body → reconstruct (the body alone for the identity)."""
        M, R, keep_mask = self.M, self.R, self.keep_mask
        if M is not None:
            if R is not None:
                if keep_mask is not None:
                    if torch.jit.is_scripting():
                        return _reconstruct_plain(R, self.body(_merge_plain(M, x), rope), keep_mask, x)
                    else:
                        return self._pm_forward_dispatched(x, M, R, keep_mask, rope)
        return self.body(x, rope)

    @torch.jit.unused
    def _pm_forward_dispatched(self, x: torch.Tensor, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                               rope: Optional[torch.Tensor]) -> torch.Tensor:
        if _fx_symbolic_tracing():
            return _reconstruct_plain(R, self.body(_merge_plain(M, x), rope), keep_mask, x)
        check_tokens(x, keep_mask.numel(), M)
        z = token_ops.run_merge(x, M, self.backend)
        return token_ops.run_reconstruct(self.body(z, rope), R, x, keep_mask, self.backend)

    # ---- installing a structure (the only places it changes, so the only places it is checked)

    def set_structure(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor,
                      n_tokens: Optional[int] = None) -> None:
        """Install M, R (trainable parameters, in the block's dtype/device) and keep_mask, after checking them.

        N (M's columns) must be the block's own token count when it has one, or ``n_tokens`` when given.
        """
        n = n_tokens if n_tokens is not None else (self.num_tokens or (M.shape[-1] if M.dim() == 2 else -1))
        check_structure(M, R, keep_mask, n)
        self._check_prefix_kept(keep_mask, "keep_mask")
        self._install(M, R, keep_mask)

    def install_searched(self, structure: LayerStructure, scores: torch.Tensor, grid: Tuple[int, int]) -> None:
        """Install the layer's searched ``structure``: M from its (num_patches,) ``scores`` (SPEC §2), R = pinv(M),
        the keep mask; the identity when every patch is a centre. ``grid``: the patch grid it is for."""
        matrices = layer_matrices(structure, scores, grid)
        if matrices is None:  # every patch its own centre: the identity, run as the dense layer
            self.set_identity()
        else:
            self.set_structure(*matrices, n_tokens=structure.num_prefix + grid[0] * grid[1])
            self.pm_grid = tuple(grid)

    def set_identity(self) -> None:
        """The identity structure: the dense block, no M, R, keep_mask."""
        self.M = self.R = None
        self.keep_mask = None
        self.pm_grid = None

    def _check_prefix_kept(self, keep_mask: torch.Tensor, name: str) -> None:
        if keep_mask.device.type != "meta" and not bool(keep_mask[:self.num_prefix].all()):
            raise ValueError(f"{name}: the {self.num_prefix} prefix tokens (CLS, distillation, registers) are "
                             "never pruned; expected True there")

    def _reference_tensor(self) -> torch.Tensor:
        return next(p for p in self.parameters() if p is not self.M and p is not self.R)

    def _install(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> None:
        ref = self._reference_tensor()
        self.M = torch.nn.Parameter(M.detach().to(ref.device, ref.dtype).clone())
        self.R = torch.nn.Parameter(R.detach().to(ref.device, ref.dtype).clone())
        self.keep_mask = keep_mask.detach().to(ref.device, torch.bool).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint brings its own structure (or none: the identity); check it before loading its values.
        keys = [prefix + name for name in ("M", "R", "keep_mask")]
        present = [k in state_dict for k in keys]
        if all(present):
            M, R, mask = (state_dict[k] for k in keys)
            n = self.num_tokens or (M.shape[-1] if M.dim() == 2 else -1)
            check_structure(M, R, mask, n, where=prefix)
            self._check_prefix_kept(mask, prefix + "keep_mask")
            if _is_identity(M, R, mask):  # written by pm_kernels < 0.2, which stored the identity as I
                dropped = {prefix + name for name in self.structure_keys}
                state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
                self.set_identity()
            elif self.M is None or M.shape != self.M.shape or R.shape != self.R.shape:
                self._install(torch.empty_like(M), torch.empty_like(R), mask)
        elif any(present):
            missing = [k for k, p in zip(keys, present) if not p]
            raise ValueError(f"state_dict: {prefix}M, R and keep_mask come together (a PM structure), "
                             f"missing {', '.join(missing)}")
        elif self.M is not None and any(k.startswith(prefix) for k in state_dict):
            self.set_identity()  # a dense checkpoint: the identity structure
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _is_identity(M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> bool:
    if M.shape[0] != M.shape[1] or M.device.type == "meta":
        return False
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return bool(keep_mask.all()) and torch.equal(M, eye) and torch.equal(R, eye.to(R.dtype))


# ------------------------------------------------------------------------------------------- the chain

class PMBlocks(torch.nn.Sequential):
    """``model.blocks`` of a PM model: the blocks with each boundary as one fused op.

    Block by block, SPEC §1 is merge → body → reconstruct; chained, the reconstruct of block l and the merge of
    block l+1 become one ``reconstruct_merge`` (one pass over the N-token activations instead of two). Same
    math, same state-dict keys; each block still works alone (``blocks[i](x)``). With ``grad_checkpointing``
    (``model.set_grad_checkpointing()``) each step (body + boundary) is checkpointed.
    """

    grad_checkpointing: bool = False

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            for blk in self:
                x = blk.pm_forward(x, rope)
            return x
        else:
            return self._chain(x, rope)

    @torch.jit.unused
    def _chain(self, x: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
        blocks = list(self)
        if _fx_symbolic_tracing():
            for blk in blocks:
                x = blk.pm_forward(x, rope)
            return x
        for blk in blocks:
            if blk.keep_mask is not None:
                check_tokens(x, blk.keep_mask.numel(), blk.M)  # every compressed block shares N (installer)
                break
        z = _enter(blocks[0], x)
        for layer, blk in enumerate(blocks):
            after = blocks[layer + 1] if layer + 1 < len(blocks) else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, z = checkpoint(_step, blk, after, x, z, rope, use_reentrant=False)
            else:
                x, z = _step(blk, after, x, z, rope)
        return x


def _enter(blk, x: torch.Tensor) -> torch.Tensor:
    return x if blk.M is None else token_ops.run_merge(x, blk.M, blk.backend)


def _step(blk, after, x: torch.Tensor, z: torch.Tensor, rope: Optional[torch.Tensor]
          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block ``blk``'s body on its K tokens z, then the boundary to block ``after`` (None: the exit)."""
    z = blk.body(z, rope)
    if blk.M is not None and after is not None and after.M is not None:
        return token_ops.run_reconstruct_merge(z, blk.R, x, blk.keep_mask, after.M, blk.backend)
    x = z if blk.M is None else token_ops.run_reconstruct(z, blk.R, x, blk.keep_mask, blk.backend)
    return x, (None if after is None else _enter(after, x))
