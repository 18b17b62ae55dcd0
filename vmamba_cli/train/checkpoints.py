"""The checkpoints of a run: weights files for predict / eval, and the state file to continue from.

``last.safetensors`` / ``best.safetensors`` hold the model (and the EMA under ``ema.*``) with class
names and the preprocessing preset; ``best_ema.safetensors`` holds the EMA weights of the epoch with the
best EMA top-1 as the model's own (so predict / eval use them without ``--ema``);
``last.state.safetensors`` holds what resuming needs (state.py).
Rank 0 writes the state file first, then the weights; every rank's RNG state goes into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from vmamba_cli.data import Preprocess
from vmamba_cli.runtime import Dist
from vmamba_cli.train import artifacts
from vmamba_cli.train.config import TrainConfig
from vmamba_cli.train.schedule import ModelEma, WarmupCosineSchedule
from vmamba_cli.train.state import STATE_FILE, RunProgress, capture_rng, restore_rng, seed_everything, write_state


@dataclass(frozen=True)
class RunCheckpoints:
    """Saves and restores the trained components of one run (the objects, not copies of them)."""

    run_dir: Path
    config: TrainConfig
    dist: Dist
    model: nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosineSchedule
    scaler: torch.amp.GradScaler | None
    model_name: str
    class_names: list[str]
    preprocess: Preprocess
    data_description: str

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the EMA's under ``ema.*``."""
        state = dict(self.model.state_dict())
        if self.ema is not None:
            state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return state

    def _save_weights(self, path: Path, progress: RunProgress, extra: dict[str, Any],
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from vmamba_cli.weights import save_model

        metadata = {"source": "vmamba train", "epoch": progress.epoch, "data": self.data_description,
                    "run": str(self.run_dir), **extra}
        save_model(path, self.model, name=self.model_name, class_names=self.class_names, preprocess=self.preprocess,
                   extra=metadata, state_dict=self.weights_state() if state_dict is None else state_dict)

    def _save_state(self, progress: RunProgress, rng_all: list[dict]) -> None:
        write_state(self.run_dir / STATE_FILE, {
            "config": self.config.to_dict(),
            "arch": self.model.config.to_dict(),
            **progress.to_state(self.dist.world_size),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_all,
            "class_names": self.class_names,
            "model_name": self.model_name,
        })

    def save(self, progress: RunProgress, *, best: bool, top1: float | None, best_ema: bool = False,
             ema_top1: float | None = None) -> None:
        """Write the state file and last.safetensors (and best.safetensors when ``best``, best_ema.safetensors
        when ``best_ema``); all ranks call it."""
        rng_all = self.dist.all_gather(capture_rng(self.dist.device))
        if self.dist.is_main:
            self._save_state(progress, rng_all)
            mid_epoch_step = progress.batches_done // self.config.accum_steps or None
            self._save_weights(self.run_dir / "last.safetensors", progress,
                               {"top1": top1, "mid_epoch_step": mid_epoch_step})
            if best:
                self._save_weights(self.run_dir / "best.safetensors", progress, {"top1": top1})
            if best_ema and self.ema is not None:
                self._save_weights(self.run_dir / "best_ema.safetensors", progress, {"top1": ema_top1, "weights": "ema"},
                                   state_dict=self.ema.state_dict())
        self.dist.barrier()

    def restore(self, state: dict, log: Callable[[str], None]) -> RunProgress:
        """Load ``state`` into the components and the RNGs; returns the position to continue from."""
        self.model.load_state_dict(state["model"], strict=True)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        progress = RunProgress.from_state(state)
        saved_world = int(state["position"]["world_size"])
        accum = self.config.accum_steps
        if saved_world != self.dist.world_size:
            # Another partition of the data: restart the epoch that was in progress.
            log(f"resuming with {self.dist.world_size} processes instead of {saved_world}: "
                f"epoch {progress.epoch + 1} restarts from its beginning (not bit-exact)")
            progress.global_step -= progress.batches_done // accum
            self.schedule.load_state_dict({"step_index": progress.global_step})
            progress.batches_done, progress.totals = 0, RunProgress().totals
            seed_everything(self.config.seed + self.dist.rank + 1_000_003 * progress.epoch)
        else:
            restore_rng(state["rng"][self.dist.rank], self.dist.device)
        if self.dist.is_main:
            artifacts.keep_metrics_through(self.run_dir, progress.epoch)
        where = (f"epoch {progress.epoch + 1}, step {progress.batches_done // accum}" if progress.batches_done
                 else f"the end of epoch {progress.epoch}")
        log(f"resuming {self.run_dir} from {where}")
        return progress
