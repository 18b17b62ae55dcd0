"""Images in, tensors out: robust image reading, the one image scanner and the official eval transform."""

from __future__ import annotations

import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vmamba_cli.errors import ImageError
from vmamba_cli.model import (DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, Preprocess,  # noqa: F401
                              imagenet_class_names)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


# The default pixel limit is Pillow's own (PIL.Image.MAX_IMAGE_PIXELS = 2**30 // 4 // 3, about
# 9459 x 9459). Pillow refuses twice its limit outright at open, so a larger --max-pixels could not take
# effect: MAX_PIXELS_CEILING is that bound.
DEFAULT_MAX_PIXELS = 89_478_485
MAX_PIXELS_CEILING = 2 * DEFAULT_MAX_PIXELS

_FILE_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "not a regular file (named pipe)"),
               (stat.S_ISCHR, "not a regular file (character device)"),
               (stat.S_ISBLK, "not a regular file (block device)"), (stat.S_ISSOCK, "not a regular file (socket)"))


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an input file, from ``stat`` alone (nothing is opened), or None.

    FIFOs, devices and sockets are refused here: opening a FIFO blocks until a writer appears, and a
    device can stream forever. Symbolic links are followed; a dangling one is named as such.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "dangling symbolic link" if os.path.islink(path) else "no such file"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return f"cannot stat ({exc.strerror or type(exc).__name__})"
    return _mode_problem(mode)


def _mode_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for test, problem in _FILE_KINDS:
        if test(mode):
            return problem
    return "not a regular file"


def _open_regular(path: Path):
    """A binary file object for ``path``, refusing anything but a regular file without blocking.

    The path is checked with ``stat`` first; the open itself is non-blocking and the opened file is
    checked again, so a file swapped for a FIFO in between cannot hang the caller either.
    """
    problem = file_problem(path)
    if problem is not None:
        raise ImageError(path, problem)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageError(path, f"cannot open ({exc.strerror or type(exc).__name__})") from None
    info = os.fstat(fd)
    problem = _mode_problem(info.st_mode) or ("empty file" if info.st_size == 0 else None)
    if problem is not None:
        os.close(fd)
        raise ImageError(path, problem)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _too_large(path: Path, size: tuple[int, int] | None, pixels: int | None, limit: int) -> ImageError:
    shown = f"{size[0]}x{size[1]} ({size[0] * size[1]} pixels)" if size else f"{pixels or 'over'} pixels"
    return ImageError(path, f"image too large: {shown}, limit {limit} pixels; raise it with --max-pixels "
                            f"(at most {MAX_PIXELS_CEILING})")


def _header_size(fh) -> tuple[int, int] | None:
    """The size an image header claims, read by the format plugin without Pillow's pixel guard.

    Only used to word the error for an image that Pillow's guard refused at open."""
    from PIL import Image

    Image.init()
    fh.seek(0)
    prefix = fh.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            if accept and not accept(prefix):
                continue
            fh.seek(0)
            return tuple(factory(fh, "").size)
        except Exception:  # a plugin that does not recognise the file, or checks the size itself
            continue
    return None


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open an image as 8-bit RGB PIL image, honouring EXIF orientation.

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted.
    Raises ImageError, naming the file, for anything that is not a usable image: missing, a
    directory, FIFO, device or socket (refused by ``stat`` before any open), unreadable, truncated,
    not an image, or an image whose header claims more than ``max_pixels`` pixels (checked from the
    header, before decoding; decompression bombs). Every decoder exception becomes an ImageError.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    limit = min(int(max_pixels), MAX_PIXELS_CEILING)
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    with _open_regular(path) as fh:
        try:
            with Image.open(fh) as im:  # lazy: reads the header only
                width, height = im.size
                if width * height > limit:
                    raise _too_large(path, im.size, None, limit)
                im.load()  # force decoding now: truncated files fail here, not later in a worker
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
        except ImageError:
            raise
        except bomb as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(path, _header_size(fh), int(pixels.group(1)) if pixels else None, limit) from None
        except UnidentifiedImageError:
            raise ImageError(path, "not an image (unrecognised format)") from None
        except MemoryError:
            raise ImageError(path, "unreadable image (out of memory while decoding)") from None
        except Exception as exc:  # OSError, SyntaxError, ValueError, struct.error ... from a damaged file
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


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _leads_back(real: str, root_real: str) -> bool:
    """True when folder ``real`` is ``root_real`` or one of its ancestors: walking it loops."""
    return root_real == real or root_real.startswith(real.rstrip(os.sep) + os.sep)


def _walk_folder(folder: Path) -> tuple[list[Path], int]:
    """Image files under ``folder`` by extension (recursive, hidden names skipped), in path order, and
    the number of other files. A symlinked folder is followed once: one leading back to ``folder`` or
    above it (a loop) is skipped, and each real folder is walked once."""
    found: list[Path] = []
    ignored = 0
    root_real = _real(folder)
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = _real(dirpath)
        if real in visited or (visited and _leads_back(real, root_real)):
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


def class_subfolders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders of ``root`` (its sub-folders, hidden names skipped). A
    symlinked folder leading back to ``root`` or above is left out: it would hold every class again."""
    root_real = _real(root)
    names = []
    for entry in os.scandir(root):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink() and _leads_back(_real(entry.path), root_real):
            continue
        names.append(entry.name)
    return sorted(names)


def find_images(inputs: Iterable[str | os.PathLike]) -> InputScan:
    """The image scanner of predict, eval and train: files, folders and glob patterns -> image files.

    * a folder: its image files by extension (``IMAGE_EXTENSIONS``), recursively, hidden names
      skipped, sorted by path; "folder contains no images" when there is none;
    * an existing file: taken whatever its extension (the user named it);
    * a glob pattern (``**`` recursive): the files it matches, sorted; "pattern matched no files";
    * anything else: "no such file".
    Inputs keep their order; a file found twice (also through a symbolic link) is kept once; a folder
    symlink is followed at most once. Problems are collected in ``errors`` (``ImageError`` naming the
    input), never raised, so callers decide whether they are fatal. Nothing is opened: FIFOs, devices
    and the like are listed and refused by ``load_image`` when read.
    """
    files: list[Path] = []
    errors: list[ImageError] = []
    ignored = 0
    seen: set[str] = set()

    def add(p: Path):
        key = _real(p)
        if key not in seen:
            seen.add(key)
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
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if not Path(m).is_dir())
            if not matches:
                errors.append(ImageError(text, "pattern matched no files"))
            for p in matches:
                add(p)
        else:
            errors.append(ImageError(path, file_problem(path) or "no such file"))
    return InputScan(files, errors, ignored)


__all__ = ["DEFAULT_CROP_PCT", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD",
           "MAX_PIXELS_CEILING", "ImageError", "InputScan", "Preprocess", "class_subfolders", "eval_transform",
           "file_problem", "find_images", "imagenet_class_names", "load_image"]
