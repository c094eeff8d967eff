"""Segmentation: Segmenter (Strudel et al. 2021) on a ViT backbone, judged by mIoU and pixel accuracy.

Models: a Segmenter with the mask or linear decoder on a backbone of the family table (``digits_seg_vit``, the
embedded task's 4-block ViT, or a timm ViT name), patched (identity structure until compressed). Its checkpoints
carry ``task: segmentation``, the backbone's name and arguments (checked as a classifier's, against the backbone's
weights), the decoder, its depth and the class count (read from the decoder's weights; a file value that
disagrees is an error). A classification checkpoint of the backbone loads into it (its head dropped).
Data: ``digits`` (canvases of digit scans, embedded) or an ADE20K-layout folder (``segmentation_data``).
Structure search: SPEC §8 (per-layer thresholds, prune rate 0) by default; ``--thresholds``, ``--layers``.
Metrics: a confusion matrix over the labelled pixels; IoU per class = TP / (TP + FP + FN) over the classes
present in the ground truth or the prediction; mIoU their mean (%); pixel accuracy = labelled pixels right (%).
"""
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ...segmenter import DECODERS, IGNORE_INDEX, Segmenter, pixel_cross_entropy, sliding_window
from ..data import DataBundle, make_loader
from ..families import DIGITS_SEG_VIT, find_family, recorded_kwargs, resolve_kwargs
from ..io import PipelineError, load_weights
from ..model import build_model, model_name, read_checkpoint
from .base import Task
from .segmentation_data import load_seg_data

__all__ = ["Segmentation", "SEGMENTATION", "load_segmenter", "seg_loss", "confusion_matrix", "miou_from_confusion",
           "segmentation_metrics", "render_predictions", "predict"]


def _int_in(low: int, high: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


# A segmentation checkpoint's own pm_meta keys; each is also read from the weights and compared.
META_KEYS = {
    "decoder": (lambda v: v in DECODERS, " or ".join(DECODERS)),
    "num_classes": (_int_in(1, 1_000_000), "an int in [1, 1000000]"),
    "decoder_depth": (_int_in(1, 64), "an int in [1, 64]"),
}


def _decoder_of(state: Dict[str, torch.Tensor], checkpoint: str) -> Dict[str, Any]:
    """The decoder the weights hold: kind, classes, depth."""
    def shape0(key):
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise PipelineError(f"checkpoint {checkpoint}: the weights are not those of a Segmenter (no {key})")
        return int(t.shape[0])
    if "decoder.head.weight" in state:
        return {"decoder": "linear", "num_classes": shape0("decoder.head.weight"), "decoder_depth": 2}
    depth = {int(m.group(1)) for m in (re.match(r"decoder\.blocks\.(\d+)\.", k) for k in state) if m}
    if not depth or depth != set(range(len(depth))):
        raise PipelineError(f"checkpoint {checkpoint}: the weights are not those of a Segmenter (decoder blocks "
                            "numbered 0 .. D-1 expected)")
    return {"decoder": "mask", "num_classes": shape0("decoder.mask_norm.weight"), "decoder_depth": len(depth)}


def load_segmenter(checkpoint: Optional[str], name: Optional[str] = None, num_classes: Optional[int] = None,
                   decoder: Optional[str] = None, extra_kwargs: Optional[Dict[str, Any]] = None):
    """(segmenter, meta): from a segmentation checkpoint, a classification checkpoint of the backbone, or fresh
    (``num_classes`` classes, ``decoder`` default mask). Nothing from the file reaches a constructor unchecked."""
    state, meta = read_checkpoint(checkpoint, "segmentation", SEGMENTATION.loads, META_KEYS)
    arch = model_name(meta, name, checkpoint, f"a timm ViT name or {DIGITS_SEG_VIT}")
    family = find_family(arch)
    source = f"checkpoint {checkpoint}" if state is not None else f"model {arch!r}"
    is_seg = state is not None and any(k.startswith("decoder.") for k in state)
    backbone_state = None
    if is_seg:
        other = sorted(k for k in state if not k.startswith(("backbone.", "decoder.")))
        if other:
            raise PipelineError(f"checkpoint {checkpoint}: does not fit a Segmenter (unexpected key {other[0][:80]!r})")
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    elif state is not None:  # a classifier's weights: the backbone, less its head
        backbone_state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    given = dict(meta["model_kwargs"], **(extra_kwargs or {}))
    if not is_seg:  # the decoder is the head: a classifier's head count is dropped with its head
        given["num_classes"] = 0
    kwargs = resolve_kwargs(family, arch, given, backbone_state, source)
    head = {"decoder": decoder or "mask", "num_classes": num_classes, "decoder_depth": 2}
    if is_seg:
        found = _decoder_of(state, checkpoint)
        for key, value in found.items():
            said = {"decoder": decoder, "num_classes": num_classes}.get(key)
            if key in meta and meta[key] != value:
                raise PipelineError(f"{source}: pm_meta {key} = {meta[key]!r}, but the weights have {value!r}")
            if said is not None and said != value:
                what = "the data has" if key == "num_classes" else f"--{key}"
                raise PipelineError(f"{source}: {value} {key.replace('_', ' ')} in the weights, {what} {said}")
        head = found
    if not head["num_classes"]:
        raise PipelineError("num classes: unknown (give --data, whose class count the decoder takes)")
    backbone = build_model(arch, kwargs)
    try:
        seg = Segmenter(backbone, head["num_classes"], head["decoder"], decoder_depth=head["decoder_depth"],
                        dropout=0.0)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"model {arch!r}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if is_seg:
        load_weights(seg, state, checkpoint, arch)
    elif backbone_state is not None:
        load_weights(seg.backbone, backbone_state, checkpoint, arch)
    meta.update(task="segmentation", model=arch, model_kwargs=recorded_kwargs(family, kwargs, backbone), **head)
    return seg, meta


def seg_loss(ignore_index: int = IGNORE_INDEX):
    """The per-pixel cross-entropy without unlabelled pixels, as ``train``'s base loss."""
    return lambda logits, targets: pixel_cross_entropy(logits, targets, ignore_index)


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

    from ..io import atomic_write

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


# ------------------------------------------------------------------------------------------------ the task

class Segmentation(Task):
    name = "segmentation"
    headline = "miou"
    headline_label = "mIoU %"
    extra_columns = (("pixel_acc", "pix acc", ".2f"),)
    exact_classes = True
    loads = ("segmentation", "classification")
    thresholds = "per_layer"
    meta_keys = META_KEYS
    options = ("decoder", "thresholds", "layers", "window")
    demo_defaults = dict(model=DIGITS_SEG_VIT, model_options=dict(decoder="mask"),
                         data_options=dict(img_size=32, n_train=4000, n_val=300, background_noise=0.0),
                         batch_size=32, dense_epochs=8.0, dense_lr=4e-3, dense_weight_decay=0.05, warmup_iters=40,
                         calib_iters=20, keep_rates=(0.8, 0.7, 0.5), prune_rate=0.0, thresholds="per_layer",
                         ft_epochs=2.0, ft_lr=5e-4, alpha=1.0, tau=20.0, speed_repeats=5, n_pictures=5)
    demo_quick = dict(data_options=dict(img_size=32, n_train=64, n_val=16, background_noise=0.0), batch_size=16,
                      dense_epochs=2.0, ft_epochs=1.0, calib_iters=2, keep_rates=(0.7,), speed_repeats=1,
                      speed_min_time=0.05, n_pictures=2, warmup_iters=2,
                      model_kwargs=dict(embed_dim=32, depth=2, num_heads=1))
    demo_folder = "runs/seg_demo"

    def add_arguments(self, command: str, p) -> None:
        if command in ("train", "calibrate", "finetune", "evaluate", "visualize", "export"):
            p.add_argument("--decoder", choices=DECODERS,
                           help="segmentation: the decoder of a fresh model (default mask; a checkpoint brings its own)")
        if command == "compress":
            p.add_argument("--thresholds", choices=("global", "per_layer"),
                           help="segmentation: structure search, SPEC §4 global or §8 per-layer (default per_layer)")
            p.add_argument("--layers", type=int, nargs="+", help="segmentation: blocks to compress (default all)")
        if command == "evaluate":
            p.add_argument("--window", type=int, help="segmentation: sliding-window size for images larger than it "
                                                      "(default the model's image size)")

    def model_options(self, args) -> Dict[str, Any]:
        return {"decoder": getattr(args, "decoder", None)}

    def evaluate_options(self, args) -> Dict[str, Any]:
        return {"window": getattr(args, "window", None)}

    def compress_options(self, args) -> Dict[str, Any]:
        return {"thresholds": args.thresholds or self.thresholds, "layers": args.layers}

    def load_data(self, spec: str, seed: int = 0, img_size: Optional[int] = None, **options) -> DataBundle:
        return load_seg_data(spec, img_size=img_size, **options)

    def default_model(self, spec: str) -> Optional[str]:
        return DIGITS_SEG_VIT if spec == "digits" else None

    def load(self, checkpoint, name=None, num_classes=None, extra_kwargs=None, options=None):
        return load_segmenter(checkpoint, name, num_classes=num_classes, decoder=(options or {}).get("decoder"),
                              extra_kwargs=extra_kwargs)

    def num_classes(self, model) -> int:
        return int(model.num_classes)

    def eval_loader(self, data: DataBundle, batch_size: int, workers: int = 0):
        # validation images of a folder differ in size (sliding windows): one at a time
        return make_loader(data.test, batch_size if data.name == "digits" else 1, train=False, workers=workers)

    def train_options(self, args, data: DataBundle) -> Dict[str, Any]:
        # Image-level mixup / cutmix / label smoothing do not apply to pixel labels: the options are refused.
        for opt in ("mixup", "cutmix", "smoothing"):
            if getattr(args, opt, None):
                raise PipelineError(f"--{opt}: not used for segmentation (pixel labels)")
        return {}

    def loss(self, model):
        return seg_loss(getattr(model, "ignore_index", IGNORE_INDEX))

    def metrics(self, model, loader, device=None, progress: bool = False, window=None, **options):
        size = window or model.window_size[0]
        return segmentation_metrics(model, loader, model.num_classes, device, window=(size, size), progress=progress)

    def summary(self, metrics, n_images: int) -> str:
        return (f"mIoU {metrics['miou']:.2f}%, pixel accuracy {metrics['pixel_acc']:.2f}% on {n_images} validation "
                "images")

    def pictures(self, models, data: DataBundle, folder: str, n: int) -> List[str]:
        n = min(n, len(data.test))
        images = torch.stack([data.test[i][0] for i in range(n)])
        labels = torch.stack([data.test[i][1] for i in range(n)])
        return [render_predictions(dict(models), images, labels, os.path.join(folder, "predictions.png"), data.mean,
                                   data.std, data.num_classes,
                                   title="validation images: image / ground truth / dense / Prune-and-Merge "
                                         "(pixel accuracy)")]

    def visualize_extra(self, model, image, target, out: str, data: DataBundle) -> List[str]:
        size = model.window_size
        path = os.path.splitext(out)[0] + "_prediction.png"
        return [render_predictions({"model": model}, image[None], target[None], path, data.mean, data.std,
                                   model.num_classes, window=size)]

    def demo_data(self, cfg) -> DataBundle:
        from .segmentation_data import digits_segmentation
        return digits_segmentation(**cfg.data_options)


SEGMENTATION = Segmentation()
