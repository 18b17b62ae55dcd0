"""Official ``.pth`` checkpoint -> our self-describing safetensors file (no pickle, config included)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vmamba_cli.errors import InputError
from vmamba_cli.model import get_model_spec, resolve_model_name
from vmamba_cli.version import __version__

from .download import sha256_of
from .model_io import load_model, resolve_weights_path, save_model
from .registry import model_for_file


@dataclass
class ConversionResult:
    source: str
    destination: str
    model: str
    entry: str             # "model" or "model_ema"
    tensors: int
    size_bytes: int
    source_sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def convert_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, *, model: str | None = None,
                       ema: bool = False, allow_non_finite: bool = False) -> ConversionResult:
    """Convert ``source`` (an official ``.pth``, a registry name or URL) to our safetensors ``destination``.

    The model comes from ``model`` or, for the nine official file names, from the file name. The
    weights are loaded strictly into that model first, so a file that does not fit is refused.
    Metadata: model name, config, official config, class names, source file name and SHA-256, the
    entry used and, for an official file, the reported top-1.
    """
    destination = Path(destination)
    if destination.suffix != ".safetensors":
        raise InputError(f"{destination}: the converted file must end in .safetensors")
    source_path = resolve_weights_path(source, resolve_model_name(model) if model else None)
    if source_path.resolve() == destination.resolve():
        raise InputError(f"{destination}: source and destination are the same file")
    official_name = model_for_file(source_path.name)
    name = resolve_model_name(model) if model else official_name
    if name is None:
        raise InputError(f"{source_path}: cannot tell which model this file holds from its name; "
                         "pass --model NAME (`vmamba models` lists them)")
    loaded = load_model(name, source_path, ema=ema, allow_non_finite=allow_non_finite)
    extra = {
        "source_file": source_path.name,
        "source_sha256": sha256_of(source_path),
        "source_entry": "model_ema" if ema else "model",
        "converted_by": f"vmamba {__version__}",
    }
    if official_name == name:
        extra["top1"] = get_model_spec(name).top1
    save_model(destination, loaded.model, name=name, class_names=loaded.class_names,
               preprocess=loaded.preprocess, extra=extra)
    return ConversionResult(str(source_path), str(destination), name, extra["source_entry"],
                            len(loaded.model.state_dict()), destination.stat().st_size, extra["source_sha256"])
