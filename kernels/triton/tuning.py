"""Launch configuration of the Triton kernels: one frozen tuning object and the launch heuristic.

``TritonTuning`` holds every launch table and every on/off choice of the Triton backend;
``DEFAULT_TUNING`` is the set measured fastest on an H200 (docs/kernels-gpu.md). Callers pass a
tuning object down explicitly (``tuning=None`` means the default); a benchmark sweeps by passing
``dataclasses.replace(DEFAULT_TUNING, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .common import next_power_of_2, sm_count as _sm_count

__all__ = ["TritonTuning", "DEFAULT_TUNING", "ScanLaunch", "choose_scan_config"]

# (BLOCK_T, BLOCK_D, num_warps, maxnreg) of a forward; (BLOCK_D, num_warps, maxnreg) of a backward.
# maxnreg caps registers per thread (None: the compiler's choice), trading spills for more
# resident programs.
Tiles = tuple[int, int, int, "int | None"]
BackwardLaunch = tuple[int, int, "int | None"]


@dataclass(frozen=True)
class TritonTuning:
    """Launch tables and switches of the Triton backend (defaults: the fastest measured on an H200).

    n1_inference_tiles / n1_training_tiles: N = 1 forward tiles without and with a backward to
    follow (the backward must use the training forward's BLOCK_T: it reads the state stored per
    tile); n1_backward_launch: the N = 1 backward's channel block, warps and register cap.
    n1_map_*: the same for the fused SS2D core's forward, which reads u from the map.
    cross_scan_launch / cross_merge_launch: (BLOCK_C, BLOCK_H = BLOCK_W, num_warps) of the
    cross-scan kernel in each direction.
    fused_cross_scan: run the SS2D core through the fused kernels (d_state = 1) rather than the
    composed ops; fused_training: also when a backward follows. fused_dt_proj: in a one-chunk
    inference through the fused core, the scan kernel forms delta = dt_projs_weight @ dts itself
    instead of a batched matmul writing (B, 4*Di, L) that the kernel then reads back.
    """

    n1_inference_tiles: Tiles = (128, 8, 2, None)
    n1_training_tiles: Tiles = (64, 8, 2, 64)
    n1_backward_launch: BackwardLaunch = (4, 1, None)
    n1_map_inference_tiles: Tiles = (64, 8, 2, 80)
    n1_map_training_tiles: Tiles = (64, 16, 2, 96)
    cross_scan_launch: tuple[int, int, int] = (4, 32, 4)
    cross_merge_launch: tuple[int, int, int] = (8, 16, 4)
    fused_cross_scan: bool = True
    fused_training: bool = True
    fused_dt_proj: bool = True


DEFAULT_TUNING = TritonTuning()

# Elements of one [BLOCK_D, N, BLOCK_T] tile; the backward keeps about eight such tiles live.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_D = 64
_MIN_CHUNK = 256
_PROGRAMS_PER_SM = 4


class ScanLaunch(NamedTuple):
    """Launch configuration of one scan call (forward; ``bwd_*`` for its backward).

    ``prefetch``: the N = 1 forward loads each tile one iteration ahead.
    """

    block_d: int
    block_n: int
    block_t: int
    chunk_len: int
    n_chunks: int
    n_blocks: int
    num_warps: int
    maxnreg: int | None = None
    bwd_block_d: int | None = None
    bwd_num_warps: int | None = None
    bwd_maxnreg: int | None = None
    prefetch: bool = False


def _default_tiles(tuning: TritonTuning, block_n: int, training: bool, map_io: bool) -> Tiles:
    """(BLOCK_T, largest BLOCK_D, num_warps, maxnreg) of the forward.

    N = 1: inference runs long tiles over few channels; when a backward follows, the forward must
    use the backward's tile length (it stores the state entering each tile), and the backward is
    fastest on short tiles. N > 1 multiplies the tile by N, so tiles get shorter.
    """
    if block_n == 1 and map_io:
        return tuning.n1_map_training_tiles if training else tuning.n1_map_inference_tiles
    if block_n == 1:
        return tuning.n1_training_tiles if training else tuning.n1_inference_tiles
    block_t = 32 if block_n <= 4 else 16
    return block_t, max(1, min(_MAX_BLOCK_D, _TILE_ELEMENTS // (block_n * block_t))), 4, None


def _split_channels(channels_per_group: int, largest: int) -> int:
    """The largest power-of-two block <= largest that leaves at most 1/8 of the lanes masked off."""
    block_d = min(largest, next_power_of_2(max(channels_per_group, 1)))
    while block_d > 8:
        blocks = -(-channels_per_group // block_d)
        if blocks * block_d - channels_per_group <= channels_per_group // 8:
            break
        block_d //= 2
    return block_d


def choose_scan_config(batch, groups, channels_per_group, d_state, length, device="cpu",
                       chunk_size=None, block_d=None, block_t=None, sm_count=None, num_warps=None,
                       training=False, map_io=False, tuning: TritonTuning | None = None) -> ScanLaunch:
    """Launch configuration of a scan call.

    Tiles (BLOCK_T steps x BLOCK_D channels), warps and register caps come from ``tuning``'s
    tables; BLOCK_D is halved until a group's channels split with at most 1/8 of the lanes masked
    off. Chunks: enough (batch, channel block, chunk) programs for about four per SM, no chunk
    shorter than 256 steps, so that batch 128 at 224x224 runs one chunk (no carry passes) and
    batch 1 at L = 65,536 many. ``training`` picks the tiles for a forward that a backward will
    follow, ``map_io`` those of the fused SS2D core's forward (u read from the map; its backward
    runs on sequence-ordered copies with the plain backward launch). Explicit ``block_d`` /
    ``num_warps`` apply to the forward and backward. The N = 1 inference forward loads one tile
    ahead (10-20 % faster on its long tiles); the training forward does not (slower with it).
    """
    tuning = tuning or DEFAULT_TUNING
    block_n = next_power_of_2(d_state)
    default_t, default_d, default_warps, maxnreg = _default_tiles(tuning, block_n, training, map_io)
    # Short sequences (the last stages) get tiles no longer than themselves.
    block_t = block_t or min(default_t, max(16, next_power_of_2(length)))
    explicit_d, explicit_warps = block_d, num_warps
    num_warps = num_warps or default_warps
    block_d = block_d or _split_channels(channels_per_group, default_d)
    if block_n == 1:
        bwd_d, bwd_warps, bwd_maxnreg = tuning.n1_backward_launch
        bwd_d = explicit_d or _split_channels(channels_per_group, bwd_d)
        bwd_warps = explicit_warps or bwd_warps
    else:
        bwd_d, bwd_warps, bwd_maxnreg = block_d, num_warps, maxnreg
    if explicit_d or explicit_warps:
        maxnreg = bwd_maxnreg = None
    n_blocks = max(1, -(-channels_per_group // block_d))
    if chunk_size is None:
        sm_count = sm_count or _sm_count(torch.device(device))
        programs = max(1, batch * groups * n_blocks)
        wanted = max(1, -(-_PROGRAMS_PER_SM * sm_count // programs))
        n_chunks = max(1, min(wanted, length // _MIN_CHUNK))
        # Several chunks: rounded down to whole tiles, so there are at least as many as asked for.
        chunk_size = length if n_chunks == 1 else max(block_t, length // n_chunks // block_t * block_t)
    chunk_len = max(block_t, -(-chunk_size // block_t) * block_t)
    n_chunks = -(-length // chunk_len)
    return ScanLaunch(block_d, block_n, block_t, chunk_len, n_chunks, n_blocks, num_warps, maxnreg,
                      bwd_d, bwd_warps, bwd_maxnreg, block_n == 1 and not training)
