"""Backend "triton": selective scan, cross-scan / cross-merge, the fused SS2D core and a channel
LayerNorm for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``, for tests).

Layout, one concern per module:

    common.py        triton import guard, interpreter switch, shared @triton.jit helpers
    chunked_scan.py  the any-N scan kernels and the chunk passes (long sequences)
    scan_n1.py       the N = 1 scan kernels (v2 models; the fused core's map-reading forward)
    tuning.py        TritonTuning / DEFAULT_TUNING (launch tables, switches), choose_scan_config
    launch.py        host side: buffers and kernel launches of one scan call
    autograd.py      the scan as a differentiable op (selective_scan)
    cross_scan.py    cross-scan / cross-merge kernel and ops
    ss2d.py          the fused SS2D core (cross_selective_scan)
    layernorm.py     channel LayerNorm over rows of a channels-last map
    aot.py           ahead-of-time compilation of every kernel (no GPU needed)

Importing this package works without triton installed; ``is_available`` then says False.
"""

from .autograd import selective_scan
from .common import INTERPRET, is_available
from .cross_scan import cross_merge, cross_scan
from .ss2d import cross_selective_scan
from .tuning import DEFAULT_TUNING, ScanLaunch, TritonTuning, choose_scan_config

__all__ = ["selective_scan", "cross_scan", "cross_merge", "cross_selective_scan", "is_available", "INTERPRET",
           "TritonTuning", "DEFAULT_TUNING", "ScanLaunch", "choose_scan_config"]
