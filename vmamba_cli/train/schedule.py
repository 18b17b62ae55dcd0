"""Optimisation pieces of the official recipe (docs/design.md §9): weight-decay groups, LR scaling by batch,
warm-up + cosine per optimizer step, and the EMA of weights.

Written from the recipe's formulas; the behaviour matches timm's ``CosineLRScheduler`` with
``warmup_prefix=True, t_in_epochs=False, cycle_limit=1`` and ``ModelEma`` as the official code uses them.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
import torch.nn as nn

LR_REFERENCE_BATCH = 512  # the recipe's learning rates are quoted for a total batch of 512


def scale_lr(lr: float, effective_batch: int, reference: int = LR_REFERENCE_BATCH) -> float:
    """Linear scaling rule: ``lr * effective_batch / reference`` (effective = per-process x world x accum)."""
    return lr * effective_batch / reference


def weight_decay_groups(model: nn.Module, weight_decay: float,
                        skip_names: Iterable[str] = ("pos_embed",)) -> list[dict]:
    """AdamW parameter groups with the official rule: no decay for 1-D tensors, names ending ``.bias``
    and ``skip_names``; everything else decays. ``A_logs`` and ``dt_projs_bias`` are 2-D, so they *are*
    decayed (the official ``_no_weight_decay`` attributes are never consulted; docs/design.md §9)."""
    skip = set(skip_names)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def no_decay_names(model: nn.Module, skip_names: Iterable[str] = ("pos_embed",)) -> list[str]:
    """Names of the parameters that ``weight_decay_groups`` excludes from decay."""
    skip = set(skip_names)
    return [n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in skip]


class WarmupCosineSchedule:
    """Linear warm-up from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then a half cosine from
    ``base_lr`` to ``min_lr`` over ``total_steps - warmup_steps``; ``min_lr`` afterwards.

    Stepped once per optimizer step with the global step index (what timm's scheduler does with
    ``step_update(epoch * steps_per_epoch + i)``). The state is just that index, so resuming is exact.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, warmup_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.base_lr, self.warmup_lr, self.min_lr = base_lr, warmup_lr, min_lr
        self.warmup_steps = max(0, int(warmup_steps))
        self.total_steps = max(int(total_steps), self.warmup_steps)
        self.step_index = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.base_lr - self.warmup_lr) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        t = step - self.warmup_steps
        if decay_steps <= 0 or t >= decay_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t / decay_steps))

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_index)

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_index += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "base_lr": self.base_lr, "warmup_lr": self.warmup_lr,
                "min_lr": self.min_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])
        self._apply()


class ModelEma:
    """Exponential moving average of every state entry: ``ema = decay * ema + (1 - decay) * model``,
    updated after each optimizer step (timm ``ModelEma`` semantics, decay 0.9999 in the recipe)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model_state = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = model_state[name].detach()
            if ema_value.is_floating_point():
                ema_value.mul_(self.decay).add_(value.to(ema_value.dtype), alpha=1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
