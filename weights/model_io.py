"""Models with their weights: build-and-load in one call, and our self-describing safetensors format.

Our files carry, as safetensors metadata: ``model`` (registered name or "custom"), ``config``
(``VMambaConfig`` as JSON, so a fine-tuned model with another head rebuilds without flags),
``official_config`` (the official VSSM kwargs), ``preprocess`` (the ``Preprocess`` preset: input
size, crop ratio, interpolation, mean/std), ``class_names`` (JSON list) and free-form provenance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vmamba_cli.model import (DEFAULT_MODEL, MODELS, Preprocess, VMambaConfig, VSSM, imagenet_class_names,
                              resolve_model_name)
from vmamba_cli.model import create_model as _build_model

from .loading import (CheckpointError, check_regular_file, config_from_metadata, load_weights_into, read_metadata,
                      save_weights)
from .registry import model_for_file, resolve as _resolve_registry


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str                               # registered model name, or "custom"
    class_names: list[str] | None           # index -> label, when known
    source: str | None                      # weights file used (None: fresh official init)
    metadata: dict[str, Any] = field(default_factory=dict)
    # How images become inputs: recorded in our files, else the registered model's preset.
    preprocess: Preprocess = Preprocess()


def resolve_weights_path(weights: str | os.PathLike, model_name: str | None = None) -> Path:
    """Local path for a weights argument: an existing file, or a registry name / official file name /
    URL fetched into the cache (``registry.resolve``)."""
    path = Path(weights)
    if path.exists():
        return path
    resolved = _resolve_registry(str(weights), model_name)
    if resolved is not None:
        return Path(resolved)
    raise CheckpointError(weights, "no such file (and not a known weights name or URL)")


def _preset_of(name: str | None, metadata: dict[str, Any], path) -> Preprocess:
    """The preset recorded in ``metadata`` (``preprocess``; or ``image_size`` / ``eval_crop_pct`` as
    `vmamba train` checkpoints without a preset record them), else the registered model's, else the
    default."""
    try:
        if "preprocess" in metadata:
            return Preprocess.from_dict(metadata["preprocess"])
        if "image_size" in metadata:
            crop_pct = metadata.get("eval_crop_pct")
            return Preprocess().with_overrides(input_size=int(metadata["image_size"]),
                                               crop_pct=None if crop_pct is None else float(crop_pct))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"bad preprocess metadata ({' '.join(str(exc).split())})") from None
    spec = MODELS.get(name) if name else None
    return spec.preprocess if spec is not None else Preprocess()


def _is_ours(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    try:
        return "config" in read_metadata(path)
    except CheckpointError:
        return False


def load_model(model: str | None = None, weights: str | os.PathLike | None = None, *, ema: bool = False,
               num_classes: int | None = None, allow_non_finite: bool = False) -> LoadedModel:
    """Build a model and load weights strictly.

    * ``weights`` is one of our safetensors files: the architecture comes from its metadata
      (``model``, when given, is only a cross-check of the registered name).
    * ``weights`` is an official ``.pth`` (or a bare state dict): ``model`` (default vmamba-tiny)
      gives the architecture.
    * ``weights`` is None: the official random initialisation.
    ``num_classes`` replaces the head after loading (fine-tuning). ``preprocess`` of the result is
    the preset recorded in the file, else the registered model's. Weights holding NaN / Inf are
    refused unless ``allow_non_finite``.
    """
    name = resolve_model_name(model) if model else None
    metadata: dict[str, Any] = {}
    source = None
    if weights is None:
        net = _build_model(name or DEFAULT_MODEL)
        name = name or resolve_model_name(DEFAULT_MODEL)
    else:
        path = check_regular_file(resolve_weights_path(weights, name))
        source = str(path)
        if _is_ours(path):
            metadata = read_metadata(path)
            stored = metadata.get("model", "custom")
            if name and stored not in ("custom", name):
                raise CheckpointError(path, f"holds {stored} weights, not {name}")
            config = config_from_metadata(path, metadata)
            try:
                net = VSSM(VMambaConfig.from_dict(config))
            except (TypeError, ValueError, AttributeError) as exc:
                raise CheckpointError(path, f"bad model config in its metadata ({' '.join(str(exc).split())})") from None
            name = stored
        else:
            name = name or model_for_file(path.name) or resolve_model_name(DEFAULT_MODEL)
            net = _build_model(name)
        load_weights_into(net, path, ema=ema, what=name, allow_non_finite=allow_non_finite)
    class_names = metadata.get("class_names") if isinstance(metadata.get("class_names"), list) else None
    if class_names is None and net.config.num_classes == 1000:
        class_names = imagenet_class_names()
    preprocess = _preset_of(name, metadata, source)
    if num_classes is not None and num_classes != net.config.num_classes:
        net.reset_classifier(num_classes)
        class_names = None
    return LoadedModel(net, name, class_names, source, metadata, preprocess)


def create_model(name: str = DEFAULT_MODEL, *, weights: str | os.PathLike | None = None, ema: bool = False,
                 **overrides) -> VSSM:
    """``vmamba_cli.model.create_model`` plus ``weights``: a checkpoint (official ``.pth`` or our
    ``.safetensors``, local path, registry name or URL) loaded strictly into the built model."""
    model = _build_model(name, **overrides)
    if weights is not None:
        load_weights_into(model, resolve_weights_path(weights, resolve_model_name(name)), ema=ema)
    return model


def save_model(path: str | os.PathLike, model, *, name: str = "custom", class_names: list[str] | None = None,
               preprocess: Preprocess | None = None, extra: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (or an explicit ``state_dict`` of it, e.g. EMA weights) as our safetensors file.

    ``preprocess`` is the preset the model expects (e.g. the input size it was trained at); default:
    one ``extra`` describes (``image_size`` / ``eval_crop_pct``), else the registered model's for a
    registered ``name``, else the standard 224 preset.
    """
    if preprocess is None:
        preprocess = _preset_of(name, extra or {}, path)
    metadata: dict[str, Any] = {
        "model": name,
        "config": model.config.to_dict(),
        "official_config": model.config.to_official(),
        "preprocess": preprocess.to_dict(),
    }
    if class_names is not None:
        metadata["class_names"] = list(class_names)
    metadata.update(extra or {})
    return save_weights(path, state_dict if state_dict is not None else model.state_dict(), metadata)


def read_class_names(path) -> list[str] | None:
    """Class names stored in one of our files, or a text file with one name per line."""
    path = Path(path)
    if path.suffix == ".safetensors":
        names = read_metadata(path).get("class_names")
        return names if isinstance(names, list) else None
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"cannot read labels ({exc})") from None
    if path.suffix == ".json":
        try:
            return list(json.loads("\n".join(lines)))
        except ValueError as exc:
            raise CheckpointError(path, f"not a JSON list of labels ({exc})") from None
    return [line for line in lines if line]


__all__ = ["LoadedModel", "create_model", "load_model", "save_model", "read_class_names", "resolve_weights_path"]
