"""EVA / EVA-02 (timm ``Eva``, ``EvaBlock``, ``EvaAttention`` with rotary position embedding) as PM modules.

Rotary embedding on K tokens: the K − P merged tokens of a block carry the rotary position of their centre
token (a token merged into a centre is represented at that centre; SPEC §7); pruned tokens skip the block and
need none. Each compressed block keeps the centre's patch index per merged row in the buffer ``centre_index``
(taken from M when the structure is built: the centre is the column of weight 1, the largest of its row).
"""
from typing import Optional

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock

from ...layers import PMAttentionMixin, PMBlockMixin, _no_mask

torch.fx.wrap("_no_mask")  # FX records the mask check as a call (see pm_kernels.layers)

__all__ = ["PMEvaAttention", "PMEvaBlock"]


class PMEvaAttention(PMAttentionMixin, EvaAttention):
    """timm ``EvaAttention`` (rotary embedding on the patch tokens) whose core is ``pm_kernels.attention``."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = self.qkv(x) + qkv_bias if self.qkv_bias_separate else torch.nn.functional.linear(
                    x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt = self.num_prefix_tokens
            half = self.rotate_half
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        x = self._attend(q, k, v, self.scale, self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PMEvaBlock(PMBlockMixin, EvaBlock):
    """timm ``EvaBlock`` as a PM block; its merged tokens take their centre's rotary position."""

    structure_keys = PMBlockMixin.structure_keys + ("centre_index",)

    def init_pm(self, num_prefix: int) -> None:
        super().init_pm(num_prefix)
        self.register_buffer("centre_index", None)

    def body(self, z: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        centre_index = self.centre_index
        if rope is not None and centre_index is not None:
            rope = rope.index_select(-2, centre_index)
        x_attn = self.attn(self.norm1(z), rope=rope)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        z = z + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(z))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return z + self.drop_path2(x_mlp)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        return self.pm_forward(x, rope)

    def set_identity(self) -> None:
        super().set_identity()
        self.centre_index = None

    def _install(self, M: torch.Tensor, R: torch.Tensor, keep_mask: torch.Tensor) -> None:
        super()._install(M, R, keep_mask)
        self.centre_index = _centres(M, self.num_prefix).to(self.M.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # centre_index travels with M; a checkpoint without it gets the centres of its M.
        if prefix + "M" in state_dict and prefix + "centre_index" not in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "centre_index"] = _centres(state_dict[prefix + "M"], self.num_prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _centres(M: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Patch index of the centre of each merged row of M: the column of weight 1, the largest of its row."""
    if M.device.type == "meta":
        return torch.zeros(M.shape[0] - num_prefix, dtype=torch.long, device=M.device)
    return M.detach()[num_prefix:, num_prefix:].float().argmax(dim=1)
