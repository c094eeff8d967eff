"""Fine-tuning (SPEC §5): distillation from the dense model, AdamW, cosine lr, optional mixup/cutmix, DDP.

    L = L_ce + α · T² · KL(softmax(t/T) ‖ softmax(s/T)) / (B · classes),   T = 20, α = 0.8 (Tiny) / 1.0 (Small)

AdamW (weight decay 0.001 on ≥2-D weights, M and R included; none on biases, norms, pos_embed, cls_token),
lr = base_lr × global_batch / 512 (base_lr 1e-4), cosine to 1e-6 per iteration, no warm-up. Every trainable
parameter (M, R and the ViT weights) gets the scaled lr; ``authors_lr_quirk`` reproduces the authors' script,
which leaves every 2-D weight (M and R included) at 1e-6; ``mr_lr_mult`` (opt-in) gives M and R a multiple of it,
``mr_warmup_iters`` their own linear warm-up (the digits frontier's variants). Under ``torchrun`` (WORLD_SIZE > 1)
the model is
wrapped in ``DistributedDataParallel`` and the loader uses a ``DistributedSampler``.
The same loop with no teacher trains the dense model (the digits demo trains its ViT from scratch with it).
"""
import datetime
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataBundle, make_loader
from .io import PipelineError

__all__ = ["DistillationLoss", "TrainConfig", "train", "dist_info", "init_distributed", "param_groups",
           "DIST_TIMEOUT_S"]


class DistillationLoss(nn.Module):
    """Base loss on the labels plus α·T²·KL(teacher ‖ student) on temperature-softened logits, per logit."""

    def __init__(self, base: nn.Module, teacher: Optional[nn.Module] = None, alpha: float = 0.8, tau: float = 20.0):
        super().__init__()
        if alpha < 0 or tau <= 0:
            raise PipelineError(f"distillation: expected alpha >= 0 and T > 0, got alpha={alpha}, T={tau}")
        self.base, self.teacher, self.alpha, self.tau = base, teacher, float(alpha), float(tau)

    def distill(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        T = self.tau
        kl = F.kl_div(F.log_softmax(student_logits.float() / T, dim=1), F.log_softmax(teacher_logits.float() / T, dim=1),
                      reduction="sum", log_target=True)
        return kl * (T * T) / student_logits.numel()

    def forward(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, targets)
        if self.teacher is None or self.alpha == 0:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        return loss + self.alpha * self.distill(logits, teacher_logits)


@dataclass
class TrainConfig:
    epochs: float = 30.0
    batch_size: int = 64            # per process; global batch = batch_size × world size
    base_lr: float = 1e-4           # scaled by global_batch / 512
    lr: Optional[float] = None      # absolute lr (overrides base_lr scaling)
    min_lr: float = 1e-6
    weight_decay: float = 1e-3
    warmup_iters: int = 0
    alpha: float = 0.8
    tau: float = 20.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    authors_lr_quirk: bool = False
    mr_lr_mult: float = 1.0         # M and R at this multiple of the lr (1: SPEC §5; digits frontier: 10 helps)
    mr_warmup_iters: Optional[int] = None   # M and R's own linear warm-up (None: warmup_iters, as the rest)
    clip_grad: Optional[float] = None
    amp: bool = False
    seed: int = 0
    workers: int = 0
    max_iters: Optional[int] = None  # stop after this many iterations (smoke tests)
    freeze_structure: bool = False   # keep every block's M, R fixed (dense training: M = R = I)
    progress: bool = True

    def scaled_lr(self, world_size: int = 1) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size * world_size / 512


def dist_info() -> Dict[str, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"world_size": world, "rank": int(os.environ.get("RANK", "0")),
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "distributed": world > 1}


DIST_TIMEOUT_S = 600.0


def init_distributed(timeout_s: Optional[float] = None) -> Dict[str, int]:
    """``init_process_group`` from torchrun's environment (nccl on CUDA, gloo otherwise); no-op when single.

    ``timeout_s`` (default ``DIST_TIMEOUT_S``): how long a collective waits for the other ranks before it
    fails, so that a rank that stopped responding ends the job instead of hanging it.
    """
    info = dist_info()
    if info["distributed"] and not torch.distributed.is_initialized():
        timeout_s = DIST_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise PipelineError(f"distributed timeout: expected a finite number of seconds > 0, got {timeout_s}")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info["local_rank"])
        torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info


def param_groups(model: nn.Module, lr: float, weight_decay: float, authors_lr_quirk: bool = False,
                 mr_lr_mult: float = 1.0, own_mr_group: bool = False) -> List[dict]:
    """Decay group (≥2-D weights, M and R included) and no-decay group (biases, norms, pos_embed, cls_token).

    mr_lr_mult != 1 (or ``own_mr_group``): M and R leave the decay group for their own (same weight decay) at
    lr × mr_lr_mult.
    On the digits frontier (bench/pareto.py, variant mr_lr10) 10 raised top-1 at every keep rate, paired over
    10 seeds; the default stays SPEC §5's single lr."""
    if isinstance(mr_lr_mult, bool) or not isinstance(mr_lr_mult, (int, float)) or not 0 < mr_lr_mult < math.inf:
        raise ValueError(f"mr_lr_mult: expected a positive finite number, got {mr_lr_mult!r}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, mr = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (mr_lr_mult != 1 or own_mr_group) and name.rsplit(".", 1)[-1] in ("M", "R"):
            mr.append(p)
        else:
            (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    decay_lr = 1e-6 if authors_lr_quirk else lr
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": decay_lr, "base_lr": decay_lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}]
    if mr:
        groups.append({"params": mr, "weight_decay": weight_decay, "lr": decay_lr * mr_lr_mult,
                       "base_lr": decay_lr * mr_lr_mult, "structure": True})
    return groups


def _lr_at(step: int, total: int, base: float, min_lr: float, warmup: int) -> float:
    if base <= min_lr:
        return base
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def train(model: nn.Module, data: DataBundle, cfg: TrainConfig, teacher: Optional[nn.Module] = None,
          device: Optional[torch.device] = None, base_loss=None) -> Dict[str, object]:
    """Train ``model`` in place on ``data.train``; returns a history dict (losses per epoch, lr, iterations).

    ``base_loss(logits, targets)`` replaces the cross-entropy on the labels (segmentation: the per-pixel one
    without unlabelled pixels); the distillation term is per logit, so per pixel for (B, K, H, W) logits.
    """
    from tqdm import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = dist_info()
    torch.manual_seed(cfg.seed + info["rank"])
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise PipelineError(f"mixup/cutmix: needs an even batch size, got {cfg.batch_size}")
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=data.num_classes)
    if mixup_fn is not None:
        from timm.loss import SoftTargetCrossEntropy
        base = SoftTargetCrossEntropy()
    else:
        base = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing) if base_loss is None else base_loss
    criterion = DistillationLoss(base, teacher, alpha=cfg.alpha, tau=cfg.tau)

    loader = make_loader(data.train, cfg.batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                         distributed=info["distributed"], drop_last=True if mixup_fn is not None else None)
    if len(loader) == 0:
        raise PipelineError(f"data: fewer training images ({len(data.train)}) than one batch ({cfg.batch_size})")
    lr = cfg.scaled_lr(info["world_size"])
    frozen = []
    if cfg.freeze_structure:
        frozen = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("M", "R") and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    mr_warmup = cfg.warmup_iters if cfg.mr_warmup_iters is None else cfg.mr_warmup_iters
    if isinstance(mr_warmup, bool) or not isinstance(mr_warmup, int) or mr_warmup < 0:
        raise ValueError(f"mr_warmup_iters: expected an int >= 0, got {cfg.mr_warmup_iters!r}")
    groups = param_groups(model, lr, cfg.weight_decay, cfg.authors_lr_quirk, cfg.mr_lr_mult,
                          own_mr_group=mr_warmup != cfg.warmup_iters)
    for g in groups:
        g["warmup"] = mr_warmup if g.get("structure") else cfg.warmup_iters
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    net = model
    if info["distributed"]:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = max(1, int(round(cfg.epochs * len(loader))))
    if cfg.max_iters is not None:
        total = min(total, cfg.max_iters)
    amp = cfg.amp and device.type == "cuda"
    history = {"config": asdict(cfg), "lr": lr, "global_batch": cfg.batch_size * info["world_size"],
               "iterations": total, "epoch_loss": []}
    step, epoch = 0, 0
    bar = tqdm(total=total, desc="train", disable=not cfg.progress or info["rank"] != 0, leave=False)
    try:  # the bar is cleared on any exit, so that an error is a line of its own
        while step < total:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            running, count = 0.0, 0
            for images, targets in loader:
                if step >= total:
                    break
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                for g in optimizer.param_groups:
                    g["lr"] = _lr_at(step, total, g["base_lr"], min(cfg.min_lr, g["base_lr"]), g["warmup"])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = net(images)
                    loss = criterion(images, logits, targets)
                if not torch.isfinite(loss):
                    raise PipelineError(f"training diverged: loss is {loss.item()} at iteration {step}; lower the lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                running, count, step = running + loss.item(), count + 1, step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            history["epoch_loss"].append(running / max(1, count))
            epoch += 1
    finally:
        bar.close()
    for p in frozen:
        p.requires_grad_(True)
    model.eval()
    return history
