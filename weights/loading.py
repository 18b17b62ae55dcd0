"""Reading and writing VMamba weights without trusting pickles.

* Official ``.pth`` files (a ``torch.save`` dict with ``model`` / ``model_ema`` entries and a pickled
  yacs ``config``) are read with PyTorch's restricted ``weights_only`` unpickler. The one foreign
  class the official files carry, ``yacs.config.CfgNode`` (a dict subclass), is rebuilt as a plain
  ``OrderedDict``; any other class in the pickle makes loading fail instead of running code.
* Our own files are safetensors with JSON metadata (model name, config, class names, provenance).

Every failure is a ``CheckpointError`` whose message is one line naming the file: a path that is not
a regular file is refused before it is opened (a FIFO would block the reader forever), any exception a
reader raises on a damaged file is wrapped, the ``config`` metadata of our files is checked
(``validate_config``) before a model is built from it, and tensors holding NaN / Inf are refused unless
the caller allows them.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from vmamba_cli.errors import CheckpointError

FORMAT_TAG = "vmamba"

# Legacy (January 2024) module names used by the v0 release checkpoints -> current names (docs/design.md §2.4).
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

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_regular_file(path) -> Path:
    """``path`` as a Path if it names a readable regular file (symlinks followed), else a CheckpointError.

    Only ``stat`` is used, so a FIFO or device is refused without being opened.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        kind = "a dangling symbolic link" if os.path.islink(path) else None
        raise CheckpointError(path, f"no such file{f' ({kind})' if kind else ''}") from None
    except OSError as exc:  # permission denied on a parent folder, name too long, symlink loop
        raise CheckpointError(path, f"cannot read it ({_os_reason(exc)})") from None
    if not stat.S_ISREG(mode):
        kind = next((text for test, text in _FILE_KINDS if test(mode)), "a special file")
        raise CheckpointError(path, f"is {kind}, not a weights file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(path, "cannot read it (permission denied)")
    return path


def _os_reason(exc: OSError) -> str:
    return _one_line(exc.strerror or exc, 120)


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read it ({_os_reason(exc)})") from None
    # The safetensors signature comes first: its 8-byte little-endian header length may begin with
    # any byte, 0x80 included, and only the JSON header behind it tells the format apart.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return "torch-legacy"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, MemoryError: all say "this file is damaged"
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
    except Exception as exc:
        # A damaged archive or pickle surfaces as almost anything (BadZipFile, EOFError, IndexError,
        # RuntimeError, struct.error, MemoryError, ...): each one means the file cannot be used.
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
    path = check_regular_file(path)
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


def find_non_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity, in ``state_dict`` order."""
    return [k for k, v in state_dict.items()
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def check_finite(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Raise a one-line CheckpointError when any tensor holds NaN / Inf (counted, first one named)."""
    bad = find_non_finite(state_dict)
    if bad:
        count = f"{len(bad)} tensor{'s' if len(bad) > 1 else ''} hold{'' if len(bad) > 1 else 's'}"
        raise CheckpointError(path, f"{count} NaN/Inf, first: {bad[0]}; pass allow_non_finite=True / "
                                    "--allow-non-finite to load anyway")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map foreign key names to ours: DDP ``module.`` prefixes, ``state_dict.`` prefixes of exported
    fixtures, the legacy v0 names of docs/design.md §2.4, and EMA weights stored under ``ema.`` are dropped."""
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


def load_weights_into(model: torch.nn.Module, path, *, ema: bool = False, what: str | None = None,
                      allow_non_finite: bool = False) -> dict[str, str]:
    """Read ``path``, map its keys, check them against ``model`` and load strictly. Returns metadata.

    Tensors holding NaN / Inf are refused unless ``allow_non_finite``.
    """
    tensors, metadata = read_state_dict(path, ema=ema)
    state_dict = checkpoint_filter_fn(tensors)
    check_state_dict(model, state_dict, path, what or _describe(model))
    if not allow_non_finite:
        check_finite({k: state_dict[k] for k in model.state_dict()}, path)  # named in model order
    model.load_state_dict(state_dict, strict=True)
    return metadata


def _describe(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return type(model).__name__
    return f"{type(model).__name__}(dims={list(cfg.dims)}, depths={list(cfg.depths)}, classes={cfg.num_classes})"


# ------------------------------------------------------------------------------------------------
# The model config stored in our files
# ------------------------------------------------------------------------------------------------

# Largest model built from a file's metadata. The biggest released VMamba (base) has about 89 M
# parameters; 1e9 float32 parameters take 4 GB before a single weight is read.
MAX_PARAMETERS = 1_000_000_000

# Bounds well beyond every published configuration (docs/design.md §2.1) that keep the parameter
# arithmetic below small and refuse nonsense before it reaches a constructor.
_INT_FIELDS = {  # name: (smallest, largest)
    "num_classes": (0, 1_000_000), "in_chans": (1, 64), "patch_size": (1, 64), "d_state": (1, 1024),
    "ssm_conv": (0, 31),
}
_FLOAT_FIELDS = {  # name: (smallest, largest)
    "ssm_ratio": (1e-3, 64.0), "mlp_ratio": (0.0, 64.0),
    "drop_path_rate": (0.0, 1.0), "ssm_drop_rate": (0.0, 1.0), "mlp_drop_rate": (0.0, 1.0),
}
_BOOL_FIELDS = ("ssm_conv_bias", "gated", "channels_first")
_CHOICE_FIELDS = {"stem": ("v1", "v2"), "downsample": ("v1", "v2", "v3")}
_MAX_STAGES, _MAX_DIM, _MAX_DEPTH, _MAX_DT_RANK = 16, 65536, 1024, 65536
CONFIG_FIELDS = frozenset(("dims", "depths", "dt_rank", *_INT_FIELDS, *_FLOAT_FIELDS, *_BOOL_FIELDS,
                           *_CHOICE_FIELDS))


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(path, config: Any, *, max_parameters: int = MAX_PARAMETERS) -> dict[str, Any]:
    """Check the ``config`` metadata of one of our files before a model is built from it.

    ``config`` is the decoded JSON (a string that did not parse arrives as a string). It must be an
    object whose keys are ``VMambaConfig`` fields with values of the right type and range (missing
    keys keep their defaults), and the model it describes must have at most ``max_parameters``
    parameters. Returns a copy with ``dims`` / ``depths`` as tuples, ready for
    ``VMambaConfig.from_dict``; anything else is a one-line CheckpointError.
    """
    def bad(problem: str):
        return CheckpointError(path, f"invalid 'config' metadata: {problem}")

    if not isinstance(config, dict):
        raise bad(f"expected a JSON object, got {_json_kind(config)}")
    unknown = sorted(str(k) for k in config if k not in CONFIG_FIELDS)
    if unknown:
        raise bad(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))}")
    out = dict(config)
    for key in ("dims", "depths"):
        if key not in config:
            continue
        value, largest = config[key], _MAX_DIM if key == "dims" else _MAX_DEPTH
        smallest = 1 if key == "dims" else 0
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= _MAX_STAGES:
            raise bad(f"{key} must be a list of 1 to {_MAX_STAGES} integers, got {_one_line(repr(value), 60)}")
        if not all(_is_int(v) and smallest <= v <= largest for v in value):
            raise bad(f"{key} must hold integers from {smallest} to {largest}, got {_one_line(repr(value), 60)}")
        out[key] = tuple(value)
    for key, (smallest, largest) in _INT_FIELDS.items():
        if key in config and not (_is_int(config[key]) and smallest <= config[key] <= largest):
            raise bad(f"{key} must be an integer from {smallest} to {largest}, got {_one_line(repr(config[key]), 60)}")
    for key, (smallest, largest) in _FLOAT_FIELDS.items():
        value = config.get(key, smallest)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and smallest <= value <= largest):
            raise bad(f"{key} must be a number from {smallest:g} to {largest:g}, got {_one_line(repr(value), 60)}")
    for key in _BOOL_FIELDS:
        if key in config and not isinstance(config[key], bool):
            raise bad(f"{key} must be true or false, got {_one_line(repr(config[key]), 60)}")
    for key, choices in _CHOICE_FIELDS.items():
        if key in config and config[key] not in choices:
            raise bad(f"{key} must be one of {', '.join(choices)}, got {_one_line(repr(config[key]), 60)}")
    rank = config.get("dt_rank", "auto")
    if rank != "auto" and not (_is_int(rank) and 1 <= rank <= _MAX_DT_RANK):
        raise bad(f"dt_rank must be \"auto\" or an integer from 1 to {_MAX_DT_RANK}, got {_one_line(repr(rank), 60)}")
    full = {**_CONFIG_DEFAULTS, **out}
    if len(full["dims"]) != len(full["depths"]):
        raise bad(f"dims {list(full['dims'])} and depths {list(full['depths'])} differ in length")
    if full["stem"] == "v2" and (full["patch_size"] < 2 or full["dims"][0] < 2):
        raise bad("the v2 stem needs patch_size >= 2 and dims[0] >= 2")
    if any(int(full["ssm_ratio"] * d) < 1 for d in full["dims"]):
        raise bad(f"ssm_ratio {full['ssm_ratio']:g} leaves a stage without scan channels")
    count = count_parameters(full)
    if count > max_parameters:
        raise bad(f"describes a model of {count:,} parameters, more than the limit of {max_parameters:,}")
    return out


# VMambaConfig's defaults (vmamba_cli/model.py), for the fields a stored config leaves out; a test
# keeps the two in step.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "dims": (96, 192, 384, 768), "depths": (2, 2, 8, 2), "num_classes": 1000, "in_chans": 3, "patch_size": 4,
    "d_state": 1, "ssm_ratio": 1.0, "dt_rank": "auto", "ssm_conv": 3, "ssm_conv_bias": False, "gated": False,
    "mlp_ratio": 4.0, "drop_path_rate": 0.2, "ssm_drop_rate": 0.0, "mlp_drop_rate": 0.0,
    "channels_first": True, "stem": "v2", "downsample": "v3",
}


def count_parameters(config: Mapping[str, Any]) -> int:
    """Parameter count of ``VSSM`` for a config given as a ``VMambaConfig.to_dict()``-style mapping,
    computed from the layer shapes (docs/design.md §2.5) without building anything."""
    c = {**_CONFIG_DEFAULTS, **config}
    dims, depths, k = list(c["dims"]), list(c["depths"]), c["ssm_conv"]
    c0 = dims[0]
    if c["stem"] == "v1":
        total = c["in_chans"] * c0 * c["patch_size"] ** 2 + c0 + 2 * c0
    else:
        half = c0 // 2
        total = c["in_chans"] * half * 9 + half + 2 * half + half * c0 * 9 + c0 + 2 * c0
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        inner = int(c["ssm_ratio"] * dim)
        rank = math.ceil(dim / 16) if c["dt_rank"] == "auto" else int(c["dt_rank"])
        n = c["d_state"]
        scan = (4 * (rank + 2 * n) * inner + 4 * inner * n + 4 * inner + 4 * inner * rank + 4 * inner
                + dim * inner * (2 if c["gated"] else 1) + 2 * inner + inner * dim)
        if k > 1:
            scan += inner * k * k + (inner if c["ssm_conv_bias"] else 0)
        block = 2 * dim + scan
        hidden = int(dim * c["mlp_ratio"])
        if c["mlp_ratio"] > 0:
            block += 2 * dim + 2 * dim * hidden + hidden + dim
        total += depth * block
        if i + 1 < len(dims):
            out = dims[i + 1]
            if c["downsample"] == "v1":
                total += 4 * dim * out + 8 * dim
            else:
                total += dim * out * (9 if c["downsample"] == "v3" else 4) + out + 2 * out
    last = dims[-1]
    total += 2 * last
    if c["num_classes"] > 0:
        total += last * c["num_classes"] + c["num_classes"]
    return total


def stored_values(path) -> int:
    """Number of values (tensor elements) held in a safetensors file, from its header alone; EMA
    copies under ``ema.`` are not counted."""
    from safetensors import safe_open

    path = check_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("ema."))
    except Exception as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({_one_line(exc)})") from None


def config_from_metadata(path, metadata: Mapping[str, Any], *, max_parameters: int = MAX_PARAMETERS) -> dict[str, Any]:
    """The validated ``config`` of one of our files (see ``validate_config``), checked also against the
    tensors the file holds, so that a small file cannot make a huge model be allocated."""
    config = validate_config(path, metadata.get("config"), max_parameters=max_parameters)
    expected, held = count_parameters(config), stored_values(path)
    if expected > held:
        raise CheckpointError(path, f"invalid 'config' metadata: describes a model of {expected:,} parameters "
                                    f"but the file holds {held:,} values")
    return config


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

    path = check_regular_file(path)
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
