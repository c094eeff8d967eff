"""What the benchmark scripts share. A script imports the library, ``bench.peers`` (ToMe, EViT) and this package,
never another script; timing, MAC counts and the environment record are the library's (``pm_kernels.measure``).

- ``MODELS``: the short names of the DeiT models the comparisons take;
- ``pm_scores``: the (L, num_patches) scores a PM structure is searched from, random or calibrated on random
  images (speed and MACs depend on the structure only, not on trained weights);
- ``plain_vit`` / ``plain_segmenter``: the plain timm model holding a dense (identity-structure) PM model's
  weights, the starting point of the peers, which patch plain timm blocks.
"""
import copy

import torch

__all__ = ["MODELS", "pm_scores", "plain_vit", "plain_segmenter"]

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
          "deit_base": "deit_base_patch16_224"}


def pm_scores(dense: torch.nn.Module, mode: str, example: torch.Tensor, n_batches: int = 2,
              seed: int = 0) -> torch.Tensor:
    """(L, num_patches) float scores of ``dense`` (a timm ViT): ``random``, or ``calibrated`` (SPEC §3) on
    ``n_batches`` batches of random images and labels shaped like ``example``."""
    import pm_kernels
    L, P = len(dense.blocks), dense.patch_embed.num_patches
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.rand(L, P, generator=g) + 1e-3
    if mode != "calibrated":
        raise ValueError(f"mode: expected 'random' or 'calibrated', got {mode!r}")
    model = pm_kernels.patch_timm(copy.deepcopy(dense).float().eval()).to(example.device)
    batches = [(torch.randn(*example.shape, generator=g).to(example.device),
                torch.randint(0, dense.num_classes, (example.shape[0],), generator=g).to(example.device))
               for _ in range(n_batches)]
    return pm_kernels.calibrate(model, batches).detach().float().cpu()


def _weights_without_structure(model: torch.nn.Module):
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in ("M", "R", "keep_mask")}


def plain_vit(pm_dense: torch.nn.Module, kwargs: dict) -> torch.nn.Module:
    """A plain timm ``VisionTransformer(**kwargs)`` with the weights of the dense (identity-structure) PM model."""
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(**kwargs)
    vit.load_state_dict(_weights_without_structure(pm_dense), strict=True)
    return vit.eval()


def plain_segmenter(dense, kwargs: dict):
    """The dense Segmenter on a plain timm ``VisionTransformer(**kwargs)`` (no PM classes), same weights."""
    from timm.models.vision_transformer import VisionTransformer

    from pm_kernels import Segmenter
    depth = len(dense.decoder.blocks) if hasattr(dense.decoder, "blocks") else 2
    seg = Segmenter(VisionTransformer(**kwargs), dense.num_classes, dense.decoder_name, decoder_depth=depth,
                    dropout=0.0)
    seg.load_state_dict(_weights_without_structure(dense), strict=True)
    return seg.eval()
