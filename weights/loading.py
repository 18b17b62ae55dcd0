"""Reading and writing VMamba weights without trusting pickles.

* Official ``.pth`` files (a ``torch.save`` dict with ``model`` / ``model_ema`` entries and a pickled
  yacs ``config``) are read with PyTorch's restricted ``weights_only`` unpickler. The one foreign
  class the official files carry, ``yacs.config.CfgNode`` (a dict subclass), is rebuilt as a plain
  ``OrderedDict``; any other class in the pickle makes loading fail instead of running code.
* Our own files are safetensors with JSON metadata (model name, config, class names, provenance).

Every failure is a ``CheckpointError`` whose message is one line naming the file.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from vmamba_cli.errors import CheckpointError

FORMAT_TAG = "vmamba"

# Legacy (January 2024) module names used by the v0 release checkpoints -> current names (spec §1.4).
_LEGACY_PREFIXES = (
    ("patch_embed.proj.", "patch_embed.0."),
    ("patch_embed.norm.", "patch_embed.2."),
    ("norm.", "classifier.norm."),
    ("head.", "classifier.head."),
)
_LEGACY_BLOCK_PARTS = ((".ln_1.", ".norm."), (".self_attention.", ".op."))




def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers/data
        raise CheckpointError(path, f"not a readable safetensors file ({_one_line(exc)})") from None
    return tensors, metadata


def _read_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([(collections.OrderedDict, "yacs.config.CfgNode")]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        # torch words it "Unsupported global: GLOBAL x.y" or, for blocked modules such as os/posix,
        # "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", message)
        if found:
            name = found.group(1)
            raise CheckpointError(path, f"refusing to unpickle {name} (only tensors and plain containers "
                                        "are loaded from .pth files)") from None
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({_one_line(message, 120)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, AttributeError) as exc:
        raise CheckpointError(path, f"not a readable PyTorch checkpoint, truncated or corrupt "
                                    f"({type(exc).__name__}: {_one_line(exc, 120)})") from None


def _pick_state_dict(path: Path, obj: Any, ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if ema:
        if "model_ema" not in obj:
            raise CheckpointError(path, f"has no 'model_ema' entry (entries: {', '.join(map(str, obj))})")
        entry = obj["model_ema"]
    else:
        entry = next((obj[k] for k in ("model", "model_ema", "state_dict") if k in obj), obj)
    if not isinstance(entry, Mapping):
        raise CheckpointError(path, "the weights entry is not a state dict")
    tensors = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "contains no tensors")
    return tensors


def read_state_dict(path: str | os.PathLike, *, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a weights file (official ``.pth`` or our ``.safetensors``).

    For ``.pth`` files the ``model`` entry is used (else ``model_ema``, else ``state_dict``, else the
    dict itself); ``ema=True`` demands ``model_ema``. Keys are returned as stored (see
    ``checkpoint_filter_fn`` for the mapping to our names).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a weights file")
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        if ema:
            ema_keys = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
            if not ema_keys:
                raise CheckpointError(path, "has no EMA weights")
            tensors = ema_keys
        return tensors, metadata
    if kind in ("torch-zip", "torch-legacy"):
        return _pick_state_dict(path, _read_torch(path), ema), {}
    if path.suffix == ".safetensors":
        return _read_safetensors(path)  # raises the precise safetensors error
    raise CheckpointError(path, "not a checkpoint (neither a PyTorch .pth nor a safetensors file)")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map foreign key names to ours: DDP ``module.`` prefixes, ``state_dict.`` prefixes of exported
    fixtures, the legacy v0 names of spec §1.4, and EMA weights stored under ``ema.`` are dropped."""
    if any(k.startswith("state_dict.") for k in state_dict):
        state_dict = {k[len("state_dict."):]: v for k, v in state_dict.items() if k.startswith("state_dict.")}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("ema."):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.startswith("layers.") and ".blocks." in key:
            for old, new in _LEGACY_BLOCK_PARTS:
                key = key.replace(old, new, 1)
        out[key] = value
    return out


def _summarise(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path, what: str = "the model"):
    """Raise a one-line CheckpointError unless keys and shapes match ``model`` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    conflicts = [f"{k} {list(state_dict[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or conflicts:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
        if conflicts:
            parts.append(f"{len(conflicts)} shape conflicts, file vs model ({_summarise(conflicts, 2)})")
        raise CheckpointError(path, f"does not fit {what}: " + "; ".join(parts))


def load_weights_into(model: torch.nn.Module, path, *, ema: bool = False, what: str | None = None) -> dict[str, str]:
    """Read ``path``, map its keys, check them against ``model`` and load strictly. Returns metadata."""
    tensors, metadata = read_state_dict(path, ema=ema)
    state_dict = checkpoint_filter_fn(tensors)
    check_state_dict(model, state_dict, path, what or _describe(model))
    model.load_state_dict(state_dict, strict=True)
    return metadata


def _describe(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    return f"{type(model).__name__}(dims={list(cfg.dims)}, depths={list(cfg.depths)}, classes={cfg.num_classes})"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_weights(path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write tensors as safetensors (atomically). Non-string metadata values are stored as JSON."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT_TAG}
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path) -> dict[str, Any]:
    """Metadata of one of our safetensors files, JSON values decoded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({_one_line(exc)})") from None
    return {k: _maybe_json(v) for k, v in raw.items()}


def _maybe_json(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value
