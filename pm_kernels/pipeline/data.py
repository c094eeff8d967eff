"""Data for the pipeline: the embedded ``digits`` set (scikit-learn's 1,797 real 8×8 scans, no download),
or an ImageFolder tree read with timm's dataset and transforms.

``--data digits``: 8×8 scans upsampled (bilinear) to 32×32, 1 channel, a stratified 75/25 train/test split
with a fixed seed. No augmentation by default: random shifts (``shift``) slowed the short from-scratch
schedule of the demo down (82% vs 94% top-1 after 12 epochs, measured).
``--data DIR``: ``DIR/train`` and ``DIR/val`` (or ``validation``) when present, else ``DIR`` for both; labels
come from the training split's class map.
"""
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .io import PipelineError, PipelineWarning

__all__ = ["DataBundle", "load_data", "make_loader", "DIGITS", "is_unlabelled_folder", "unlabelled_images"]

DIGITS = "digits"
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class DataBundle:
    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: Tuple[float, ...] = field(default=DIGITS_MEAN)
    std: Tuple[float, ...] = field(default=DIGITS_STD)
    allows_mixup: bool = False
    sets_model_size: bool = True   # a fresh model is built for img_size (False: the data takes the model's size)


class DigitsDataset(Dataset):
    """Normalised (n, 1, S, S) images and labels; ``shift`` > 0 translates training images at random."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0):
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        if self.shift:
            s, pad = x.shape[-1], self.shift
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = F.pad(x, (pad, pad, pad, pad), value=-DIGITS_MEAN[0] / DIGITS_STD[0])[:, dy:dy + s, dx:dx + s]
        return x, self.labels[i]


def digits(seed: int = 0, img_size: int = 32, test_size: float = 0.25, shift: int = 0) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from .resources import check_fits

    X, y = load_digits(return_X_y=True)
    check_fits(f"img size {img_size}: the {len(y)} digit images at {img_size}x{img_size}",
               4 * len(y) * img_size ** 2)
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x - DIGITS_MEAN[0]) / DIGITS_STD[0]
    labels = torch.tensor(y, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                           random_state=seed, stratify=y)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return DataBundle(DIGITS, DigitsDataset(x[idx_train], labels[idx_train], shift=shift),
                      DigitsDataset(x[idx_test], labels[idx_test]), num_classes=10, in_chans=1,
                      img_size=img_size)


def _count_images(root: str) -> int:
    n = 0
    for _, _, files in os.walk(root):
        n += sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)
    return n


_SKIP_LIMIT = 50  # unreadable images in a row before the run ends (timm's own limit)


class ImageFolderSplit(Dataset):
    """One split of an ImageFolder (a timm ``ImageDataset``'s files, labels and transform). An image that cannot
    be read is skipped, as timm does (the next one is used), with one ``warning:`` line naming it (timm logs its
    own line); ``_SKIP_LIMIT`` in a row end the run with one clear line."""

    def __init__(self, dataset, root: str):
        self.dataset, self.root = dataset, root

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        from PIL import Image

        ds = self.dataset
        for _ in range(min(_SKIP_LIMIT, len(ds))):
            source, target = ds.reader[i][:2]
            try:
                with (source if hasattr(source, "read") else open(source, "rb")) as f:
                    img = Image.open(f).convert(getattr(ds, "input_img_mode", None) or "RGB")
                break
            except Exception as err:  # PIL's errors differ across versions and formats: each is an unreadable file
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
                warnings.warn(PipelineWarning(f"data {self.root}: {ds.reader.filename(i)} cannot be read "
                                              f"({reason}); skipped"))
                i = (i + 1) % len(ds)
        else:
            raise PipelineError(f"data {self.root}: {min(_SKIP_LIMIT, len(ds))} images in a row cannot be read (up "
                                f"to index {i})")
        if ds.transform is not None:
            img = ds.transform(img)
        if target is None:
            target = -1
        elif ds.target_transform is not None:
            target = ds.target_transform(target)
        return img, target

    @property
    def samples(self):
        return self.dataset.reader.samples


def _check_readable(split: ImageFolderSplit, tries: int = 50) -> None:
    """Fail now, not in the middle of a run, when none of the first ``tries`` images decodes."""
    from PIL import Image

    last = None
    for path, _ in split.samples[:tries]:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
            return
        except Exception as err:
            last = (path, (str(err).strip().splitlines() or [type(err).__name__])[0][:120])
    if last is not None:
        raise PipelineError(f"data {split.root}: none of the first {min(tries, len(split.samples))} images can be "
                            f"read (corrupt or not images), e.g. {last[0]}: {last[1]}")


def _class_names(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def image_folder(root: str, img_size: int = 224, mean=None, std=None, interpolation: str = "bicubic",
                 crop_pct: float = 0.875, random_erasing: float = 0.25) -> DataBundle:
    """timm ``ImageDataset`` + ``create_transform`` (train: random-resized crop, flip, random erasing).

    One class map, from the training split, labels both splits: a validation class absent from training is an
    error (its labels would mean another class); training classes without validation images, or a single
    training class, are warnings.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
    from timm.data.readers.reader_image_folder import find_images_and_targets

    if not os.path.isdir(root):
        raise PipelineError(f"data {root}: no such folder (give a folder of class sub-folders, or 'digits')")
    sub = lambda *names: next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), root)
    train_root, test_root = sub("train"), sub("val", "validation", "test")
    for r in {train_root, test_root}:
        if _count_images(r) == 0:
            raise PipelineError(f"data {r}: no images found (expected <class>/<image> files with extensions "
                                f"{', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    mean = tuple(mean or IMAGENET_DEFAULT_MEAN)
    std = tuple(std or IMAGENET_DEFAULT_STD)
    common = dict(input_size=(3, img_size, img_size), mean=mean, std=std, interpolation=interpolation)
    train_tf = create_transform(is_training=True, auto_augment=None, re_prob=random_erasing, **common)
    test_tf = create_transform(is_training=False, crop_pct=crop_pct, **common)
    try:
        train = ImageDataset(train_root, transform=train_tf)
        classes = dict(train.reader.class_to_idx)
        if test_root != train_root:
            _, test_classes = find_images_and_targets(test_root)
            unknown = set(test_classes) - set(classes)
            if unknown:
                raise PipelineError(f"data {root}: validation class(es) {_class_names(unknown)} are not in the "
                                    f"training split {train_root} (classes {_class_names(classes)})")
            missing = set(classes) - set(test_classes)
            if missing:
                warnings.warn(PipelineWarning(
                    f"data {root}: {len(missing)} of the {len(classes)} training classes have no validation images "
                    f"({_class_names(missing)}); accuracy is over the other {len(classes) - len(missing)}"))
        test = ImageDataset(test_root, transform=test_tf, class_map=classes)
    except PipelineError:
        raise
    except Exception as err:
        raise PipelineError(f"data {root}: cannot be read as an ImageFolder ({str(err).splitlines()[0][:160]})") \
            from None
    if len(classes) == 1:
        warnings.warn(PipelineWarning(f"data {root}: one class in the training split ({next(iter(classes))!r}): "
                                      "there is nothing to learn (the loss is 0 from the start)"))
    train, test = ImageFolderSplit(train, train_root), ImageFolderSplit(test, test_root)
    for split in (train, test):
        _check_readable(split)
    return DataBundle(root, train, test, num_classes=len(classes), in_chans=3, img_size=img_size, mean=mean,
                      std=std, allows_mixup=True, sets_model_size=False)


def is_unlabelled_folder(spec: str) -> bool:
    """A folder with image files at its top level: images without classes (an ImageFolder keeps its images in
    class sub-folders), e.g. for calibration without labels."""
    if spec == DIGITS or not os.path.isdir(spec):
        return False
    with os.scandir(spec) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


def unlabelled_images(root: str, img_size: int, in_chans: int = 3, mean=None, std=None,
                      crop_pct: float = 0.875) -> Dataset:
    """Every image under ``root`` (sub-folders included), read with timm's evaluation transform (resize, centre
    crop to ``img_size``, normalise with ``mean``/``std``, ImageNet's by default); items are (image, a
    sub-folder index nobody should read).
    Unreadable images are skipped with a ``warning:`` as for an ImageFolder."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform

    if in_chans != 3:
        raise PipelineError(f"data {root}: a folder of images is read as RGB, the model takes {in_chans} channels")
    transform = create_transform(input_size=(3, img_size, img_size), is_training=False, crop_pct=crop_pct,
                                 mean=tuple(mean or IMAGENET_DEFAULT_MEAN), std=tuple(std or IMAGENET_DEFAULT_STD),
                                 interpolation="bicubic")
    try:
        dataset = ImageDataset(root, transform=transform)
    except Exception as err:
        raise PipelineError(f"data {root}: cannot be read as a folder of images ({str(err).splitlines()[0][:160]})") \
            from None
    split = ImageFolderSplit(dataset, root)
    _check_readable(split)
    return split


def load_data(spec: str, seed: int = 0, img_size: Optional[int] = None, **kwargs) -> DataBundle:
    """``spec`` is ``digits`` or an ImageFolder path."""
    if spec == DIGITS:
        return digits(seed=seed, img_size=img_size or 32)
    return image_folder(spec, img_size=img_size or 224, **kwargs)


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
                distributed: bool = False, drop_last: Optional[bool] = None) -> DataLoader:
    """Seeded shuffling for training; a ``DistributedSampler`` under torchrun."""
    if batch_size < 1:
        raise PipelineError(f"batch size: expected >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise PipelineError("data: the split is empty")
    drop_last = (train and len(dataset) >= 2 * batch_size) if drop_last is None else drop_last
    sampler, generator = None, torch.Generator().manual_seed(seed)
    if distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      generator=generator, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0, worker_init_fn=_worker_default_sigterm if workers else None)


def _worker_default_sigterm(_worker_id: int) -> None:
    # A worker inherits the CLI's SIGTERM handler (raise, clean up, exit 143); a worker has nothing to clean up
    # and the main process reports the termination, so it just ends.
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cycle_batches(loader, n: int):
    """``n`` batches, cycling over the loader."""
    done = 0
    while done < n:
        for batch in loader:
            if done == n:
                return
            yield batch
            done += 1
