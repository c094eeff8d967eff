"""``Segmenter``: semantic segmentation on a ViT backbone (Strudel et al., ICCV 2021), for PM (SPEC §8).

The backbone encodes the image into N tokens; its prefix tokens (CLS, distillation token, registers) are dropped
and the patch tokens, on their h × w grid, go to a decoder:

- ``decoder="linear"``: one linear layer per patch token → class logits at patch resolution;
- ``decoder="mask"``: the mask transformer. The patch tokens (projected to the decoder width) and
  ``num_classes`` learnable class embeddings run jointly through ``depth`` transformer layers; after a norm,
  patches and classes are each projected and L2-normalised, the masks are their scalar products
  (patches · classesᵀ, one mask per class) and a LayerNorm over the classes normalises them.

The patch-level logits are upsampled bilinearly to the input size. Images whose sides are not multiples of the
patch size are padded (bottom / right) and the logits cropped back. ``sliding_window`` runs a model on images
larger than its window (overlapping windows, logits averaged), as Segmenter's inference does.

A PM backbone returns all N tokens from every block (SPEC §1), so the decoder is unchanged: no unmerge step.
The backbone is a ViT of any supported host (timm, transformers, open_clip), read through its ``Host``. A
Segmenter is a *task model*: it names its backbone (``pm_backbone``), so ``calibrate`` / ``compress`` /
``optimize`` / ``export`` act on the backbone; ``optimize`` gives an ``OptimizedSegmenter`` whose backbone
returns every patch token through the folded blocks.
"""
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .hosts import host_of

__all__ = ["Segmenter", "OptimizedSegmenter", "LinearDecoder", "MaskTransformerDecoder", "sliding_window",
           "pixel_cross_entropy", "pixel_distillation", "IGNORE_INDEX", "DECODERS"]

IGNORE_INDEX = 255  # label of unlabelled pixels (ADE20K's class 0 after the usual shift)
DECODERS = ("mask", "linear")


class LinearDecoder(nn.Module):
    """Per-patch linear classifier: (B, h·w, D) patch tokens → (B, num_classes, h, w)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        logits = self.head(tokens)
        return logits.transpose(1, 2).reshape(tokens.shape[0], self.num_classes, grid[0], grid[1])


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: class embeddings and patch tokens attend jointly; masks = normalised patch
    features · normalised class features, then a LayerNorm over the classes."""

    def __init__(self, embed_dim: int, num_classes: int, depth: int = 2, dim: Optional[int] = None,
                 num_heads: Optional[int] = None, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 drop_path: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        dim = dim or embed_dim
        num_heads = num_heads or max(1, dim // 64)
        if dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the decoder width {dim}, got {num_heads}")
        self.num_classes = num_classes
        self.proj_in = nn.Linear(embed_dim, dim)
        self.class_embed = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout,
                                           drop_path=drop_path * i / max(1, depth - 1)) for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.class_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, n = tokens.shape[:2]
        x = torch.cat([self.proj_in(tokens), self.class_embed.expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, n, num_classes)
        return masks.transpose(1, 2).reshape(B, self.num_classes, grid[0], grid[1])


class Segmenter(nn.Module):
    """Segmenter (Strudel et al. 2021): ``backbone`` (a ViT of any supported host: every family ``pm_kernels.patch``
    supports, patched or not) + a ``"mask"`` or ``"linear"`` decoder; ``forward(images)`` → logits
    (B, num_classes, H, W).

    The backbone's classifier head is removed; ``.backbone`` is the host's model, which ``calibrate`` /
    ``compress`` / ``optimize`` act on. ``ignore_index``: the label of unlabelled pixels (the
    default calibration loss, ``pixel_cross_entropy``, skips them). Decoder options: ``decoder_depth`` (2),
    ``dropout`` (0.1), as the paper's mask transformer.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "mask", *, decoder_depth: int = 2,
                 dropout: float = 0.1, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        try:
            host = host_of(backbone)
        except TypeError as err:
            raise TypeError(f"backbone: {str(err).replace('model: ', '', 1)}") from None
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if isinstance(decoder_depth, bool) or not isinstance(decoder_depth, int) or decoder_depth < 1:
            raise ValueError(f"decoder_depth: expected an int >= 1, got {decoder_depth!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
        host.remove_head(backbone)
        self.host = host  # the backbone's library (stateless): the decoder reads the tokens through it
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.ignore_index = ignore_index
        dim = host.embed_dim(backbone)
        self.decoder = (MaskTransformerDecoder(dim, num_classes, depth=decoder_depth, dropout=dropout)
                        if decoder == "mask" else LinearDecoder(dim, num_classes))

    def no_weight_decay(self):
        """Parameters AdamW leaves undecayed: the backbone's (pos_embed, cls_token, ...) and the class embeddings."""
        names = getattr(self.backbone, "no_weight_decay", lambda: set())()
        return {"backbone." + n for n in names} | {"decoder.class_embed"}

    # ---- a task model: calibrate / compress / optimize / export act on the backbone

    @property
    def pm_backbone(self) -> nn.Module:
        return self.backbone

    def pm_calibration_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The default calibration loss: per-pixel cross-entropy without the unlabelled pixels."""
        return pixel_cross_entropy(logits, targets, self.ignore_index)

    def pm_optimized(self, backbone: nn.Module) -> "OptimizedSegmenter":
        """This segmenter with its backbone run as ``backbone`` (the backbone's ``optimize`` form)."""
        return OptimizedSegmenter(self, backbone)

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.host.patch_size(self.backbone))

    @property
    def window_size(self) -> Tuple[int, int]:
        """The image size the backbone is built for (the sliding-window size for larger images)."""
        (h, w), (ph, pw) = self.host.grid(self.backbone), self.host.patch_size(self.backbone)
        return h * ph, w * pw

    def logits_from(self, features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) with ``features(images)`` → the backbone's N final tokens (after its
        final norm), of which the decoder reads the patch tokens."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        H, W = images.shape[-2:]
        ph, pw = self.patch_size
        pad_h, pad_w = (-H) % ph, (-W) % pw
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        grid = ((H + pad_h) // ph, (W + pad_w) // pw)
        prefix = self.host.num_prefix(self.backbone)
        tokens = features(images)[:, prefix:]
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"backbone: expected {grid[0] * grid[1]} patch tokens after the {prefix} prefix "
                             f"tokens ({grid[0]}x{grid[1]} grid), got {tokens.shape[1]}; a dense head needs every "
                             "patch token at the exit")
        masks = self.decoder(tokens, grid)
        logits = F.interpolate(masks, size=(H + pad_h, W + pad_w), mode="bilinear", align_corners=False)
        return logits[:, :, :H, :W]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.host.dense_features(self.backbone), images)


class OptimizedSegmenter(nn.Module):
    """A ``Segmenter`` whose backbone runs as ``features`` (the backbone's ``optimize`` form: folded boundaries,
    all N tokens at the exit); shares every weight with the segmenter. Made by ``pm_kernels.optimize(segmenter)``."""

    def __init__(self, segmenter: Segmenter, features: nn.Module):
        super().__init__()
        self.segmenter = segmenter
        self.features = features

    @property
    def backbone(self) -> nn.Module:
        return self.segmenter.backbone

    @property
    def num_classes(self) -> int:
        return self.segmenter.num_classes

    @property
    def window_size(self) -> Tuple[int, int]:
        return self.segmenter.window_size

    @property
    def pm_source(self) -> nn.Module:
        return self.segmenter

    @property
    def folded_dtype(self) -> torch.dtype:
        return self.features.folded_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter.logits_from(self.segmenter.host.dense_features(self.features), images)


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name}: expected a positive int or (h, w), got {value!r}")
    return tuple(value)


def _starts(size: int, window: int, stride: int):
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return starts + [size - window]  # the last window ends at the border


def sliding_window(model: nn.Module, images: torch.Tensor, window_size: Union[int, Sequence[int], None] = None,
                   stride: Union[int, Sequence[int], None] = None, batch_size: int = 4) -> torch.Tensor:
    """Logits (B, K, H, W) of ``model`` on images of any size, from overlapping windows (Segmenter's inference).

    ``window_size``: default the model's ``window_size`` (the backbone's image size); ``stride``: default the
    window (no overlap; 2/3 of it is Segmenter's Pascal / Cityscapes setting). Windows start every ``stride``
    pixels and the last one ends at the border; an image side smaller than the window is padded (bottom / right,
    zeros) and cropped back. Overlapping logits are averaged. ``batch_size`` windows run at a time.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError("images: expected a float tensor (B, C, H, W)")
    if window_size is None:
        window_size = getattr(model, "window_size", None)
        if window_size is None:
            raise ValueError("window_size: this model has no window_size attribute; pass window_size=(h, w)")
    wh, ww = _pair(window_size, "window_size")
    sh, sw = _pair(stride if stride is not None else (wh, ww), "stride")
    if sh > wh or sw > ww:
        raise ValueError(f"stride: expected at most the window {(wh, ww)} (every pixel covered), got {(sh, sw)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    B, _, H, W = images.shape
    pad_h, pad_w = max(0, wh - H), max(0, ww - W)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    Hp, Wp = images.shape[-2:]
    boxes = [(y, x) for y in _starts(Hp, wh, sh) for x in _starts(Wp, ww, sw)]
    total = count = None
    for i in range(0, B * len(boxes), batch_size):
        items = [(b, boxes[j]) for b, j in (divmod(k, len(boxes)) for k in range(i, min(i + batch_size,
                                                                                         B * len(boxes))))]
        crops = torch.stack([images[b, :, y:y + wh, x:x + ww] for b, (y, x) in items])
        out = model(crops)
        if total is None:
            total = out.new_zeros(B, out.shape[1], Hp, Wp)
            count = out.new_zeros(1, 1, Hp, Wp)
        for (b, (y, x)), logits in zip(items, out):
            total[b, :, y:y + wh, x:x + ww] += logits
    for y, x in boxes:
        count[..., y:y + wh, x:x + ww] += 1
    return (total / count)[:, :, :H, :W]


def _check_pixel_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"{name}: expected float logits (B, num_classes, H, W), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")


def pixel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (targets != ``ignore_index``); 0 when none is labelled
    (PyTorch's mean would be NaN). logits (B, K, H, W), targets int64 (B, H, W)."""
    _check_pixel_logits(logits)
    if (not isinstance(targets, torch.Tensor) or targets.dtype != torch.long
            or tuple(targets.shape) != (logits.shape[0],) + tuple(logits.shape[2:])):
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected int64 labels of shape {(logits.shape[0],) + tuple(logits.shape[2:])} "
                         f"(B, H, W) like the logits, got {got}")
    labelled = (targets != ignore_index).sum()
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss / labelled.clamp_min(1)


def pixel_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) over the classes of every pixel, summed and divided by the number of
    logits (B · classes · H · W): SPEC §5's per-image distillation, per pixel."""
    _check_pixel_logits(student_logits, "student_logits")
    _check_pixel_logits(teacher_logits, "teacher_logits")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
        raise ValueError(f"tau: expected a temperature > 0, got {tau!r}")
    kl = F.kl_div(F.log_softmax(student_logits.float() / tau, dim=1),
                  F.log_softmax(teacher_logits.float() / tau, dim=1), reduction="sum", log_target=True)
    return kl * (tau * tau) / student_logits.numel()
