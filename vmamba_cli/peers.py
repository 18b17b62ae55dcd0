"""torchvision models put beside VMamba (``vmamba profile --compare``, ``vmamba erf --compare``).

A peer is written ``name`` (random init) or ``name:TAG`` (torchvision's released weights, e.g.
``resnet50:IMAGENET1K_V2`` or ``convnext_tiny:DEFAULT``). Released weights are read through
torchvision's own weights API and cache: ``<torch.hub.get_dir()>/checkpoints/<basename of
weights.url>`` (``TORCH_HOME`` moves it). The cache is looked at before anything is built, and a
missing file is a :class:`PeerWeightsMissing` error naming the file and the folder to put it in;
torchvision is only asked to download it when the caller says so (``download=True``), so an
offline machine answers at once instead of waiting on the network.

Vision Transformers have a fixed grid of position embeddings. They are built for the input size
asked for (``image_size``); released weights made for another size get their position embeddings
resized by torchvision's ``interpolate_embeddings`` (bicubic over the patch grid, class token
kept), the way torchvision adapts a ViT to a new resolution.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn as nn

from vmamba_cli.errors import VMambaError

__all__ = [
    "PeerWeightsMissing", "parse_peer", "peer_label", "peer_weights", "weights_file", "check_weights",
    "build_peer", "is_vit", "vit_patch_size", "load_vit_state_dict",
]


class PeerWeightsMissing(VMambaError, ValueError):
    """A released torchvision checkpoint is not in the local cache (one-line message)."""


def parse_peer(text: str) -> tuple[str, str | None]:
    """``"resnet50:IMAGENET1K_V2"`` -> ``("resnet50", "IMAGENET1K_V2")``; ``"swin_t"`` -> ``("swin_t", None)``."""
    name, _, tag = text.strip().partition(":")
    if not name:
        raise ValueError(f"empty model name in {text!r}")
    return name, (tag.strip() or None)


def is_vit(name: str) -> bool:
    return name.lower().startswith("vit_")


def _weights_enum(name: str):
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise ValueError(f"unknown torchvision model {name!r}") from None


def peer_weights(name: str, tag: str):
    """torchvision's weights entry ``tag`` of model ``name`` (``DEFAULT`` resolves to the current one)."""
    enum = _weights_enum(name)
    try:
        return enum[tag]
    except KeyError:
        raise ValueError(f"{name} has no torchvision weights {tag!r}; choose from "
                         f"{', '.join(enum.__members__)}") from None


def peer_label(name: str, tag: str | None) -> str:
    """The resolved tag for titles (``DEFAULT`` shown as the entry it stands for), or "random init".
    Unknown names and tags are a ValueError here, before anything is built."""
    import torchvision.models as tvm

    try:
        tvm.get_model_builder(name)
    except ValueError:
        raise ValueError(f"unknown torchvision model {name!r}") from None
    return "random init" if tag is None else peer_weights(name, tag).name


def weights_file(weights) -> Path:
    """Where torchvision's cache keeps this weights entry: hub dir / checkpoints / basename of the URL."""
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def check_weights(name: str, tag: str | None, *, download: bool = False) -> Path | None:
    """The cached checkpoint of ``name:tag`` (None for random init). When it is not cached:
    PeerWeightsMissing, or with ``download`` torchvision's URL is fetched into the cache first
    (torch.hub's downloader: temporary file, hash prefix checked, then moved into place)."""
    if tag is None:
        return None
    weights = peer_weights(name, tag)
    path = weights_file(weights)
    if path.is_file():
        return path
    if not download:
        raise PeerWeightsMissing(
            f"{path.name}: torchvision weights {type(weights).__name__}.{weights.name} for {name} are not in "
            f"the cache; put the file (from {weights.url}) in {path.parent}, or pass --download")
    match = torch.hub.HASH_REGEX.search(path.name)
    with _cache_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), match.group(1) if match else None, progress=True)
    return path


@contextlib.contextmanager
def _cache_errors(path: Path):
    """Download or read failures as one line naming the file; torch.hub prints its download notice
    on stdout, which is moved to stderr so a JSON document on stdout stays valid."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except PeerWeightsMissing:
        raise
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PeerWeightsMissing(f"{path}: could not fetch or read the torchvision checkpoint ({first})") from None


def vit_patch_size(model_or_name) -> int:
    if isinstance(model_or_name, nn.Module):
        return int(model_or_name.patch_size)
    return int(model_or_name.lower().split("_")[-1])  # vit_b_16 -> 16 (torchvision's naming)


def load_vit_state_dict(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load a torchvision ViT state dict into ``model``, whose input size may differ from the one the
    state dict was made for: the position embeddings are resized with torchvision's
    ``interpolate_embeddings`` (a no-op when the grids already agree)."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    state_dict = interpolate_embeddings(model.image_size, model.patch_size, dict(state_dict))
    model.load_state_dict(state_dict)
    return model


def build_peer(name: str, tag: str | None = None, *, image_size: int | None = None,
               download: bool = False) -> nn.Module:
    """A torchvision classifier: random init, or the released weights ``tag`` from torchvision's cache.

    ``image_size`` is used by ViTs only (their position grid); other families run any size as built.
    """
    import torchvision.models as tvm

    vit_kwargs = {"image_size": image_size} if (image_size is not None and is_vit(name)) else {}
    if vit_kwargs and image_size % vit_patch_size(name):
        raise ValueError(f"{name} needs an input size divisible by its patch size {vit_patch_size(name)}, "
                         f"got {image_size}")
    if tag is None:
        try:
            return tvm.get_model(name, weights=None, **vit_kwargs)
        except ValueError as exc:
            if "Unknown model" in str(exc):
                raise ValueError(f"unknown torchvision model {name!r}") from None
            raise
    path = check_weights(name, tag, download=download)
    weights = peer_weights(name, tag)
    native = weights.meta.get("min_size", (None,))[0]
    with _cache_errors(path):
        if vit_kwargs and image_size != native:
            model = tvm.get_model(name, weights=None, num_classes=len(weights.meta["categories"]), **vit_kwargs)
            return load_vit_state_dict(model, weights.get_state_dict(progress=False, check_hash=True))
        return tvm.get_model(name, weights=weights)
