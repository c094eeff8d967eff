"""ToMe for dense prediction: Token Merging in the ViT blocks, merged tokens copied back to their source positions
at the exit (the "unmerge" of ToMe for Stable Diffusion, Bolya & Hoffman 2023), so a segmentation head sees all
N tokens again. Written from the papers; the merging itself is ``bench.peers.tome``'s (same bipartite matching,
size-weighted average, proportional attention).

Every block merges ``r`` tokens between attention and MLP, as ToMe does. Each merge step is recorded as a map
old position → new position; composing the maps gives, for every original token, the index of the token that
now carries it. ``forward_features`` returns the final norm's output gathered by that map: (B, N, C), N the
original token count, a merged token's features repeated at each of its source positions (tomesd's unmerge,
applied once for all the merges instead of block by block, which is the same copy). ``Segmenter`` then drops the
prefix tokens and decodes the full patch grid, as for the dense and PM backbones.
"""
from typing import Sequence, Union

import torch
import torch.nn as nn

from .tome import _make_tome_vit_class, install_tome, matching_plan, merge_by_plan, merge_wavg

__all__ = ["patch_tome_seg", "bipartite_matching_with_map", "ToMeSegBlock"]


def bipartite_matching_with_map(metric: torch.Tensor, r: int, protect_first: int = 1):
    """ToMe's bipartite soft matching (``bench.peers.tome.matching_plan``: the official split, the same merge
    and output order) and where every input token goes: returns ``(merge, new_index)`` with ``new_index``
    (B, n) the output position of each input token, or ``(None, None)`` when nothing is merged."""
    plan = matching_plan(metric, r, protect_first)
    if plan is None:
        return None, None
    unm_idx, src_idx, dst_idx, p, p_a, p_b = plan
    B, n = metric.shape[:2]
    n_a, n_b = (n + 1) // 2, n // 2
    n_unm = unm_idx.shape[1]
    b_start = p + n_unm - p_a          # output position of the first unprotected B token
    device = metric.device
    with torch.no_grad():
        a_new = torch.empty(B, n_a, dtype=torch.long, device=device)
        a_new.scatter_(1, unm_idx, (p - p_a + torch.arange(n_unm, device=device)).expand(B, -1))
        a_new.scatter_(1, src_idx, b_start - p_b + dst_idx)
        new_index = torch.empty(B, n, dtype=torch.long, device=device)
        new_index[:, 0::2] = a_new
        new_index[:, 1::2] = (b_start - p_b + torch.arange(n_b, device=device)).expand(B, -1)
        new_index[:, :p] = torch.arange(p, device=device)  # protected tokens stay in front, in order
    return merge_by_plan(plan), new_index


class ToMeSegBlock(nn.Module):
    """timm ``Block`` (class swapped in): attention with proportional attention, merge ``r`` tokens, MLP; the
    merge's position map is composed into the model's ``source``."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        info = self._tome_info
        attn_out, metric = self.attn(self.norm1(x), size=info["size"])
        x = x + self.drop_path1(self.ls1(attn_out))
        r = info["r"][self._tome_layer]
        merge, new_index = bipartite_matching_with_map(metric, r, info["num_prefix"]) if r > 0 else (None, None)
        if merge is not None:
            x, info["size"] = merge_wavg(merge, x, info["size"])
            if info["source"] is None:  # first merge: every token is where it started
                info["source"] = torch.arange(new_index.shape[1], device=x.device).expand(x.shape[0], -1)
            info["source"] = new_index.gather(1, info["source"])
        info["tokens"].append(x.shape[1])
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _make_class(base):
    class ToMeSegVisionTransformer(_make_tome_vit_class(base)):
        """The ToMe model, with all N tokens back at the exit (unmerge)."""

        def forward_features(self, x, attn_mask=None, is_causal: bool = False):
            info = self._tome_info
            info["source"] = None
            out = super().forward_features(x, attn_mask, is_causal)
            if info["source"] is None:  # nothing merged
                return out
            return out.gather(1, info["source"].unsqueeze(-1).expand(-1, -1, out.shape[-1]))

    ToMeSegVisionTransformer.__name__ = "ToMeSeg" + base.__name__
    return ToMeSegVisionTransformer


def patch_tome_seg(model: nn.Module, r: Union[int, Sequence[int]] = 0) -> nn.Module:
    """Turn a timm ``VisionTransformer`` into ToMe with unmerge, in place; returns it. ``r``: tokens merged per
    block (int) or one value per block; ``model.r`` can be changed afterwards."""
    return install_tome(model, r, "patch_tome_seg", _make_class, ToMeSegBlock, source=None)
