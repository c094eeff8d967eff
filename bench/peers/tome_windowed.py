"""ToMe with unmerge for a windowed-attention ViT (timm ``VisionTransformerSAM``), applied per window: the peer of
Prune and Merge on SAM's block pattern (issue 26). Written from the papers, on ``bench.peers.tome``'s matching.

- The patch grid is cut into SAM's windows (the grid must be a multiple of the window: no padding, so every
  window holds the same tokens and merges the same ``r``); tokens stay in their window for the whole network.
- Every block: attention (windowed blocks within each window's tokens, global blocks over all windows' tokens),
  with proportional attention (+ log size on every key) and SAM's decomposed relative-position bias at each
  token's position (a merged token keeps its destination token's position, the B token that survives); then
  ``r`` tokens merged in every window by ToMe's bipartite soft matching on the keys' head-mean (size-weighted
  average); then the MLP.
- At the exit every original position takes the features of the token that carries it (the unmerge of ToMe for
  Stable Diffusion, composed once), back on the grid, then SAM's neck: a Segmenter decodes all N tokens.

``patch_tome_windowed(model, r)`` swaps the model's class (no new parameters: it loads the dense weights and
fine-tunes like the dense model); ``r``: one value per block (tokens merged per window). ``tome_windowed_macs``
counts it analytically (1 MAC = 1 FLOP; FlopCounterMode agrees, see ``bench/sam_seg_peers.py``).
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM

from pm_kernels.windowed import partition, unpartition, window_layout

from .tome import matching_plan, merge_by_plan, merge_wavg

__all__ = ["patch_tome_windowed", "tome_windowed_macs", "tome_windowed_tokens"]


def _relative(q: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """bias[b, h, i, j] = q_i · table[p_i − p_j + G − 1]; q (B_, heads, n, D), table (2G − 1, D), pos (B_, n)."""
    size = (table.shape[0] + 1) // 2
    products = q @ table.t()                                      # (B_, heads, n, 2G − 1)
    index = (pos.unsqueeze(2) - pos.unsqueeze(1) + size - 1).unsqueeze(1).expand(-1, q.shape[1], -1, -1)
    return torch.gather(products, -1, index)


def _attention(blk, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: torch.Tensor):
    """SAM block attention with proportional attention on x (B_, n, C): (output, the keys' head-mean)."""
    attn = blk.attn
    B_, n, _ = x.shape
    q, k, v = attn.qkv(x).view(B_, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log().view(B_, 1, 1, n).to(q.dtype)
    if attn.use_rel_pos:
        bias = bias + _relative(q, attn.rel_pos_h, rows) + _relative(q, attn.rel_pos_w, cols)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B_, n, -1))), k.mean(dim=1)


class ToMeWindowedSAM(VisionTransformerSAM):
    """A timm ``VisionTransformerSAM`` whose ``forward_features`` merges tokens per window (class swapped in)."""

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(self.pos_embed, x.shape[1:3])
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        B, H, W, C = x.shape
        w = self._tome_window
        if H % w or W % w:
            raise ValueError(f"x: windowed ToMe needs a grid that is a multiple of the window {w}, got {H}x{W}")
        layout = window_layout((H, W), (w, w))
        n_w, S = layout.num_windows, layout.slots
        t = partition(x, layout).reshape(B * n_w, S, C)
        slot = torch.arange(S, device=x.device)
        window = torch.arange(n_w, device=x.device).repeat(B)
        local_rows, local_cols = (slot // w).expand(B * n_w, S), (slot % w).expand(B * n_w, S)
        image_rows = local_rows + (window // layout.windows[1] * w).unsqueeze(1)
        image_cols = local_cols + (window % layout.windows[1] * w).unsqueeze(1)
        size = torch.ones(B * n_w, S, 1, dtype=x.dtype, device=x.device)
        source = slot.expand(B * n_w, S)                  # which token carries each original slot
        tokens = []
        for i, blk in enumerate(self.blocks):
            n = t.shape[1]
            h = blk.norm1(t)
            if blk.window_size:
                a, metric = _attention(blk, h, local_rows, local_cols, size.squeeze(-1))
            else:
                whole = lambda z: z.reshape(B, n_w * n, *z.shape[2:])  # noqa: E731  (windows side by side)
                a, metric = _attention(blk, whole(h), whole(image_rows), whole(image_cols),
                                       whole(size).squeeze(-1))
                a, metric = a.reshape(B * n_w, n, C), metric.reshape(B * n_w, n, -1)
            t = t + blk.drop_path1(blk.ls1(a))
            plan = matching_plan(metric, self._tome_r[i], protect_first=0)
            if plan is not None:
                merge = merge_by_plan(plan)
                t, size = merge_wavg(merge, t, size)
                keep = lambda p: torch.cat([p[:, ::2].gather(1, plan.unm_idx), p[:, 1::2]], dim=1)  # noqa: E731
                local_rows, local_cols, image_rows, image_cols = map(keep, (local_rows, local_cols, image_rows,
                                                                            image_cols))
                source = _new_index(plan, n).gather(1, source)
            tokens.append(t.shape[1])
            t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
        self._tome_tokens = tokens
        t = t.gather(1, source.unsqueeze(-1).expand(-1, -1, C))   # unmerge: every slot its carrier's features
        return self.neck(unpartition(t.reshape(B, n_w, S, C), layout).permute(0, 3, 1, 2))


def _new_index(plan, n: int) -> torch.Tensor:
    """Output position of every input token of a merge (no protected token): kept A tokens first, then B."""
    unm_idx, src_idx, dst_idx = plan.unm_idx, plan.src_idx, plan.dst_idx
    B_ = unm_idx.shape[0]
    n_unm = unm_idx.shape[1]
    a_new = torch.empty(B_, (n + 1) // 2, dtype=torch.long, device=unm_idx.device)
    a_new.scatter_(1, unm_idx, torch.arange(n_unm, device=unm_idx.device).expand(B_, -1))
    a_new.scatter_(1, src_idx, n_unm + dst_idx)
    new = torch.empty(B_, n, dtype=torch.long, device=unm_idx.device)
    new[:, 0::2] = a_new
    new[:, 1::2] = n_unm + torch.arange(n // 2, device=unm_idx.device).expand(B_, -1)
    return new


def tome_windowed_tokens(slots: int, r: Sequence[int]) -> List[int]:
    """Tokens per window entering each block (and after the last), ToMe merging at most half."""
    counts = [slots]
    for value in r:
        counts.append(counts[-1] - min(int(value), counts[-1] // 2))
    return counts


def patch_tome_windowed(model: VisionTransformerSAM, r: Sequence[int]) -> VisionTransformerSAM:
    """Per-window ToMe with unmerge on a timm SAM encoder (in place): ``r[i]`` tokens merged per window in block
    i. The windowed blocks' window is the one grid cut for the whole network."""
    windows = {blk.window_size for blk in model.blocks if blk.window_size}
    if len(windows) != 1:
        raise ValueError(f"model: windowed ToMe needs one window size, got {sorted(windows)}")
    if len(r) != len(model.blocks):
        raise ValueError(f"r: expected one value per block ({len(model.blocks)}), got {len(r)}")
    model.__class__ = ToMeWindowedSAM
    model._tome_window = windows.pop()
    model._tome_r = [int(v) for v in r]
    return model


def tome_windowed_macs(model: nn.Module, grid, r: Sequence[int]) -> int:
    """MACs of the windowed ToMe backbone on one image (patch embedding, blocks, neck; the bias products as
    computed here, q · T with 2G − 1 entries per query; the matching's similarity products)."""
    from pm_kernels.hosts.windowed import neck_macs
    (H, W), w = grid, model._tome_window
    layout = window_layout((H, W), (w, w))
    n_w, C = layout.num_windows, model.embed_dim
    conv = model.patch_embed.proj
    macs = H * W * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    counts = tome_windowed_tokens(layout.slots, r)
    for blk, n, n_after in zip(model.blocks, counts, counts[1:]):
        attn = blk.attn
        width = attn.qkv.out_features // 3
        linear_attn = attn.qkv.in_features * attn.qkv.out_features + attn.proj.in_features * attn.proj.out_features
        linear_mlp = sum(m.in_features * m.out_features for m in blk.mlp.modules() if isinstance(m, nn.Linear))
        tokens = n_w * n
        group, groups = (n, n_w) if blk.window_size else (tokens, 1)
        sides = (w, w) if blk.window_size else (H, W)
        macs += tokens * linear_attn + 2 * groups * group * group * width
        if attn.use_rel_pos:
            macs += tokens * sum(2 * s - 1 for s in sides) * width
        if n_after < n:  # similarity of the A tokens to the B tokens on the head dim
            macs += n_w * ((n + 1) // 2) * (n // 2) * attn.head_dim
        macs += n_w * n_after * linear_mlp
    return macs + neck_macs(model.neck, H * W)
