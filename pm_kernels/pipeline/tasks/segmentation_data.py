"""Segmentation data: the embedded digits-segmentation task (no download) and an ADE20K-layout folder reader.

``digits`` (with ``--task segmentation``): canvases built from scikit-learn's 1,797 real 8×8 digit scans.
The scans are split once (stratified 75 / 25, fixed seed) into training and validation scans; each canvas
(32×32 grey by default) gets 2 to 4 scans drawn from its split, each upsampled (bilinear) to 16×16 and placed at
a random free position on a 4-pixel lattice (the patch size of the embedded ViT: a digit covers 4×4 patches; no
overlap; a digit that finds no free place is left out, so a 32×32 canvas holds 1 to 4). Every pixel is
labelled with its digit's class (1 + digit) where that scan has ink (upsampled intensity > 0.3 of full scale),
else background (0): 11 classes. Canvases come from a fixed generator: the same seed, the same task, whatever
the run's seed (runs differ by their training seed, on the same data).

ADE20K (``ADEChallengeData2016/``): ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (same file stem), label 0 = "other" → ignored (255), 1..150 →
classes 0..149. Training: random rescale of the image (shorter side ``crop_size`` × [0.5, 2.0]), random crop
``crop_size``² (padded with the ignore label where the image is smaller), horizontal flip. Validation: the
shorter side resized to ``crop_size`` (the window size; inference slides windows over the long side), labels
at that size (nearest).
"""
import functools
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...segmenter import IGNORE_INDEX
from ..data import DataBundle
from ..io import PipelineError

__all__ = ["DigitsSegmentation", "digits_segmentation", "ADE20K", "ade20k", "load_seg_data", "DIGITS_SEG_CLASSES",
           "DIGITS_SEG_SIZE", "ADE_MEAN", "ADE_STD"]

DIGITS_SEG_CLASSES = 11
DIGITS_SEG_SIZE, DIGITS_SEG_TRAIN = 32, 4000  # the demo's canvas side and training canvases
INK = 0.3
ADE_MEAN, ADE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as timm's ViTs


class DigitsSegmentation(Dataset):
    """(image (1, S, S) normalised to [-1, 1], labels (S, S) int64) pairs held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _first_fit(gen: torch.Generator, high: int, tries: int, fits) -> Optional[Tuple[int, int]]:
    """The first of ``tries`` positions (y, x), each drawn uniformly in [0, high)², for which ``fits(y, x)``, or
    None. The generator ends where ``tries`` one-pair draws stopping at the first fit would leave it (the canvases
    of a seed do not change): the pairs are drawn in one call, then the state is rewound to just past the pair
    used. One call instead of one per try: a crowded canvas tries dozens of places per digit."""
    state = gen.get_state()
    pairs = torch.randint(0, high, (tries, 2), generator=gen).tolist()
    for t, (y, x) in enumerate(pairs):
        if fits(y, x):
            if t + 1 < tries:
                gen.set_state(state)
                torch.randint(0, high, (t + 1, 2), generator=gen)
            return y, x
    return None


def _canvases(scans: torch.Tensor, digits: torch.Tensor, n: int, size: int, gen: torch.Generator,
              min_digits: int = 2, max_digits: int = 4, sides: Tuple[int, ...] = (16,), step: int = 4,
              overlap: bool = False, tries: int = 50, background_noise: float = 0.0):
    """``n`` canvases of ``size``² with ``min_digits``..``max_digits`` scans each, upsampled to one of ``sides``,
    at positions on a ``step``-pixel lattice; without ``overlap`` a digit that finds no free place in ``tries``
    draws is left out. ``background_noise`` > 0: every pixel gets at least a uniform draw in [0, noise) (below
    the ink threshold, so the labels do not change; 0 draws nothing, so the canvases stay those of the seed)."""
    if not 0.0 <= background_noise < INK:
        raise ValueError(f"background_noise: expected a value in [0, {INK}) (below the ink threshold), "
                         f"got {background_noise!r}")
    images = torch.zeros(n, 1, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    sides = tuple(min(s, size) for s in sides)
    resized = {side: F.interpolate(scans[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
               for side in set(sides)}  # every scan at every size, once
    for i in range(n):
        count = int(torch.randint(min_digits, max_digits + 1, (1,), generator=gen))
        boxes = []  # (y, x, side) of the digits placed on this canvas
        for _ in range(count):
            j = int(torch.randint(0, scans.shape[0], (1,), generator=gen))
            side = sides[int(torch.randint(0, len(sides), (1,), generator=gen))]
            place = _first_fit(gen, (size - side) // step + 1, tries, lambda y, x: overlap or not any(
                step * y < by + bs and by < step * y + side and step * x < bx + bs and bx < step * x + side
                for by, bx, bs in boxes))
            if place is None:
                continue
            y, x = step * place[0], step * place[1]
            boxes.append((y, x, side))
            ink = resized[side][j]
            patch = images[i, 0, y:y + side, x:x + side]
            mask = ink > INK
            images[i, 0, y:y + side, x:x + side] = torch.where(mask, torch.maximum(patch, ink), patch)
            labels[i, y:y + side, x:x + side][mask] = 1 + int(digits[j])
        if background_noise > 0:
            images[i, 0] = torch.maximum(images[i, 0], background_noise * torch.rand(size, size, generator=gen))
    return images * 2.0 - 1.0, labels


@functools.lru_cache(maxsize=4)  # deterministic: built once per process for each size (its tensors are not mutated)
def digits_segmentation(img_size: int = DIGITS_SEG_SIZE, n_train: int = DIGITS_SEG_TRAIN, n_val: int = 300,
                        data_seed: int = 0, background_noise: float = 0.0) -> DataBundle:
    """The embedded task (see the module docstring): fixed split and canvases for a given ``data_seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if img_size < 16:
        raise PipelineError(f"img size {img_size}: the digits-segmentation canvases need at least 16 pixels")
    X, y = load_digits(return_X_y=True)
    scans = torch.tensor(X, dtype=torch.float32).view(-1, 8, 8) / 16.0
    digits = torch.tensor(y, dtype=torch.long)
    idx_train, idx_val = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=data_seed,
                                          stratify=y)
    gen = torch.Generator().manual_seed(1000 + data_seed)
    train = _canvases(scans[idx_train], digits[idx_train], n_train, img_size, gen, background_noise=background_noise)
    val = _canvases(scans[idx_val], digits[idx_val], n_val, img_size, gen, background_noise=background_noise)
    return DataBundle("digits", DigitsSegmentation(*train), DigitsSegmentation(*val),
                      num_classes=DIGITS_SEG_CLASSES, in_chans=1, img_size=img_size, mean=(0.5,), std=(0.5,))


# ------------------------------------------------------------------------------------------------ ADE20K

def _pairs(root: str, split: str) -> List[Tuple[str, str]]:
    img_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for d in (img_dir, ann_dir):
        if not os.path.isdir(d):
            raise PipelineError(f"data {root}: no folder {os.path.relpath(d, root)} (expected the ADE20K layout "
                                "ADEChallengeData2016/images/{training,validation}/*.jpg and annotations/.../*.png)")
    pairs = []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        ann = os.path.join(ann_dir, stem + ".png")
        if not os.path.exists(ann):
            raise PipelineError(f"data {root}: image {split}/{name} has no annotation {os.path.relpath(ann, root)}")
        pairs.append((os.path.join(img_dir, name), ann))
    if not pairs:
        raise PipelineError(f"data {root}: no images in {os.path.relpath(img_dir, root)}")
    return pairs


class ADE20K(Dataset):
    """One split of an ADE20K-layout folder; items are (normalised image (3, h, w), labels (h, w) int64)."""

    def __init__(self, root: str, split: str, crop_size: int = 512, train: bool = True,
                 mean=ADE_MEAN, std=ADE_STD, scale_range: Tuple[float, float] = (0.5, 2.0), num_classes: int = 150):
        self.pairs = _pairs(root, split)
        self.crop, self.train, self.scale_range, self.num_classes = crop_size, train, scale_range, num_classes
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, i):
        from PIL import Image

        img_path, ann_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                img = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                img = img.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255.0
            with Image.open(ann_path) as an:
                ann = torch.frombuffer(bytearray(an.convert("L").tobytes()), dtype=torch.uint8)
                ann = ann.view(an.height, an.width).long()
        except OSError as err:
            raise PipelineError(f"data: cannot read {img_path} / {ann_path} ({err})") from None
        if img.shape[1:] != ann.shape:
            raise PipelineError(f"data: {ann_path} is {tuple(ann.shape)}, its image {tuple(img.shape[1:])}")
        if int(ann.max()) > self.num_classes:
            raise PipelineError(f"data: {ann_path} has label {int(ann.max())} > {self.num_classes} classes")
        labels = torch.where(ann == 0, torch.full_like(ann, IGNORE_INDEX), ann - 1)  # 0 = other: ignored
        return img, labels

    @staticmethod
    def _resize(img, labels, short: int):
        h, w = img.shape[1:]
        s = short / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return img, labels

    def __getitem__(self, i):
        img, labels = self._read(i)
        if not self.train:
            img, labels = self._resize(img, labels, self.crop)
            return (img - self.mean) / self.std, labels
        lo, hi = self.scale_range
        img, labels = self._resize(img, labels, int(self.crop * (lo + (hi - lo) * float(torch.rand(())))))
        pad_h, pad_w = max(0, self.crop - img.shape[1]), max(0, self.crop - img.shape[2])
        img = (img - self.mean) / self.std
        if pad_h or pad_w:  # image padded with 0 (the mean after normalisation), labels with "ignore"
            img = F.pad(img, (0, pad_w, 0, pad_h))
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        y = int(torch.randint(0, img.shape[1] - self.crop + 1, ()))
        x = int(torch.randint(0, img.shape[2] - self.crop + 1, ()))
        img, labels = img[:, y:y + self.crop, x:x + self.crop], labels[y:y + self.crop, x:x + self.crop]
        if float(torch.rand(())) < 0.5:
            img, labels = img.flip(-1), labels.flip(-1)
        return img.contiguous(), labels.contiguous()


def ade20k(root: str, crop_size: int = 512, mean=ADE_MEAN, std=ADE_STD) -> DataBundle:
    """``root``: the ``ADEChallengeData2016`` folder (or a folder holding it)."""
    if not os.path.isdir(root):
        raise PipelineError(f"data {root}: no such folder (give the ADEChallengeData2016 folder, or 'digits')")
    inner = os.path.join(root, "ADEChallengeData2016")
    root = inner if os.path.isdir(inner) else root
    train = ADE20K(root, "training", crop_size, train=True, mean=mean, std=std)
    val = ADE20K(root, "validation", crop_size, train=False, mean=mean, std=std)
    for split in (train, val):  # fail now, not in the middle of a run, when a split's first pair does not decode
        split._read(0)
    return DataBundle(root, train, val, num_classes=150, in_chans=3, img_size=crop_size, mean=tuple(mean),
                      std=tuple(std))


def load_seg_data(spec: str, img_size: Optional[int] = None, **options) -> DataBundle:
    """``digits`` (the embedded task; ``options``: ``n_train``, ``n_val``, ``background_noise``) or an
    ADE20K-layout folder."""
    if spec == "digits":
        return digits_segmentation(img_size=img_size or DIGITS_SEG_SIZE, **options)
    if options:
        raise PipelineError(f"data {spec}: options {', '.join(sorted(options))} are for the digits canvases only")
    return ade20k(spec, crop_size=img_size or 512)
