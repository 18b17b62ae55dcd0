"""The training configuration: one flat dataclass whose defaults are the official ImageNet recipe
(docs/design.md §9), TOML files that override it (tables only group keys), and ``key=value`` overrides.
The presets (configs/*.toml) are package data."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vmamba_cli.runtime import AMP_CHOICES, MAX_RESOLUTION, MIN_RESOLUTION

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published as tomli before it joined the standard library
    import tomli as tomllib

PRESETS = ("imagenet", "digits")
# The same floor as predict / eval: the tests and the digits quick start train at 16-32 pixels, where
# the last stages work on 1x1 maps.
MIN_IMAGE_SIZE = MIN_RESOLUTION


@dataclass
class TrainConfig:
    # -- model ------------------------------------------------------------------------------------
    model: str = "vmamba-tiny"                 # registered name (`vmamba models`)
    model_config: dict = field(default_factory=dict)  # VMambaConfig field overrides (dims, depths, ...)
    pretrained: str | None = None              # weights to start from (official .pth or ours)
    num_classes: int | None = None             # None: the number of classes in the data
    drop_path: float | None = None             # None: the model config's stochastic-depth rate
    scan_backend: str = "auto"
    # -- data -------------------------------------------------------------------------------------
    data: str = "digits"                       # "digits" or an image folder
    image_size: int = 224
    val_fraction: float = 0.2                  # held-out share when the data has no val/ split
    split_seed: int = 0
    subset: int = 0                            # use only the first N training samples (0: all)
    workers: int = 8
    # -- optimisation -----------------------------------------------------------------------------
    epochs: int = 300
    warmup_epochs: float = 20
    batch_size: int = 128                      # per process
    accum_steps: int = 1
    lr: float = 5e-4                           # base LR for a total batch of lr_scale_batch
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_scale_batch: int = 512                  # LRs scale by effective batch / this (0: no scaling)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0                     # max gradient norm (0: off)
    # -- regularisation / augmentation ------------------------------------------------------------
    label_smoothing: float = 0.1
    mixup: float = 0.8                         # Mixup alpha (0: off)
    cutmix: float = 1.0                        # CutMix alpha (0: off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    randaugment: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    randaugment_mstd: float = 0.5              # magnitude drawn from N(magnitude, mstd) per op (timm mstd)
    color_jitter: float = 0.4                  # only when randaugment is off (timm's rule), as officially
    random_erasing: float = 0.25
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    eval_crop_pct: float = 224 / 256
    ema: bool = True
    ema_decay: float = 0.9999
    # -- run --------------------------------------------------------------------------------------
    seed: int = 0                              # each process uses seed + rank
    amp: str = "auto"                          # vmamba_cli.runtime.resolve_amp: auto = bf16 on CUDA, none on CPU;
                                               # fp16 (the release runs) adds a GradScaler
    compile: bool = False
    device: str = "auto"
    threads: int = 0                           # CPU threads per process (0: PyTorch's default)
    output: str = "runs/train/{data}-{model}"

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return apply_overrides(cls(), values)


# Settings that may differ when a run is continued (they do not change what is learned, except
# `epochs`, which stretches the cosine schedule and is how a finished run is extended).
RESUME_CHANGEABLE = frozenset({"epochs", "device", "workers", "compile", "threads", "output", "scan_backend"})


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"config {name}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config {name}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"config {name}: expected an integer, got {value!r}") from None
        if number != int(number):
            raise ValueError(f"config {name}: expected an integer, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"config {name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {name}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"config {name}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config {name}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {name}: expected a table, got {value!r}")
        return dict(value)
    return value


def apply_overrides(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Return ``config`` with ``values`` applied (types checked; unknown keys are an error).
    ``model_config.<field>`` keys update the model_config table one field at a time."""
    hints = _field_types()
    changes: dict[str, Any] = {}
    model_config = dict(config.model_config)
    for key, value in values.items():
        key = key.replace("-", "_")
        if key.startswith("model_config."):
            model_config[key.split(".", 1)[1]] = value
            changes["model_config"] = model_config
            continue
        if key not in hints:
            import difflib

            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown training setting {key!r}{hint}")
        changes[key] = _coerce(key, value, hints[key])
        if key == "model_config":
            model_config = dict(changes[key])
    config = config.replace(**changes)
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
    checks = [
        (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
        (c.batch_size >= 1, f"batch_size must be >= 1, got {c.batch_size}"),
        (c.accum_steps >= 1, f"accum_steps must be >= 1, got {c.accum_steps}"),
        (MIN_IMAGE_SIZE <= c.image_size <= MAX_RESOLUTION,
         f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_RESOLUTION}, got {c.image_size}"),
        (c.subset >= 0, f"subset must be >= 0 (0: all images), got {c.subset}"),
        (c.threads >= 0, f"threads must be >= 0 (0: PyTorch's default), got {c.threads}"),
        (c.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {c.warmup_epochs}"),
        (c.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}, got {c.amp!r}"),
        (0 <= c.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {c.label_smoothing}"),
        (c.num_classes is None or c.num_classes >= 1, f"num_classes must be >= 1, got {c.num_classes}"),
        (c.workers >= 0, f"workers must be >= 0, got {c.workers}"),
        (0 < c.eval_crop_pct <= 1, f"eval_crop_pct must be in (0, 1], got {c.eval_crop_pct}"),
        (0 <= c.randaugment_magnitude <= 10, f"randaugment_magnitude must be in [0, 10], got {c.randaugment_magnitude}"),
        (c.randaugment_ops >= 1, f"randaugment_ops must be >= 1, got {c.randaugment_ops}"),
        (c.randaugment_mstd >= 0, f"randaugment_mstd must be >= 0, got {c.randaugment_mstd}"),
        (c.color_jitter >= 0, f"color_jitter must be >= 0, got {c.color_jitter}"),
        (0 <= c.random_erasing <= 1, f"random_erasing must be in [0, 1], got {c.random_erasing}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _flatten_toml(table: dict[str, Any], source: str) -> dict[str, Any]:
    """Tables only group keys ([optim] lr = ... is lr), except [model_config] which is a field."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key != "model_config":
            for sub_key, sub_value in _flatten_toml(value, source).items():
                if sub_key in flat:
                    raise ValueError(f"{source}: setting {sub_key!r} appears twice")
                flat[sub_key] = sub_value
        else:
            if key in flat:
                raise ValueError(f"{source}: setting {key!r} appears twice")
            flat[key] = value
    return flat


def preset_path(name: str) -> Path:
    return Path(str(resources.files("vmamba_cli") / "configs" / f"{name}.toml"))


def read_config_file(path_or_preset: str | Path) -> dict[str, Any]:
    """Settings of a TOML file, or of a packaged preset ("imagenet", "digits")."""
    text = str(path_or_preset)
    path = preset_path(text) if text in PRESETS else Path(text)
    if not path.exists():
        raise ValueError(f"{path}: no such config file (presets: {', '.join(PRESETS)})")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    return _flatten_toml(table, str(path))


def default_preset(data: str) -> str:
    return "digits" if data == "digits" else "imagenet"


def load_config(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults <- config file (or the preset that fits the data) <- overrides.

    When ``overrides`` names a ``model`` other than the file's, the file's ``model_config`` is
    dropped: a model flag selects a whole registered architecture."""
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    data = str(overrides.get("data", "digits"))
    settings = read_config_file(config if config is not None else default_preset(data))
    if "model" in overrides and overrides["model"] != settings.get("model"):
        settings.pop("model_config", None)
    resolved = apply_overrides(TrainConfig(), settings)
    return apply_overrides(resolved, overrides)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (numbers, true/false, [lists], "strings"); bare words are strings."""
    if "=" not in text:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2)
