"""The written formula of a compressed layer of a windowed-attention ViT (docs/windowed_attention.md §1), for
tests/model/test_sam.py: per window z = M x, the layer on the K tokens with the unpatched layer's weights (each
token at its centre's position in the decomposed relative-position bias, empty slots masked as keys, an explicit
softmax), out = R z + (1 − m) ⊙ x. Independent of pm_kernels' windowed code: the window slots, the positions and
the bias are formed here from their definitions."""
import copy

import torch
from torch import nn

__all__ = ["window_slots", "reference_layer", "ReferenceLayer", "windowed_reference"]


def window_slots(H, W, w):
    """(window, slot) of every raster token of an H×W grid cut into w×w windows after padding."""
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    return (rows // w) * -(-W // w) + cols // w, (rows % w) * w + cols % w


def parts_of(layer):
    """(norm1, qkv, heads, scale, proj, attention residual branch, MLP residual, rel_pos_h, rel_pos_w, window,
    (q norm, k norm)) of an unpatched timm Block or transformers SamVisionLayer (eval mode: no drop path)."""
    a = layer.attn
    if hasattr(layer, "norm1"):  # timm
        return (layer.norm1, a.qkv, a.num_heads, a.scale, a.proj, layer.ls1,
                lambda x: layer.ls2(layer.mlp(layer.norm2(x))), a.rel_pos_h, a.rel_pos_w, layer.window_size,
                (a.q_norm, a.k_norm))
    return (layer.layer_norm1, a.qkv, a.num_attention_heads, a.scale, a.proj, lambda t: t,
            lambda x: layer.mlp(layer.layer_norm2(x)), a.rel_pos_h, a.rel_pos_w, layer.window_size,
            (nn.Identity(), nn.Identity()))


def reference_layer(x, dense_layer, pm_layer, structure_window):
    """docs/windowed_attention.md §1 with the unpatched layer's weights and the PM layer's M, R, keep_mask and
    centre slots: per window z = M x, the layer on the K tokens (each at its centre's position in the bias, empty
    slots masked as keys, explicit softmax), out = R z + (1 − m) ⊙ x."""
    norm1, qkv, heads, scale, proj, branch, mlp, table_h, table_w, window, (q_norm, k_norm) = parts_of(dense_layer)
    B, H, W, C = x.shape
    M, R, keep, centre = pm_layer.M, pm_layer.R, pm_layer.keep_mask, pm_layer.centre_slot
    n_w, K, S = M.shape
    win, slot = window_slots(H, W, structure_window)
    xw = x.new_zeros(B, n_w, S, C)
    xw[:, win, slot] = x.reshape(B, H * W, C)
    z = torch.einsum("wks,bwsc->bwkc", M, xw)
    empty = centre < 0
    rows, cols = centre // structure_window, centre % structure_window
    if window:  # attention within each window, local positions, G = window
        groups, G = z.reshape(B * n_w, K, C), (window, window)
        rows, cols, empty = rows.repeat(B, 1), cols.repeat(B, 1), empty.repeat(B, 1)
    else:  # all windows' slots attend to each other, image positions
        per_row = -(-W // structure_window)
        w_index = torch.arange(n_w).unsqueeze(1)
        rows = rows + w_index // per_row * structure_window
        cols = cols + w_index % per_row * structure_window
        groups, G = z.reshape(B, n_w * K, C), (H, W)
        rows, cols, empty = (t.reshape(1, -1).repeat(B, 1) for t in (rows, cols, empty))
    n = groups.shape[1]
    q, k, v = qkv(norm1(groups)).reshape(groups.shape[0], n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = q_norm(q), k_norm(k)
    dh = rows.unsqueeze(2) - rows.unsqueeze(1) + G[0] - 1  # (groups, n, n): h_c(i) − h_c(j) + G − 1
    dw = cols.unsqueeze(2) - cols.unsqueeze(1) + G[1] - 1
    dh, dw = dh.clamp(0, 2 * G[0] - 2), dw.clamp(0, 2 * G[1] - 2)  # empty slots' rows: any valid entry
    logits = scale * q @ k.transpose(-1, -2)
    logits = logits + torch.einsum("bhid,bijd->bhij", q, table_h[dh]) + torch.einsum("bhid,bijd->bhij", q,
                                                                                     table_w[dw])
    logits = logits.masked_fill(empty[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(groups.shape[0], n, -1)
    z = z + branch(proj(out)).reshape(B, n_w, K, C)
    z = z + mlp(z)
    out = torch.einsum("wsk,bwkc->bwsc", R * (centre >= 0).unsqueeze(1), z)  # empty slots: no column
    return out[:, win, slot].reshape(B, H, W, C) + (~keep).view(H, W, 1).to(x.dtype) * x


class ReferenceLayer(nn.Module):
    """An unpatched layer run as ``reference_layer`` with a PM layer's structure (as the dense layer without
    one); keeps its outputs in ``seen``."""

    def __init__(self, dense_layer, pm_layer, seen, window):
        super().__init__()
        self.dense, self.pm, self.seen, self.window = dense_layer, pm_layer, seen, window

    def forward(self, x, *args, **kwargs):
        if self.pm.M is None:
            out = self.dense(x)
        else:
            out = reference_layer(x, self.dense, self.pm, self.window)
        self.seen.append(out)
        return out


def windowed_reference(dense, pm, layer_list, window):
    """A copy of the unpatched ``dense`` model whose layers (``layer_list(model)``) run the written formula with
    ``pm``'s structures on the model's ``window``; and the list its layers' outputs are appended to."""
    reference, seen = copy.deepcopy(dense), []
    for i, pm_layer in enumerate(layer_list(pm)):
        layer_list(reference)[i] = ReferenceLayer(layer_list(reference)[i], pm_layer, seen, window)
    return reference, seen
