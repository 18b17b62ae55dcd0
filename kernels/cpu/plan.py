"""How the native CPU scan splits its work into tasks (channel blocks, route groups, chunks).

Plain functions of the problem size and the thread count: callers pass the result down, and a
test or benchmark may pass its own.
"""

from __future__ import annotations

import math

import torch

from ..common import NUM_DIRECTIONS

__all__ = ["block_size", "fused_tasks", "chunk_length", "MAX_BLOCK"]

# Channels per task at most (keeps a task's states and chunk scratch in L2).
MAX_BLOCK = 128
# Channels in one full group of the kernel's interleaved vectors (kGroup x kLanes in scan_cpu.cpp).
_FULL_GROUP = 64


def block_size(group_channels: int, outer_tasks: int, threads: int | None = None) -> int:
    """Channels per task: few enough tasks to keep vectors long, enough to feed every thread.

    Wide blocks pay off: every step's per-pixel work (route lookup, broadcasting dts/B/C,
    prefetching) is shared by more channel vectors, and full groups of eight vectors interleave
    best; one task per thread measured 1.3-1.5x faster than two at batch 1. When there are only a
    few tasks, their count is made a multiple of the threads: three equal tasks on two threads
    take two rounds (batch 1, Di = 384 at 64x64: 4 blocks of 96 ran 1.2x faster than 3 of 128).
    """
    threads = threads or torch.get_num_threads()
    outer_tasks = max(outer_tasks, 1)
    most = math.ceil(group_channels / 8)
    fewest = min(max(math.ceil(group_channels / MAX_BLOCK), math.ceil(threads / outer_tasks)), most)

    def block_for(n_blocks):
        return 8 * math.ceil(group_channels / n_blocks / 8)

    def tasks(n_blocks):
        # Rounding blocks to whole vectors can leave fewer blocks than asked for: count them.
        return outer_tasks * math.ceil(group_channels / block_for(n_blocks))

    base = next(n for n in range(fewest, most + 1) if tasks(n) >= outer_tasks * fewest)
    if tasks(base) < 4 * threads:
        base = next((n for n in range(base, most + 1) if tasks(n) % threads == 0), base)
    return block_for(base)


def fused_tasks(channels: int, batch: int, threads: int | None = None) -> tuple[int, int]:
    """(channels per task, route groups) for the fused kernel.

    A task normally runs all four directions of its channel block. When that leaves blocks
    narrower than a full group of eight vectors (batch 1 with few channels: vmamba-tiny's stage 0
    gets two blocks of 48 on two threads), the directions are split into two (or four) route
    groups instead, so each task keeps a wide block; each group sums into its own slice of the
    output and the slices are added afterwards (one extra pass over y). At (1, 96, 256, 256) one
    thread ran a 96-wide block 1.3-2x faster than two 48-wide ones.
    """
    block, groups = block_size(channels, batch, threads), 1
    for more_groups in (2, NUM_DIRECTIONS):
        if block >= _FULL_GROUP:
            break
        wider = block_size(channels, batch * more_groups, threads)
        if wider > block:
            block, groups = wider, more_groups
    return block, groups


def chunk_length(d_state: int) -> int:
    """Steps per chunk of the kernel's two-level scan: shorter chunks for wider states."""
    return 64 if d_state <= 4 else 32
