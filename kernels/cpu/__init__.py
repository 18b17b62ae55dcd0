"""Backend "cpu": a native (C++) selective scan for CPU tensors, forward and backward.

``build`` compiles and loads ``csrc/scan_cpu.cpp`` once per process, ``plan`` splits the work into
tasks, ``ops`` wraps the kernel as differentiable PyTorch ops.
"""

from .build import is_available, load_library, native_status
from .ops import cross_selective_scan, selective_scan

__all__ = ["is_available", "selective_scan", "cross_selective_scan", "native_status", "load_library"]
