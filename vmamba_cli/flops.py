"""FLOPs of VMamba in the official convention (the analytic count; no model is built).

Official convention (fvcore, docs/design.md §6): one multiply-add = 1 FLOP; convolutions and linears count
``output elements x (C_in / groups) x k_h x k_w`` (bias not counted), LayerNorm ``5 x numel``,
adaptive average pooling ``numel(input)``; element-wise ops (add, mul, SiLU, GELU, softplus, exp,
flip, permute) count 0; the selective scan counts ``9*B*L*D*N + B*D*L`` (D = channels of u, i.e.
K*d_inner; mamba issue #110). The legacy v0 mixer computes its x/dt projections with ``einsum``,
which fvcore counts from numpy's ``%.3e``-formatted report, so those two terms are rounded to four
significant digits -- that rounding is what makes the published v0 numbers end in ...040.

``count_flops`` evaluates the closed form for any ``VMambaConfig`` and input size (no model built).

The scan's own formula, and the mark that makes the scan visible to
``torch.utils.flop_counter.FlopCounterMode``, belong to the kernels layer
(``vmamba_cli.kernels.flops``); they are re-exported here for the application.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING

from vmamba_cli.kernels import NUM_DIRECTIONS
from vmamba_cli.kernels.flops import in_dispatch_mode, mark_selective_scan, scan_flops

if TYPE_CHECKING:  # annotations only
    from vmamba_cli.model import VMambaConfig

__all__ = [
    "count_flops", "flops_breakdown", "scan_flops", "fvcore_einsum_flops", "uses_legacy_einsum",
    "stage_sizes", "mark_selective_scan", "in_dispatch_mode", "NUM_DIRECTIONS",
]

# ------------------------------------------------------------------------------------------------
# Closed form
# ------------------------------------------------------------------------------------------------

def fvcore_einsum_flops(multiply_adds: int) -> int:
    """What fvcore reports for an einsum of ``multiply_adds`` MACs.

    fvcore parses numpy's ``einsum_path`` text report, which prints the "optimized FLOP count"
    (= 2 x MACs) with ``%.3e``, and halves it: the count keeps four significant digits.
    """
    return int(float(format(2 * multiply_adds, ".3e")) / 2)


def uses_legacy_einsum(config: "VMambaConfig") -> bool:
    """True for configs the official code runs through the legacy v0 mixer (einsum projections).

    The released v0 models are gated with channel-last LayerNorms; every v2-family config (gated
    or not) uses grouped 1-D convolutions, which fvcore counts exactly.
    """
    return bool(config.gated and not config.channels_first)


def _size(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


def stage_sizes(config: "VMambaConfig", resolution) -> list[tuple[int, int]]:
    """(h, w) of the feature map in each stage for an input of ``resolution`` (int or (H, W))."""
    height, width = _size(resolution)
    p = config.patch_size
    if config.stem == "v1":
        h, w = (height - p) // p + 1, (width - p) // p + 1
    else:
        s = p // 2
        h1, w1 = (height - 1) // s + 1, (width - 1) // s + 1    # 3x3, padding 1, stride s
        h, w = (h1 - 1) // s + 1, (w1 - 1) // s + 1
    sizes = [(h, w)]
    for _ in config.dims[1:]:
        if config.downsample == "v2":                             # 2x2 conv, stride 2, no padding
            h, w = h // 2, w // 2
        else:                                                     # 3x3/s2/p1 conv, or padded 2x2 merge
            h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _dt_rank(config: "VMambaConfig", dim: int) -> int:
    return math.ceil(dim / 16) if config.dt_rank == "auto" else int(config.dt_rank)


def flops_breakdown(config: "VMambaConfig", resolution=224, batch: int = 1,
                    legacy_einsum: bool | None = None) -> "OrderedDict[str, int]":
    """Official-convention FLOPs per component, summed over the network.

    Keys: stem (its convolutions), norm (every LayerNorm: stem, blocks, out_norm, downsample,
    classifier), in_proj, conv (depthwise), x_proj, dt_proj, scan, out_proj, mlp (fc1 + fc2),
    downsample (its conv / linear), pool, head. ``legacy_einsum`` (default: ``uses_legacy_einsum``)
    applies fvcore's einsum rounding to x_proj/dt_proj, per block call.
    """
    if legacy_einsum is None:
        legacy_einsum = uses_legacy_einsum(config)
    height, width = _size(resolution)
    parts: OrderedDict[str, int] = OrderedDict(
        (k, 0) for k in ("stem", "norm", "in_proj", "conv", "x_proj", "dt_proj", "scan", "out_proj",
                         "mlp", "downsample", "pool", "head"))
    B, K = batch, NUM_DIRECTIONS
    c0, cin, p = config.dims[0], config.in_chans, config.patch_size
    sizes = stage_sizes(config, (height, width))
    h, w = sizes[0]
    if config.stem == "v1":
        parts["stem"] = B * c0 * h * w * cin * p * p
        parts["norm"] += B * 5 * c0 * h * w
    else:
        s = p // 2
        h1, w1 = (height - 1) // s + 1, (width - 1) // s + 1
        half = c0 // 2
        parts["stem"] = B * (half * h1 * w1 * cin * 9 + c0 * h * w * half * 9)
        parts["norm"] += B * (5 * half * h1 * w1 + 5 * c0 * h * w)

    for i, (dim, depth) in enumerate(zip(config.dims, config.depths)):
        h, w = sizes[i]
        L = h * w
        d_inner = int(config.ssm_ratio * dim)
        rank, n = _dt_rank(config, dim), config.d_state
        x_proj = B * K * (rank + 2 * n) * d_inner * L
        dt_proj = B * K * d_inner * rank * L
        if legacy_einsum:
            x_proj, dt_proj = fvcore_einsum_flops(x_proj), fvcore_einsum_flops(dt_proj)
        hidden = int(dim * config.mlp_ratio)
        per_block = {
            "norm": B * (5 * dim * L + 5 * d_inner * L + (5 * dim * L if hidden > 0 else 0)),
            "in_proj": B * dim * d_inner * L * (2 if config.gated else 1),
            "conv": B * config.ssm_conv ** 2 * d_inner * L if config.ssm_conv > 1 else 0,
            "x_proj": x_proj,
            "dt_proj": dt_proj,
            "scan": scan_flops(B, K * d_inner, L, n),
            "out_proj": B * d_inner * dim * L,
            "mlp": B * 2 * dim * hidden * L,
        }
        for key, value in per_block.items():
            parts[key] += depth * value
        if i + 1 < len(config.dims):
            out_dim = config.dims[i + 1]
            h2, w2 = sizes[i + 1]
            if config.downsample == "v1":
                parts["downsample"] += B * 4 * dim * out_dim * h2 * w2
                parts["norm"] += B * 5 * 4 * dim * h2 * w2
            else:
                k2 = 9 if config.downsample == "v3" else 4
                parts["downsample"] += B * out_dim * h2 * w2 * dim * k2
                parts["norm"] += B * 5 * out_dim * h2 * w2
    h, w = sizes[-1]
    c3 = config.dims[-1]
    parts["norm"] += B * 5 * c3 * h * w
    parts["pool"] = B * c3 * h * w
    parts["head"] = B * c3 * config.num_classes
    return parts


def count_flops(config: "VMambaConfig", resolution=224, batch: int = 1,
                legacy_einsum: bool | None = None) -> int:
    """Total FLOPs (one multiply-add = 1) of one forward, as the authors' fvcore setup reports them.

    Equals the published numbers at 224x224 for all nine released configs (``ModelSpec.flops``).
    """
    return sum(flops_breakdown(config, resolution, batch, legacy_einsum).values())
