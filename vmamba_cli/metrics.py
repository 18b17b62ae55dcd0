"""Top-1 / top-k accuracy and cross-entropy of a classifier, summed over batches and processes.

One accumulator serves `vmamba eval` and training's held-out evaluation. Sums stay on the device
(no host sync per batch) in float64, which holds counts exactly up to 2**53, so the totals summed
over torchrun processes are the exact dataset counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vmamba_cli.runtime import Dist

TOPK = 5


@dataclass(frozen=True)
class TopKTotals:
    """Counts of a whole evaluation; the rates are None when nothing was counted."""

    correct_top1: int
    correct_topk: int
    count: int
    nonfinite: int        # images whose logits hold NaN/inf (counted as wrong)
    loss_sum: float
    k: int

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct_top1 / self.count if self.count else None

    @property
    def topk(self) -> float | None:
        return 100.0 * self.correct_topk / self.count if self.count else None

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.count if self.count else None


class TopKAccumulator:
    """``update(logits, targets)`` per batch, ``totals(dist)`` once at the end (sums over processes)."""

    def __init__(self, num_classes: int, k: int = TOPK, device: torch.device | str = "cpu"):
        self.k = min(k, num_classes)
        # correct top-1, correct top-k, images, images with non-finite logits, summed loss
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count one batch; returns the top-k class indices and their softmax probabilities."""
        logits = logits.double()
        finite = torch.isfinite(logits).all(dim=1)
        top_idx = logits.topk(self.k, dim=1).indices
        top_probs = logits.softmax(dim=1).gather(1, top_idx)
        hits = (top_idx == targets[:, None]) & finite[:, None]  # NaN logits are never right
        self._sums += torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                   logits.new_tensor(float(len(targets))), (~finite).sum().double(),
                                   F.cross_entropy(logits, targets, reduction="sum")])
        return top_idx, top_probs

    def totals(self, dist: "Dist | None" = None) -> TopKTotals:
        """The sums of this process, or of every process of ``dist``."""
        sums = dist.all_reduce_tensor(self._sums) if dist is not None else self._sums
        *counts, loss_sum = sums.tolist()
        correct1, correctk, count, nonfinite = (int(round(v)) for v in counts)
        return TopKTotals(correct1, correctk, count, nonfinite, loss_sum, self.k)


__all__ = ["TOPK", "TopKAccumulator", "TopKTotals"]
