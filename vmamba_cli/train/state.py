"""What a run needs to continue exactly: its position, the RNG states of every rank, and the state file.

The state file (``last.state.safetensors``) holds the tensors of the model, EMA, optimizer and scaler
in safetensors and everything else as JSON metadata, so nothing is ever unpickled. It is written to a
temporary name and renamed, like every file of a run.
"""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vmamba_cli.errors import ResumeError
from vmamba_cli.train.config import RESUME_CHANGEABLE, TrainConfig, apply_overrides

STATE_FILE = "last.state.safetensors"
STATE_FORMAT = "vmamba-train-state"
# What resuming reads from a state file (RunCheckpoints._save_state writes these and more).
STATE_KEYS = ("config", "arch", "position", "best", "accumulators", "model", "optimizer", "schedule", "rng")


# -- position in the run -------------------------------------------------------------------------

@dataclass
class EpochTotals:
    """Sums over the optimizer steps of the epoch in progress (this rank's share)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    train_time: float = 0.0


@dataclass
class RunProgress:
    """Where the run stands; saved in the state file and restored on resume."""

    epoch: int = 0                 # epochs completed
    batches_done: int = 0          # micro-batches of the current epoch already trained
    global_step: int = 0           # optimizer steps since the start
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": 0})
    best_ema: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": 0})  # by the EMA's top-1
    totals: EpochTotals = field(default_factory=EpochTotals)

    def to_state(self, world_size: int) -> dict[str, Any]:
        return {"position": {"epoch": self.epoch, "batches_done": self.batches_done,
                             "global_step": self.global_step, "world_size": world_size},
                "best": dict(self.best), "best_ema": dict(self.best_ema), "accumulators": asdict(self.totals)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RunProgress":
        pos = state["position"]
        best_ema = dict(state.get("best_ema") or {"top1": -1.0, "epoch": 0})  # absent in older state files
        return cls(int(pos["epoch"]), int(pos["batches_done"]), int(pos["global_step"]), dict(state["best"]),
                   best_ema, EpochTotals(**state["accumulators"]))


# -- RNG states (JSON-serialisable, so they travel in the state file's metadata) -------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the state file --------------------------------------------------------------------------------

def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key} and collect it."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join_tensors(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def write_state(path: Path, parts: dict[str, Any]) -> Path:
    """Write nested dicts of tensors and plain values to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    from vmamba_cli.weights import atomic_write

    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _split_tensors(value, name, tensors) for name, value in parts.items()}
    metadata = {"format": STATE_FORMAT, "state": json.dumps(skeleton)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise ResumeError(f"{path}: not a readable training state ({' '.join(str(exc).split())[:160]})") from None
    if metadata.get("format") != STATE_FORMAT or "state" not in metadata:
        raise ResumeError(f"{path}: not a vmamba training state file")
    try:
        skeleton = json.loads(metadata["state"])
    except ValueError as exc:
        raise ResumeError(f"{path}: corrupt JSON in training state: {exc}") from None
    missing = [k for k in STATE_KEYS if not isinstance(skeleton, dict) or k not in skeleton]
    if missing:
        raise ResumeError(f"{path}: incomplete training state (no {', '.join(missing)})")
    try:
        return {name: _join_tensors(value, tensors) for name, value in skeleton.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{path}: inconsistent training state ({type(exc).__name__}: {exc})") from None


def find_state(path: str | os.PathLike) -> Path:
    """The state file for ``--resume PATH`` (a run folder or the state file itself)."""
    path = Path(path)
    candidate = path / STATE_FILE if path.is_dir() else path
    if not candidate.exists():
        where = f"{path} holds no {STATE_FILE}" if path.is_dir() else f"{path}: no such file or run folder"
        raise ResumeError(f"{where}; nothing to resume")
    return candidate


# Settings added after a state file may have been written, with the value that means what the run
# did then (no colour jitter, no magnitude noise), not today's default.
_ABSENT_MEANS = {"color_jitter": 0.0, "randaugment_mstd": 0.0}


def saved_config(state: dict[str, Any]) -> TrainConfig:
    """The settings a state file was written with."""
    values = {**_ABSENT_MEANS, **state["config"]}
    return apply_overrides(TrainConfig(), values)


def config_for_resume(resume: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved settings of a run, with the ``overrides`` that may change when continuing it."""
    state_path = find_state(resume)
    state = read_state(state_path)
    config = saved_config(state)
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    forbidden = sorted(k for k, v in overrides.items()
                       if k not in RESUME_CHANGEABLE and getattr(config, k, object()) != v)
    if forbidden:
        raise ResumeError(f"{state_path}: {', '.join(forbidden)} cannot change when resuming "
                          f"(changeable: {', '.join(sorted(RESUME_CHANGEABLE))})")
    overrides["output"] = str(state_path.parent)
    return apply_overrides(config, overrides)


def load_resumable_state(run_dir: Path, config: TrainConfig, auto_resume: bool) -> dict | None:
    """The state saved in ``run_dir``, checked against ``config``; None for a fresh run folder."""
    state_path = run_dir / STATE_FILE
    if not state_path.exists():
        return None
    if not auto_resume:
        raise ResumeError(f"{run_dir} already holds a run ({STATE_FILE}); resume it or choose another output")
    state = read_state(state_path)
    saved = saved_config(state)
    current = config.to_dict()
    diffs = [f"{k}: {v!r} -> {current[k]!r}" for k, v in saved.to_dict().items()
             if k not in RESUME_CHANGEABLE and current.get(k) != v]
    if diffs:
        raise ResumeError(f"{run_dir} holds a run with other settings ({'; '.join(diffs[:4])}); "
                          f"continue it with --resume {run_dir}, or choose another --output")
    return state
