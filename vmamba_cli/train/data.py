"""Training data: the offline digits set, image folders, the recipe's augmentations (timm's
create_transform, as the official training), Mixup/CutMix with label smoothing, and a resumable
distributed sampler."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler

from vmamba_cli.data import IMAGENET_MEAN, IMAGENET_STD, class_subfolders, find_images, load_image
from vmamba_cli.errors import DataError, ImageError

DIGITS = "digits"


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    train: Dataset
    val: Dataset
    class_names: list[str]
    description: str
    eval_crop_pct: float        # crop of the held-out evaluation (1.0: no border crop), recorded in checkpoints


class TensorImageDataset(Dataset):
    """uint8 (N, 3, H, W) images with labels; the transform receives a tv_tensors.Image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image = tv_tensors.Image(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class ImageReadError(DataError):
    """A training image that cannot be read. Raised in a DataLoader worker, it reaches the main process
    re-created by torch as ``ImageReadError(text)`` where the text holds the worker's whole traceback;
    the constructor keeps the original one-line message (the traceback's last line)."""

    def __init__(self, message: str):
        lines = [line for line in str(message).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Caught "):
            last = lines[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class ImageFileDataset(Dataset):
    """(path, label) pairs read with ``vmamba_cli.data.load_image`` (EXIF, gray, RGBA ... handled)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable | None = None):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_image(path)
        except ImageError as exc:
            raise ImageReadError(str(exc)) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def digits_arrays(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 handwritten digits (shipped in its wheel) as uint8 (N, 3, S, S)
    images, bilinearly upsampled to ``image_size``, and their labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # 0..16 ink levels
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def write_digits_folder(root: str | os.PathLike, image_size: int = 128, *, split: str = "val",
                        val_fraction: float = 0.2, split_seed: int = 0) -> int:
    """Write one split of the digits data as PNG class folders ``root/<digit>/digit_<index>.png``
    (the split `vmamba train --data digits` makes with the same ``val_fraction`` / ``split_seed``), so
    that `vmamba eval` can read the held-out digits. Returns the number of images written."""
    from PIL import Image

    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    images, labels = digits_arrays(image_size)
    train_idx, val_idx = split_indices(len(labels), val_fraction, split_seed)
    indices = (val_idx if split == "val" else train_idx).tolist()
    root = Path(root)
    for index in indices:
        folder = root / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index, 0].numpy(), mode="L").save(folder / f"digit_{index:04d}.png")
    return len(indices)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random train / held-out split (independent of the training seed)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _class_folder_samples(root: Path, class_names: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    folders = [root / name for name in class_subfolders(root)]
    if class_names is None:
        class_names = [p.name for p in folders]
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for folder in folders:
        if folder.name not in index:
            raise DataError(f"{folder}: class folder not present in the training set")
        # An empty class folder only adds no samples (its "contains no images" is not an error here).
        samples += [(path, index[folder.name]) for path in find_images([folder]).files]
    return samples, class_names


def image_folder_samples(root: str | os.PathLike, val_fraction: float, split_seed: int):
    """Samples of ``root/train/<class>/*`` + ``root/val/<class>/*``, or of ``root/<class>/*`` split
    into train / held-out with a seeded permutation. Returns (train, val, class_names)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder (give an image folder or 'digits')")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected train/ and val/ class folders, or class folders)")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir():
        train, class_names = _class_folder_samples(train_dir)
        if val_dir.is_dir():
            val, _ = _class_folder_samples(val_dir, class_names)
        else:
            val = None
    else:
        train, class_names = _class_folder_samples(root)
        val = None
    if not class_names:
        raise DataError(f"{root}: no class folders (expected {root}/train/<class>/... or {root}/<class>/...)")
    if not train:
        raise DataError(f"{root}: the class folders contain no images")
    if val is None:
        train_idx, val_idx = split_indices(len(train), val_fraction, split_seed)
        train, val = [train[i] for i in train_idx.tolist()], [train[i] for i in val_idx.tolist()]
    if not val:
        raise DataError(f"{val_dir}: the validation class folders contain no images")
    return train, val, class_names


def build_datasets(data: str, image_size: int, *, train_transform, eval_transform_fn: Callable[[float], Callable],
                   val_fraction: float = 0.2, split_seed: int = 0, subset: int = 0,
                   crop_pct: float = 224 / 256) -> TrainData:
    """``data`` is "digits" or an image folder. ``eval_transform_fn(crop_pct)`` builds the eval pipeline."""
    if data == DIGITS:
        images, labels = digits_arrays(image_size)
        train_idx, val_idx = split_indices(len(labels), val_fraction, split_seed)
        if subset:
            train_idx = train_idx[:subset]
        # The images already have the model's size: evaluation uses them whole (crop_pct 1).
        return TrainData(
            TensorImageDataset(images[train_idx], labels[train_idx], train_transform),
            TensorImageDataset(images[val_idx], labels[val_idx], eval_transform_fn(1.0)),
            [str(i) for i in range(10)],
            f"digits (scikit-learn, 8x8 upsampled to {image_size}x{image_size}): "
            f"{len(train_idx)} train / {len(val_idx)} held-out",
            1.0,
        )
    train, val, class_names = image_folder_samples(data, val_fraction, split_seed)
    if subset:
        train = train[:subset]
    return TrainData(
        ImageFileDataset(train, train_transform), ImageFileDataset(val, eval_transform_fn(crop_pct)),
        class_names, f"{data}: {len(class_names)} classes, {len(train)} train / {len(val)} val images", crop_pct,
    )


# ------------------------------------------------------------------------------------------------
# Transforms (timm's create_transform, the pipeline the official training calls)
# ------------------------------------------------------------------------------------------------

def randaugment_policy(ops: int = 2, magnitude: int = 9, magnitude_std: float = 0.5) -> str:
    """timm's RandAugment policy string: ``rand-m9-mstd0.5-inc1`` with the recipe's values.

    ``inc1`` selects timm's 15-op set whose ops grow stronger with the magnitude (posterize down to
    1 bit at m9, Invert and SolarizeAdd included); each op is applied with probability 0.5 and its
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10].
    """
    parts = ["rand", f"m{magnitude}"]
    if ops != 2:  # timm's default; left out so that the recipe's string is the official one
        parts.append(f"n{ops}")
    if magnitude_std > 0:
        parts.append(f"mstd{magnitude_std:g}")
    parts.append("inc1")
    return "-".join(parts)


class _ToPIL:
    """uint8 image tensors (the in-memory digits) to PIL, which timm's RandAugment ops need; PIL
    images (read from files) pass through."""

    def __call__(self, image):
        if isinstance(image, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            return to_pil_image(image.as_subclass(torch.Tensor))
        return image

    def __repr__(self) -> str:
        return "ToPIL()"


def train_transform(image_size: int, *, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                    randaugment: bool = True, randaugment_ops: int = 2, randaugment_magnitude: int = 9,
                    randaugment_mstd: float = 0.5, color_jitter: float = 0.4, random_erasing: float = 0.25,
                    interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The recipe's training pipeline, built by timm's ``create_transform(is_training=True)`` with
    the official arguments (official classification/data/build.py): RandomResizedCrop (PIL,
    ``interpolation``), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1`` (bicubic geometric ops,
    borders filled with the mean pixel), ToTensor, normalisation, random erasing with per-pixel
    normal values (mode 'pixel', one region).

    ``color_jitter`` is used only when ``randaugment`` is off, as timm does (the official 0.4 is
    therefore inactive in the recipe). Takes PIL images and uint8 image tensors.
    """
    # timm is imported here only: it brings huggingface_hub with it, and no other command needs it.
    from timm.data import create_transform
    from torchvision import transforms

    pipeline = create_transform(
        image_size, is_training=True, scale=tuple(crop_scale), ratio=tuple(crop_ratio), hflip=hflip,
        color_jitter=color_jitter if color_jitter > 0 else None,
        auto_augment=randaugment_policy(randaugment_ops, randaugment_magnitude, randaugment_mstd) if randaugment else None,
        interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        re_prob=random_erasing, re_mode="pixel", re_count=1)
    for op in getattr(next((t for t in pipeline.transforms if type(t).__name__ == "RandAugment"), None), "ops", ()):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keeping_bits
    return transforms.Compose([_ToPIL(), *pipeline.transforms])


def posterize_keeping_bits(img, bits_to_keep: int, **_):
    """Keep the ``bits_to_keep`` high bits of every channel; 0 bits gives a black image.

    A magnitude drawn at the top of its range (10, about 2% of the draws at m9 mstd0.5) asks timm's
    PosterizeIncreasing for 0 bits. The Pillow of the official runs masked every value to 0; newer
    Pillow releases (13 among them) raise ValueError instead, which would stop a training run.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# ------------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing folded into the targets
# ------------------------------------------------------------------------------------------------

class MixupCutmix:
    """Batch-mode Mixup / CutMix (torchvision v2) returning soft targets with label smoothing.

    With probability ``prob`` a batch is mixed; when both are enabled CutMix is chosen with
    probability ``switch_prob``. Smoothing is applied after mixing, which equals timm's smoothing of
    both one-hot targets before mixing (the operation is linear in the one-hot vectors).
    """

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
        from torchvision.transforms import v2

        self.num_classes, self.prob, self.switch_prob = num_classes, prob, switch_prob
        self.label_smoothing = label_smoothing
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup is not None or self.cutmix is not None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = None
        if self.active and (self.prob >= 1.0 or torch.rand(()).item() < self.prob):
            if self.mixup is not None and self.cutmix is not None:
                use_cutmix = torch.rand(()).item() < self.switch_prob
            else:
                use_cutmix = self.cutmix is not None
            images, targets = (self.cutmix if use_cutmix else self.mixup)(images, labels)
        if targets is None:
            targets = F.one_hot(labels, self.num_classes).to(images.dtype if images.is_floating_point() else torch.float32)
        s = self.label_smoothing
        return images, targets * (1.0 - s) + s / self.num_classes


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (same shuffling, padding and rank partition, seeded by seed + epoch)
    that can start part-way through an epoch, so a run stopped mid-epoch resumes on the next
    sample it has not seen. Works without an initialised process group (num_replicas=1, rank=0)."""

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard of one rank: indices rank, rank + world, ... (no padding, no duplicates),
    so summing correct counts over ranks gives exact dataset accuracy."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accum_steps: int) -> int:
    """Optimizer steps per epoch (training batches are dropped when incomplete, as in the recipe)."""
    per_rank = math.ceil(num_samples / world_size)
    return (per_rank // batch_size) // accum_steps
