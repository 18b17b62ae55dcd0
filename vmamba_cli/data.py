"""Images in, tensors out: robust image reading, input discovery and the official eval transform."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 224 / 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


class ImageError(Exception):
    """An input that is not a usable image; ``str(err)`` is one line naming the file."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


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


def eval_transform(resolution: int = 224, crop_pct: float = DEFAULT_CROP_PCT):
    """Official evaluation preprocessing (spec §9): resize the short side to resolution/crop_pct
    (bicubic), center-crop ``resolution``, scale to [0, 1], ImageNet mean/std."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(resolution / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(resolution),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


@dataclass
class InputScan:
    """Image files found for a list of user inputs, and the inputs that matched nothing."""

    files: list[Path]
    errors: list[ImageError]


def find_images(inputs: Iterable[str | os.PathLike]) -> InputScan:
    """Expand files, folders (recursively, image extensions only) and glob patterns, keeping order."""
    files: list[Path] = []
    errors: list[ImageError] = []
    seen: set[Path] = set()

    def add(p: Path):
        if p not in seen:
            seen.add(p)
            files.append(p)

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append(ImageError(path, "folder contains no images"))
            for p in found:
                add(p)
        elif path.exists():
            add(path)  # explicit files are tried whatever their extension
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append(ImageError(text, "pattern matched no files"))
            for p in matches:
                add(p)
        else:
            errors.append(ImageError(path, "no such file"))
    return InputScan(files, errors)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order.

    Shipped as a text file (the list torchvision carries in its weight metadata) so that reading it
    does not pay for importing torchvision.models.
    """
    from importlib.resources import files

    return files("vmamba_cli").joinpath("imagenet_classes.txt").read_text(encoding="utf-8").splitlines()

