"""Classification: a timm ViT/DeiT (or the digits demo's ViT) judged by top-1 accuracy.

Data: ``digits`` (scikit-learn's scans, embedded) or an ImageFolder tree (``pipeline.data``); mixup 0.8, cutmix
1.0 and label smoothing 0.1 on ImageFolder data by default (SPEC §5), none on digits. Structure search: SPEC §4
(global thresholds, prune rate 0.1). The demo: the digits ViT trained from scratch, compressed at keep 0.6 and
0.4 (README, "The demo").
"""
from typing import Any, Dict, Optional

import torch

from ..data import DataBundle, load_data
from ..families import DIGITS_VIT
from ..model import load_model
from .base import Task

__all__ = ["Classification", "CLASSIFICATION", "accuracy"]


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device=None, progress: bool = False) -> float:
    """Top-1 accuracy in percent."""
    from tqdm import tqdm

    device = torch.device(device or next(model.parameters()).device)
    model.to(device).eval()
    correct = total = 0
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        logits = model(images.to(device))
        correct += int((logits.argmax(1).cpu() == targets).sum())
        total += targets.numel()
    return 100.0 * correct / max(1, total)


class Classification(Task):
    name = "classification"
    headline = "top1"
    headline_label = "top-1 %"
    loads = ("classification",)
    thresholds = "global"
    demo_defaults = dict(model=DIGITS_VIT, batch_size=32, dense_epochs=16.0, dense_lr=2e-3, dense_weight_decay=0.05,
                         warmup_iters=40, calib_iters=20, keep_rates=(0.6, 0.4), prune_rate=0.1, ft_epochs=4.0,
                         ft_lr=5e-4, alpha=0.8, tau=20.0, speed_repeats=5, n_pictures=1)
    demo_quick = dict(dense_epochs=8.0, ft_epochs=1.0, calib_iters=8, keep_rates=(0.6,), speed_repeats=2,
                      speed_min_time=0.05)
    demo_folder = "runs/demo"

    def load_data(self, spec: str, seed: int = 0, img_size: Optional[int] = None, **options) -> DataBundle:
        return load_data(spec, seed=seed, img_size=img_size, **options)

    def default_model(self, spec: str) -> Optional[str]:
        return None  # a fresh classifier is always named (--model)

    def load(self, checkpoint, name=None, num_classes=None, extra_kwargs=None, options=None):
        return load_model(checkpoint, name, num_classes=num_classes, extra_kwargs=extra_kwargs)

    def num_classes(self, model) -> int:
        return int(model.num_classes)

    def train_options(self, args, data: DataBundle) -> Dict[str, Any]:
        folder = data.allows_mixup

        def pick(value, folder_default):
            return value if value is not None else (folder_default if folder else 0.0)
        return dict(mixup=pick(args.mixup, 0.8), cutmix=pick(args.cutmix, 1.0), smoothing=pick(args.smoothing, 0.1))

    def metrics(self, model, loader, device=None, progress: bool = False, **options) -> Dict[str, Any]:
        return {"top1": accuracy(model, loader, device, progress=progress)}


CLASSIFICATION = Classification()
