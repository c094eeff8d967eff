"""Segmentation in the pipeline: Segmenter models (build, load), mIoU / pixel accuracy, GMACs, images/s, pictures.

Models: ``digits_seg_vit`` (the embedded task's small ViT: 32×32 grey, patch 4 → 64 patches + CLS, 4 blocks) or any timm
ViT name, always patched (identity structure until compressed), with Segmenter's mask or linear decoder.
A checkpoint written here carries ``task: segmentation``, the backbone name and kwargs, the decoder and the
class count; a timm classification checkpoint (``--checkpoint`` of a dense ViT) loads into the backbone.

Metrics: a confusion matrix over the labelled pixels; IoU per class = TP / (TP + FP + FN) over the classes
present in the ground truth or the prediction; mIoU their mean (%); pixel accuracy = labelled pixels right (%).
GMACs: FlopCounterMode on one image / 2 (the whole model: backbone, decoder; the upsampling is not a matmul).
"""
import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..patch import is_patched, patch_timm
from ..segmenter import IGNORE_INDEX, Segmenter, sliding_window
from .io import PipelineError, checkpoint_state_dict, load_checkpoint

__all__ = ["DIGITS_SEG_VIT", "DIGITS_SEG_VIT_KWARGS", "build_segmenter", "load_segmenter", "confusion_matrix",
           "miou_from_confusion", "segmentation_metrics", "evaluate_segmenters", "format_seg_table",
           "render_predictions", "predict"]

DIGITS_SEG_VIT = "digits_seg_vit"
DIGITS_SEG_VIT_KWARGS = dict(img_size=32, patch_size=4, in_chans=1, num_classes=0, embed_dim=64, depth=4,
                             num_heads=2, mlp_ratio=2.0)


def build_segmenter(name: str, model_kwargs: Optional[Dict[str, Any]], num_classes: int, decoder: str = "mask",
                    decoder_depth: int = 2, dropout: float = 0.0) -> Segmenter:
    """A Segmenter on a patched backbone (``digits_seg_vit`` or a timm ViT name)."""
    import timm

    from ..models import PMVisionTransformer

    kwargs = dict(model_kwargs or {})
    try:
        if name == DIGITS_SEG_VIT:
            backbone = PMVisionTransformer(**dict(DIGITS_SEG_VIT_KWARGS, **kwargs))
        else:
            if not timm.is_model(name):
                raise PipelineError(f"model {name!r}: not a timm model name (e.g. vit_small_patch16_384, or "
                                    f"{DIGITS_SEG_VIT})")
            backbone = timm.create_model(name, pretrained=False, **kwargs)
        if not is_patched(backbone):
            patch_timm(backbone)
        return Segmenter(backbone, num_classes, decoder, decoder_depth=decoder_depth, dropout=dropout)
    except PipelineError:
        raise
    except (TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"model {name!r}: {str(err).splitlines()[0]}") from None


def load_segmenter(path: Optional[str], name: Optional[str] = None, num_classes: Optional[int] = None,
                   decoder: Optional[str] = None, extra_kwargs: Optional[Dict[str, Any]] = None
                   ) -> Tuple[Segmenter, Dict[str, Any]]:
    """(segmenter, meta) from a segmentation checkpoint, a classification checkpoint of the backbone, or fresh."""
    ckpt = load_checkpoint(path) if path else {"state_dict": None, "meta": {}}
    meta = copy.deepcopy(ckpt["meta"])
    state = ckpt["state_dict"]
    is_seg = meta.get("task") == "segmentation" or (state is not None and any(k.startswith("decoder.") for k in state))
    arch = meta.get("model") or name
    if not arch:
        raise PipelineError(f"model: give --model (a timm ViT name or {DIGITS_SEG_VIT}); checkpoint {path} names none")
    if name and meta.get("model") and name != meta["model"]:
        raise PipelineError(f"model {name!r}: checkpoint {path} is of model {meta['model']!r}")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(extra_kwargs or {})
    kwargs["num_classes"] = 0
    classes = meta.get("num_classes") if is_seg else None
    if classes is None and is_seg and isinstance(state.get("decoder.mask_norm.weight"), torch.Tensor):
        classes = int(state["decoder.mask_norm.weight"].shape[0])
    if classes is None and is_seg and isinstance(state.get("decoder.head.weight"), torch.Tensor):
        classes = int(state["decoder.head.weight"].shape[0])
    classes = classes or num_classes
    if not classes:
        raise PipelineError("num classes: unknown (give --data, whose class count the head takes)")
    if num_classes is not None and classes != num_classes:
        raise PipelineError(f"checkpoint {path}: {classes} classes, the data has {num_classes}")
    kind = meta.get("decoder") if is_seg else None
    kind = kind or ("linear" if is_seg and "decoder.head.weight" in state else None) or decoder or "mask"
    if is_seg and decoder and decoder != kind:
        raise PipelineError(f"decoder {decoder!r}: checkpoint {path} has a {kind!r} decoder")
    seg = build_segmenter(arch, kwargs, classes, kind, decoder_depth=int(meta.get("decoder_depth", 2)))
    if state is not None:
        try:
            if is_seg:
                seg.load_state_dict(state, strict=True)
            else:  # a classification checkpoint of the backbone: its head is dropped
                body = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
                seg.backbone.load_state_dict(body, strict=True)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise PipelineError(f"checkpoint {path}: does not fit model {arch!r} ({detail[:200]})") from None
    meta.update(task="segmentation", model=arch, model_kwargs=kwargs, decoder=kind, num_classes=classes,
                decoder_depth=int(meta.get("decoder_depth", 2)))
    return seg, meta


# ------------------------------------------------------------------------------------------------- metrics

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; ignored pixels out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if bool((t < 0).any() | (t >= num_classes).any()):
        raise PipelineError(f"labels: expected classes in [0, {num_classes}) or {ignore_index} (ignored)")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes).cpu()


def miou_from_confusion(conf: torch.Tensor) -> Dict[str, object]:
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {"miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
            "pixel_acc": 100.0 * float(tp.sum() / total) if total > 0 else 0.0,
            "iou": [None if torch.isnan(v) else round(100.0 * float(v), 3) for v in iou]}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, window: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Class map (B, H, W): one forward when the images have the window's size, sliding windows otherwise."""
    if window is not None and tuple(images.shape[-2:]) != tuple(window):
        return sliding_window(model, images, window).argmax(1)
    return model(images).argmax(1)


@torch.no_grad()
def segmentation_metrics(model: nn.Module, loader, num_classes: int, device=None, window=None,
                         ignore_index: int = IGNORE_INDEX, progress: bool = False) -> Dict[str, object]:
    from tqdm import tqdm

    device = torch.device(device or "cpu")
    model.to(device).eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for images, labels in tqdm(loader, desc="eval", disable=not progress, leave=False):
        pred = predict(model, images.to(device), window)
        conf += confusion_matrix(pred.cpu(), labels, num_classes, ignore_index)
    return miou_from_confusion(conf)


def _mean_keep(seg) -> float:
    blocks = seg.backbone.blocks
    return sum(1.0 if b.is_identity else b.M.shape[0] / b.M.shape[1] for b in blocks) / len(blocks)


def evaluate_segmenters(models: Dict[str, nn.Module], loader, input_shape: Sequence[int], num_classes: int,
                        device=None, batch_size: int = 32, repeats: int = 5, window=None,
                        progress: bool = False, fast: Optional[Dict[str, nn.Module]] = None) -> List[Dict[str, object]]:
    """One row per model: keep (mean K/N), mIoU, pixel accuracy, GMACs, images/s (same data, device, batch).

    ``fast[name]``: the module to time and count (``optimize(model)``: the inference path); its mIoU is the one
    measured. Speed: each round times every model once (interleaved), median over ``repeats`` rounds.
    """
    import statistics

    from .evaluate import gflops, throughput

    fast = fast or {}
    rows, runners = [], {}
    for name, model in models.items():
        runner = fast.get(name, model).to(device or "cpu").eval()
        runners[name] = runner
        m = segmentation_metrics(runner, loader, num_classes, device, window=window, progress=progress)
        rows.append({"model": name, "keep": round(_mean_keep(model), 3), "miou": m["miou"],
                     "pixel_acc": m["pixel_acc"], "iou": m["iou"], "gmacs": gflops(runner, input_shape, device) / 2})
    rates = {name: [] for name in models}
    for rnd in range(repeats):
        for name, runner in runners.items():
            rates[name].append(throughput(runner, input_shape, batch_size, device, warmup=2 if rnd == 0 else 1,
                                          repeats=1))
    dense = next((r for r in rows if r["keep"] == 1.0), rows[0])
    for r in rows:
        r["images_per_s"] = statistics.median(rates[r["model"]])
    for r in rows:
        r["delta_miou"] = r["miou"] - dense["miou"]
        r["speedup"] = r["images_per_s"] / dense["images_per_s"]
        r["mac_ratio"] = dense["gmacs"] / r["gmacs"]
    return rows


def format_seg_table(rows: List[Dict[str, object]]) -> str:
    header = (f"{'model':<18} {'keep K/N':>8} {'mIoU %':>7} {'ΔmIoU':>6} {'pix acc':>7} {'GMACs':>7} {'img/s':>8} "
              f"{'speed-up':>8} {'MAC ratio':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<18} {r['keep']:>8.3f} {r['miou']:>7.2f} {r['delta_miou']:>+6.2f} "
                     f"{r['pixel_acc']:>7.2f} {r['gmacs']:>7.4f} {r['images_per_s']:>8.1f} {r['speedup']:>7.2f}x "
                     f"{r['mac_ratio']:>8.2f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ pictures

def _palette(num_classes: int) -> torch.Tensor:
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    colours = torch.tensor([cmap(i % 20)[:3] for i in range(num_classes)], dtype=torch.float32)
    colours[0] = torch.tensor([0.08, 0.08, 0.08]) if num_classes <= 20 else colours[0]  # background dark
    return colours


def _colour(labels: torch.Tensor, palette: torch.Tensor, ignore_index: int) -> torch.Tensor:
    out = palette[labels.clamp(0, palette.shape[0] - 1)]
    out[labels == ignore_index] = 1.0  # unlabelled: white
    return out


@torch.no_grad()
def render_predictions(models: Dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor, path: str,
                       mean: Sequence[float], std: Sequence[float], num_classes: int, window=None,
                       ignore_index: int = IGNORE_INDEX, title: str = "") -> str:
    """PNG, one row per image: the image, the ground truth, then each model's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    palette = _palette(num_classes)
    preds = {name: predict(m.eval(), images, window).cpu() for name, m in models.items()}
    n, cols = images.shape[0], 2 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.4), dpi=110, squeeze=False)
    img = images.cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    for i in range(n):
        panels = [("image", None), ("ground truth", labels[i])] + [(k, v[i]) for k, v in preds.items()]
        for j, (name, lab) in enumerate(panels):
            ax = axes[i, j]
            ax.axis("off")
            if lab is None:
                pic = img[i].clamp(0, 1).permute(1, 2, 0)
                ax.imshow(pic[..., 0].numpy() if pic.shape[-1] == 1 else pic.numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(_colour(lab.long(), palette, ignore_index).numpy(), interpolation="nearest")
                if j >= 2:
                    keep = lab != ignore_index if labels is not None else torch.ones_like(lab, dtype=torch.bool)
                    acc = 100.0 * float((lab[keep] == labels[i][keep]).float().mean()) if bool(keep.any()) else 0.0
                    name = f"{name} ({acc:.0f}%)"
            if i == 0 or j >= 2:
                ax.set_title(name, fontsize=7)
    fig.suptitle(title or "image / ground truth / predictions (pixel accuracy)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
