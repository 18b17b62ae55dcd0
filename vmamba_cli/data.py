"""Images in, tensors out: robust image reading, the one image scanner and the official eval transform."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vmamba_cli.errors import ImageError
from vmamba_cli.model import (DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, Preprocess,  # noqa: F401
                              imagenet_class_names)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


def load_image(path: str | os.PathLike):
    """Open an image as 8-bit RGB PIL image, honouring EXIF orientation.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted.
    Raises ImageError for missing, unreadable, truncated or non-image files.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a directory")
    try:
        with Image.open(path) as im:
            im.load()  # force decoding now: truncated files fail here, not later in a worker
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(path, f"unreadable image ({reason})") from None


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), mode="L")
    elif im.mode == "F":
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        im = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255.0).astype("uint8"), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB") if im.mode != "RGB" else im.copy()


def eval_transform(preprocess: Preprocess | int | None = None, crop_pct: float | None = None, *,
                   resolution: int | None = None):
    """The official evaluation pipeline of ``preprocess`` (docs/design.md §10): resize the short side
    to ``input_size / crop_pct``, center-crop ``input_size``, scale to [0, 1], normalise.

    ``preprocess`` is a model's preset (``LoadedModel.preprocess``, ``ModelSpec.preprocess``), or an
    int input size over the default preset, or None for the default (224 from 256, bicubic, ImageNet
    mean/std). ``resolution`` / ``crop_pct`` override the preset's values when not None. Takes PIL
    images (resized by PIL, as the official pipeline does) and uint8 image tensors alike; with
    crop_pct 1 and an image already at the input size it only normalises.
    """
    import torch
    from torchvision.transforms import v2

    if preprocess is None:
        preprocess = Preprocess()
    elif not isinstance(preprocess, Preprocess):
        resolution = int(preprocess) if resolution is None else resolution
        preprocess = Preprocess()
    preprocess = preprocess.with_overrides(input_size=resolution, crop_pct=crop_pct)
    interpolation = v2.InterpolationMode(preprocess.interpolation)
    return v2.Compose([
        v2.Resize(preprocess.resize_size, interpolation=interpolation, antialias=True),
        v2.CenterCrop(preprocess.input_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(preprocess.mean), list(preprocess.std)),
    ])


@dataclass
class InputScan:
    """Image files found for a list of inputs, the inputs that matched nothing, and how many other
    (non-image) files the folder walks passed over."""

    files: list[Path]
    errors: list[ImageError]
    ignored: int = 0


def _walk_folder(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` by extension (recursive, symlinks followed once, hidden names
    skipped), in path order, and the number of other files."""
    found: list[Path] = []
    ignored = 0
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink back up the tree: walk each real folder once
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name))
            else:
                ignored += 1
    return sorted(found), ignored


def find_images(inputs: Iterable[str | os.PathLike]) -> InputScan:
    """The image scanner of predict, eval and train: files, folders and glob patterns -> image files.

    * a folder: its image files by extension (``IMAGE_EXTENSIONS``), recursively, hidden names
      skipped, sorted by path; "folder contains no images" when there is none;
    * an existing file: taken whatever its extension (the user named it);
    * a glob pattern (``**`` recursive): the files it matches, sorted; "pattern matched no files";
    * anything else: "no such file".
    Inputs keep their order, a file found twice is kept once. Problems are collected in ``errors``
    (``ImageError`` naming the input), never raised, so callers decide whether they are fatal.
    """
    files: list[Path] = []
    errors: list[ImageError] = []
    ignored = 0
    seen: set[Path] = set()

    def add(p: Path):
        if p not in seen:
            seen.add(p)
            files.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found, skipped = _walk_folder(path)
            ignored += skipped
            if not found:
                errors.append(ImageError(path, "folder contains no images"))
            for p in found:
                add(p)
        elif path.exists():
            add(path)
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append(ImageError(text, "pattern matched no files"))
            for p in matches:
                add(p)
        else:
            errors.append(ImageError(path, "no such file"))
    return InputScan(files, errors, ignored)


__all__ = ["DEFAULT_CROP_PCT", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageError", "InputScan",
           "Preprocess", "eval_transform", "find_images", "imagenet_class_names", "load_image"]
