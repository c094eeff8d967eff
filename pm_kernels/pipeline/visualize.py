"""Per-layer picture of a Prune-and-Merge structure over a real image (PNG).

For each block: every kept centre in its own colour (with a white dot), each merged patch in the colour of the
centre it is folded into (the argmax over the rows of its column of M), pruned patches in black.
"""
from typing import Dict, List, Optional, Sequence

import torch

from . import host
from .io import atomic_write

__all__ = ["layer_assignment", "render_structure"]


def layer_assignment(M: Optional[torch.Tensor], keep_mask: Optional[torch.Tensor], num_prefix: int = 1,
                     num_patches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Per patch (raster order): ``owner`` (row of M it merges into, −1 if pruned) and ``is_centre``.

    M None is the identity structure (every patch its own centre; give ``num_patches``).
    """
    if M is None:
        return {"owner": torch.arange(num_patches), "is_centre": torch.ones(num_patches, dtype=torch.bool)}
    M = M.detach().float().cpu()
    keep = keep_mask.detach().cpu().bool()[num_prefix:]
    cols = M[num_prefix:, num_prefix:].abs()                # patch rows × patch columns, prefix tokens dropped
    n_patches = cols.shape[1]
    owner = torch.full((n_patches,), -1, dtype=torch.long)
    is_centre = torch.zeros(n_patches, dtype=torch.bool)
    if cols.shape[0] == 0:
        return {"owner": owner, "is_centre": is_centre}
    covered = keep & (cols.sum(0) > 0)
    owner[covered] = cols[:, covered].argmax(0)
    centre_of_row = cols.argmax(1)                          # the centre of row i carries weight 1 (the largest)
    is_centre[centre_of_row[cols.amax(1) > 0]] = True
    is_centre &= keep
    return {"owner": owner, "is_centre": is_centre}


def _colour_table(n: int) -> torch.Tensor:
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    base = torch.tensor([cmap(i % 20)[:3] for i in range(20)], dtype=torch.float32)
    # Spread neighbouring centres over the palette (stride 7 is coprime with 20).
    return base[(torch.arange(n) * 7) % 20]


def render_structure(model, image: torch.Tensor, path: str, mean: Sequence[float], std: Sequence[float],
                     title: str = "", alpha: float = 0.75) -> str:
    """Write the PNG: the image, then one panel per block. ``image`` is one normalised (C, H, W) input; ``model``
    a PM model of any task (its ViT's blocks are drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = host.grid(model)
    prefix = host.num_prefix(model)
    img = image.detach().cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).permute(1, 2, 0)
    grey = img.mean(-1) if img.shape[-1] != 3 else None
    H, W = img.shape[:2]
    blocks: List[host.BlockStructure] = host.block_structures(model)
    n_panels = len(blocks) + 1
    ncols = min(n_panels, 7)
    nrows = (n_panels + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.3 * nrows + 0.3), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax):
        if grey is not None:
            ax.imshow(grey.numpy(), cmap="gray", vmin=0, vmax=1, extent=(0, W, H, 0))
        else:
            ax.imshow(img.numpy(), extent=(0, W, H, 0))

    show(axes.flat[0])
    axes.flat[0].set_title("input", fontsize=8)
    ph, pw = H / h, W / w
    for layer, blk in enumerate(blocks, start=1):
        ax = axes.flat[layer]
        show(ax)
        a = layer_assignment(blk.M, blk.keep_mask, prefix, h * w)
        k = blk.kept
        colours = _colour_table(k + 1)
        overlay = torch.zeros(h, w, 4)
        owner, centre = a["owner"].view(h, w), a["is_centre"].view(h, w)
        for r in range(h):
            for c in range(w):
                o = int(owner[r, c])
                shade = alpha if bool(centre[r, c]) else 0.65 * alpha  # merged patches a little lighter
                overlay[r, c] = torch.tensor([0, 0, 0, 0.85]) if o < 0 else torch.cat(
                    [colours[o + 1], torch.tensor([shade])])
        ax.imshow(overlay.numpy(), extent=(0, W, H, 0), interpolation="nearest")
        centres = torch.nonzero(a["is_centre"]).flatten()
        ax.scatter((centres % w).float().add(0.5).mul(pw).numpy(), (centres // w).float().add(0.5).mul(ph).numpy(),
                   s=6, c="white", edgecolors="black", linewidths=0.3)
        n_pruned = int((a["owner"] < 0).sum())
        ax.set_title(f"block {layer - 1}: K={k}, pruned {n_pruned}", fontsize=7)
    fig.suptitle(title or "Prune-and-Merge structure: centres (dots), merged (centre's colour), pruned (black)",
                 fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
