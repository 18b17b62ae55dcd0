"""The files a run leaves for people: config.json, metrics.jsonl, summary.json and curves.png.

Each is written to a temporary name and renamed (metrics.jsonl is appended one line per epoch, and
rewritten whole when a resume drops the lines of an epoch that never reached its checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vmamba_cli import jsonout
from vmamba_cli.errors import ResumeError
from vmamba_cli.train.state import STATE_FILE, RunProgress

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILES = ("last.safetensors", "best.safetensors", "best_ema.safetensors")
RUN_FILES = ("config.json", METRICS_FILE, "summary.json", "curves.png", *WEIGHTS_FILES, STATE_FILE)
# The temporary names vmamba_cli.weights.atomic_write gives these files (tempfile.mkstemp: ".NAME." +
# 8 random characters + ".tmp"); a write killed before its rename leaves one behind.
_TEMP_NAME = re.compile(r"^\.(?:%s)\.[A-Za-z0-9_]{8}\.tmp$" % "|".join(re.escape(n) for n in RUN_FILES))


@dataclass(frozen=True)
class RunInfo:
    """Facts about a run that do not change while it trains (they head its summary)."""

    run_dir: Path
    model_name: str          # registered name or "custom"
    model_label: str         # for people: the name, or the base model with its dims and depths
    params: int
    data: str                # description of the data and its split
    data_name: str           # the --data value
    num_classes: int
    world_size: int
    effective_batch: int
    device: str
    epochs: int


def _json_line(record: dict) -> str:
    return json.dumps(record, allow_nan=True)


def write_json(path: Path, obj: Any) -> None:
    from vmamba_cli.weights import atomic_write

    text = jsonout.dumps(obj) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch records of metrics.jsonl (empty before the first epoch ends).

    A last line without its newline is the append of a killed run and is left out; any other line
    that is not a JSON record raises ResumeError naming the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # no newline after it: an interrupted append
                break
            raise ResumeError(f"{path}: corrupt JSON on line {number}: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise ResumeError(f"{path}: line {number} is not an epoch record")
        records.append(record)
    return records


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files that writes killed before their rename left in ``run_dir`` (only the
    names ``atomic_write`` gives the run's own files)."""
    removed = []
    if run_dir.is_dir():
        for entry in os.scandir(run_dir):
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def start_metrics(run_dir: Path) -> None:
    """A fresh run's metrics.jsonl starts empty: lines left by an attempt killed before its first
    checkpoint would otherwise be followed by the same epochs again."""
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(_json_line(record) + "\n")


def keep_metrics_through(run_dir: Path, epoch: int) -> None:
    """Drop the records past ``epoch`` (they came from an epoch that did not reach its checkpoint)."""
    from vmamba_cli.weights import atomic_write

    text = "".join(_json_line(r) + "\n" for r in read_metrics(run_dir) if r["epoch"] <= epoch)
    atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text))


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def summary(info: RunInfo, progress: RunProgress, status: str, message: str | None = None,
            hashes: list[str] | None = None) -> dict[str, Any]:
    """The document of summary.json (also what ``train()`` returns)."""
    records = read_metrics(info.run_dir)
    last = records[-1] if records else {}
    doc = {
        "status": status,
        "run_dir": str(info.run_dir),
        "epochs_done": progress.epoch, "epochs": info.epochs, "global_step": progress.global_step,
        "model": info.model_name, "params": info.params,
        "data": info.data, "num_classes": info.num_classes,
        "world_size": info.world_size, "effective_batch": info.effective_batch, "device": info.device,
        "top1": last.get("top1"), "top5": last.get("top5"), "ema_top1": last.get("ema_top1"),
        "ema_top5": last.get("ema_top5"),
        "best_top1": max((r["top1"] for r in records), default=None),
        "best_epoch": progress.best.get("epoch") or None,
        "best_ema_top1": max((r["ema_top1"] for r in records if r.get("ema_top1") is not None), default=None),
        "best_ema_epoch": progress.best_ema.get("epoch") or None,
        "train_time_s": sum(r["epoch_time_s"] for r in records),
        "images_per_s": (sum(r["images"] for r in records) / max(sum(r["train_time_s"] for r in records), 1e-9))
        if records else None,
        "checkpoints": {name: str(info.run_dir / name) for name in (*WEIGHTS_FILES, STATE_FILE)
                        if (info.run_dir / name).exists()},
    }
    if message:
        doc["message"] = message
    if hashes is not None:
        doc["weights_sha256_per_rank"] = hashes
    return doc


def finish(info: RunInfo, doc: dict[str, Any]) -> None:
    """Write summary.json and the curves of the epochs so far."""
    write_json(info.run_dir / "summary.json", doc)
    plot_curves(read_metrics(info.run_dir), info.run_dir / "curves.png", f"{info.model_label} on {info.data_name}")


def plot_curves(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss (train / held-out) and top-1 (model / EMA) per epoch as a PNG."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vmamba_cli.weights import atomic_write

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train (soft targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], marker="o", label="held-out")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["top1"] for r in records], marker="o", label="model top-1")
    if any(r.get("ema_top1") is not None for r in records):
        ax_acc.plot(epochs, [r.get("ema_top1") for r in records], marker="o", label="EMA top-1")
    ax_acc.plot(epochs, [r["top5"] for r in records], linestyle="--", label="model top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
