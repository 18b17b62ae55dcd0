"""Backend "cpu": a native (C++) selective scan for CPU tensors, forward and backward.

``build`` compiles and loads ``csrc/scan_cpu.cpp`` once per process, ``plan`` splits the work into
tasks, ``ops`` wraps the kernel as differentiable PyTorch functions and gives the registered
operators (``kernels/ops.py``) its forward and backward entry points.
"""

from .build import is_available, load_library, native_status
from .ops import (core_backward_native, core_forward_native, core_residual_shapes, cross_selective_scan,
                  scan_backward_native, scan_forward_native, scan_states_shape, selective_scan)

__all__ = ["is_available", "selective_scan", "cross_selective_scan", "native_status", "load_library",
           "scan_forward_native", "scan_backward_native", "scan_states_shape", "core_forward_native",
           "core_backward_native", "core_residual_shapes"]
