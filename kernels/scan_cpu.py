"""Backend "cpu": a native (C++) selective scan for CPU tensors, forward and backward.

Two entry points, both differentiable with respect to every tensor input:

* ``selective_scan`` - the plain interface of spec §5.1 on (B, K*D, L) tensors.
* ``cross_selective_scan`` - the whole SS2D core in one kernel: it reads the (B, Di, H, W) map
  along the four scan routes by index arithmetic, forms delta from the x_proj output on the fly
  and sums the four directions into its output, so no (B, 4, Di, L) copy of u, delta or y exists.
  The x_proj projection is a single GEMM on the *unpermuted* map (a per-pixel projection does not
  care about scan order); its gradient is two more GEMMs.

The kernel source (``csrc/scan_cpu.cpp``) is compiled at first use with the system C++ compiler
(``$CXX`` or ``c++``; about 3 s) into a per-user cache and loaded with ctypes: no compile step at
install time and no dependence on PyTorch's C++ ABI or on ninja. The build is attempted once per
process under a file lock (concurrent processes wait for one build). If there is no compiler or
the build fails, ``is_available`` returns False, ``backend="auto"`` picks the PyTorch "torch"
backend, and one line on stderr says so. ``VMAMBA_NO_NATIVE=1`` disables the native kernel;
``VMAMBA_CACHE_DIR`` moves the cache (default ``~/.cache/vmamba``).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .scan_torch import check_scan_shapes

__all__ = ["is_available", "selective_scan", "cross_selective_scan", "native_status", "load_library"]

SOURCE = Path(__file__).with_name("csrc") / "scan_cpu.cpp"
ABI_VERSION = 1
NUM_DIRECTIONS = 4
# Flag sets tried in order: tuned for this CPU, portable, and portable without OpenMP (one thread).
# -ffp-contract=fast: ISO -std=c++17 would otherwise forbid fused multiply-adds.
_FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-ffp-contract=fast"),
)
# Channels per task at most (keeps a task's states and chunk scratch in L2).
_MAX_BLOCK = 128
# Channels in one full group of the kernel's interleaved vectors (kGroup x kLanes in scan_cpu.cpp).
_FULL_GROUP = 64


class _Problem(ctypes.Structure):
    """Mirror of ``struct Problem`` in csrc/scan_cpu.cpp."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in ("batch", "length", "height", "width", "channels", "groups",
                                               "group_channels", "d_state", "rank", "block", "chunk")]
        + [(name, ctypes.c_int32) for name in ("fused", "softplus", "num_threads", "route_groups")]
        + [(name, ctypes.c_void_p) for name in ("u", "delta", "proj", "wdt", "bias", "A", "D", "grad_y",
                                                  "states_in", "y", "states", "du", "ddelta", "red", "dwdt",
                                                  "dbias", "dA", "dD")]
    )


# --------------------------------------------------------------------------------------------
# Build and load (once per process)
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "reason": None}


def _cache_dir() -> Path:
    root = os.environ.get("VMAMBA_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vmamba" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared by different CPUs keeps one build per CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock; released by the OS if the process dies (no stale lock files)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename below still keeps the cache sound
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile SOURCE into ``target`` via a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise RuntimeError(f"{Path(cxx).name} failed: {lines[0] if lines else 'exit ' + str(proc.returncode)}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path):
    lib = ctypes.CDLL(str(path.resolve()))  # a bare name would be searched on the library path
    if lib.vmamba_scan_abi_version() != ABI_VERSION or lib.vmamba_scan_problem_size() != ctypes.sizeof(_Problem):
        raise RuntimeError(f"{path.name} does not match this version of vmamba")
    for fn in (lib.vmamba_scan_forward, lib.vmamba_scan_backward):
        fn.argtypes = [ctypes.POINTER(_Problem)]
        fn.restype = ctypes.c_int
    return lib


def _build_and_load():
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    source = SOURCE.read_bytes()
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="vmamba-kernels-"))
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cxx.encode(),
                                         _cpu_signature().encode(), platform.machine().encode()]))
        target = cache / f"scan_cpu_{key.hexdigest()[:16]}.so"
        try:
            with _file_lock(cache / f"{target.stem}.lock"):
                if not target.exists():
                    _compile(cxx, flags, target)
            return _open(target)
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    raise RuntimeError(errors[-1])


def load_library():
    """The loaded native library, or None (built on the first call only; thread-safe)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("VMAMBA_NO_NATIVE", "").strip() not in ("", "0"):
                _state["reason"] = "disabled by VMAMBA_NO_NATIVE"
            else:
                try:
                    _state["lib"] = _build_and_load()
                except Exception as exc:  # any failure means: use the PyTorch scan instead
                    _state["reason"] = str(exc) or type(exc).__name__
                    print(f"vmamba: native CPU scan kernel unavailable ({_state['reason']}); "
                          f"using the PyTorch scan instead (slower)", file=sys.stderr, flush=True)
            _state["tried"] = True
    return _state["lib"]


def native_status() -> dict:
    """Whether the native kernel is loaded, and why not when it is not (for `vmamba profile` etc.)."""
    lib = load_library()
    return {"available": lib is not None, "library": getattr(lib, "_name", None), "reason": _state["reason"]}


def is_available(device) -> bool:
    device = torch.device(device)
    return device.type == "cpu" and load_library() is not None


# --------------------------------------------------------------------------------------------
# Calling the kernel
# --------------------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _block_size(group_channels: int, outer_tasks: int) -> int:
    """Channels per task: few enough tasks to keep vectors long, enough to feed every thread.

    Wide blocks pay off: every step's per-pixel work (route lookup, broadcasting dts/B/C,
    prefetching) is shared by more channel vectors, and full groups of eight vectors interleave
    best; one task per thread measured 1.3-1.5x faster than two at batch 1. When there are only a
    few tasks, their count is made a multiple of the threads: three equal tasks on two threads
    take two rounds (batch 1, Di = 384 at 64x64: 4 blocks of 96 ran 1.2x faster than 3 of 128).
    """
    threads = torch.get_num_threads()
    outer_tasks = max(outer_tasks, 1)
    most = math.ceil(group_channels / 8)
    fewest = min(max(math.ceil(group_channels / _MAX_BLOCK), math.ceil(threads / outer_tasks)), most)

    def block_for(n_blocks):
        return 8 * math.ceil(group_channels / n_blocks / 8)

    def tasks(n_blocks):
        # Rounding blocks to whole vectors can leave fewer blocks than asked for: count them.
        return outer_tasks * math.ceil(group_channels / block_for(n_blocks))

    base = next(n for n in range(fewest, most + 1) if tasks(n) >= outer_tasks * fewest)
    if tasks(base) < 4 * threads:
        base = next((n for n in range(base, most + 1) if tasks(n) % threads == 0), base)
    return block_for(base)


def _fused_tasks(channels: int, batch: int) -> tuple[int, int]:
    """(channels per task, route groups) for the fused kernel.

    A task normally runs all four directions of its channel block. When that leaves blocks
    narrower than a full group of eight vectors (batch 1 with few channels: vmamba-tiny's stage 0
    gets two blocks of 48 on two threads), the directions are split into two (or four) route
    groups instead, so each task keeps a wide block; each group sums into its own slice of the
    output and the slices are added afterwards (one extra pass over y). At (1, 96, 256, 256) one
    thread ran a 96-wide block 1.3-2x faster than two 48-wide ones.
    """
    block, groups = _block_size(channels, batch), 1
    for more_groups in (2, NUM_DIRECTIONS):
        if block >= _FULL_GROUP:
            break
        wider = _block_size(channels, batch * more_groups)
        if wider > block:
            block, groups = wider, more_groups
    return block, groups


def _merge_slices(buffer: torch.Tensor) -> torch.Tensor:
    """Sum of the route groups' slices (dim 0), in place in the first."""
    out = buffer[0]
    for index in range(1, buffer.shape[0]):
        out.add_(buffer[index])
    return out


def _chunk(d_state: int) -> int:
    return 64 if d_state <= 4 else 32


def _run(backward: bool, **fields) -> None:
    problem = _Problem()
    for name, value in fields.items():
        if isinstance(value, torch.Tensor) or value is None:
            value = _ptr(value)
        setattr(problem, name, value)
    problem.num_threads = torch.get_num_threads()
    lib = load_library()
    status = (lib.vmamba_scan_backward if backward else lib.vmamba_scan_forward)(ctypes.byref(problem))
    if status:
        raise RuntimeError({2: "native scan: inconsistent sizes", 3: "native scan: out of memory"}
                           .get(status, f"native scan failed (status {status})"))


def _native_ok(*tensors) -> bool:
    """The kernel reads raw memory: only for plain CPU tensors outside dispatch modes (fake/meta
    tensors, FlopCounterMode, torch.compile tracing), where the PyTorch path runs instead."""
    if load_library() is None or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (t.device.type == "cpu" and type(t) in (torch.Tensor, torch.nn.Parameter))
               for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# Plain selective scan (spec §5.1 shapes)
# --------------------------------------------------------------------------------------------

def _plain_inputs(u, delta, A, B, C, D, delta_bias):
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    zeros = u.new_zeros(channels, dtype=torch.float32)
    return dict(
        u=_f32(u.transpose(1, 2)), delta=_f32(delta.transpose(1, 2)),
        # B and C side by side per (step, group): the kernel reads them as one row.
        proj=torch.cat([B, C], dim=2).to(torch.float32).permute(0, 3, 1, 2).contiguous(),
        A=_f32(A.view(groups, per_group, d_state).transpose(1, 2)),
        D=zeros if D is None else _f32(D), bias=zeros if delta_bias is None else _f32(delta_bias),
    ), dict(batch=batch, length=length, height=length, width=1, channels=channels, groups=groups,
            group_channels=per_group, d_state=d_state, rank=0,
            block=_block_size(per_group, batch * groups), chunk=_chunk(d_state), fused=0)


def _plain_forward(inputs, sizes, softplus, save_states):
    b, length, ch = sizes["batch"], sizes["length"], sizes["channels"]
    y = torch.empty(b, length, ch, dtype=torch.float32)
    states = None
    if save_states:
        n_chunks = -(-length // sizes["chunk"])
        states = torch.empty(b, sizes["groups"], n_chunks, sizes["d_state"], sizes["group_channels"])
    _run(False, **sizes, **inputs, softplus=int(softplus), y=y, states=states)
    return y, states


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype):
        inputs, sizes = _plain_inputs(u, delta, A, B, C, D, delta_bias)
        y, states = _plain_forward(inputs, sizes, delta_softplus, save_states=True)
        ctx.inputs, ctx.sizes, ctx.softplus = inputs, sizes, delta_softplus
        ctx.states = states
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, delta_bias)]
        return y.transpose(1, 2).contiguous().to(output_dtype)

    @staticmethod
    @once_differentiable
    @torch.autocast(device_type="cpu", enabled=False)
    def backward(ctx, grad_y):
        inputs, sizes = ctx.inputs, ctx.sizes
        b, length, ch = sizes["batch"], sizes["length"], sizes["channels"]
        groups, per_group, d_state = sizes["groups"], sizes["group_channels"], sizes["d_state"]
        n_blocks = -(-per_group // sizes["block"])
        du = torch.empty(b, length, ch)
        ddelta = torch.empty(b, length, ch)
        red = torch.empty(b, n_blocks, length, groups, 2 * d_state)
        dbias = torch.empty(b, groups, per_group)
        dA = torch.empty(b, groups, d_state, per_group)
        dD = torch.empty(b, groups, per_group)
        _run(True, **sizes, **inputs, softplus=int(ctx.softplus), grad_y=_f32(grad_y.transpose(1, 2)),
             states_in=ctx.states, du=du, ddelta=ddelta, red=red, dbias=dbias, dA=dA, dD=dD)
        dBC = red.sum(1).permute(0, 2, 3, 1)  # (b, G, 2N, L)
        t_u, t_delta, t_A, t_B, t_C, t_D, t_bias = ctx.dtypes
        grads = (
            du.transpose(1, 2).contiguous().to(t_u),
            ddelta.transpose(1, 2).contiguous().to(t_delta),
            dA.sum(0).transpose(1, 2).reshape(ch, d_state).to(t_A),
            dBC[:, :, :d_state].contiguous().to(t_B),
            dBC[:, :, d_state:].contiguous().to(t_C),
            None if t_D is None else dD.sum(0).reshape(ch).to(t_D),
            None if t_bias is None else dbias.sum(0).reshape(ch).to(t_bias),
        )
        ctx.inputs = ctx.states = None
        return (*grads, None, None)


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                   output_dtype=torch.float32):
    """Selective scan (spec §5) in the native kernel; float32 state, float32 output by default."""
    check_scan_shapes(u, delta, A, B, C, D, delta_bias)
    if not _native_ok(u, delta, A, B, C, D, delta_bias):
        from .scan_torch import selective_scan_blocked
        return selective_scan_blocked(u, delta, A, B, C, D, delta_bias, delta_softplus, output_dtype)
    if _needs_grad(u, delta, A, B, C, D, delta_bias):
        return _SelectiveScanCPU.apply(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), output_dtype)
    inputs, sizes = _plain_inputs(u, delta, A, B, C, D, delta_bias)
    y, _ = _plain_forward(inputs, sizes, delta_softplus, save_states=False)
    return y.transpose(1, 2).contiguous().to(output_dtype)


# --------------------------------------------------------------------------------------------
# Fused SS2D core
# --------------------------------------------------------------------------------------------

def _check_fused_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, d_inner, H, W), got {tuple(x.shape)}")
    d = x.shape[1]
    k, rank = NUM_DIRECTIONS, dt_projs_weight.shape[-1]
    n = A_logs.shape[-1]
    expected = {"x_proj_weight": (k, rank + 2 * n, d), "dt_projs_weight": (k, d, rank),
                "dt_projs_bias": (k, d), "A_logs": (k * d, n), "Ds": (k * d,)}
    for name, t in zip(expected, (x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must be {expected[name]} for x of shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _derived(param: torch.Tensor, make):
    """``make(param)``, cached on the parameter itself while it is unchanged (inference).

    The stamp (version counter, storage, dtype) changes with every in-place update (optimizer
    steps, load_state_dict), so a stale value is never used; under autograd nothing is cached.
    """
    if param.requires_grad and torch.is_grad_enabled():
        return make(param)
    if param.is_inference():
        # Created under inference_mode: no version counter to notice in-place updates with.
        with torch.no_grad():
            return make(param)
    stamp = (param._version, param.data_ptr(), param.dtype, tuple(param.shape))
    cached = getattr(param, "_vmamba_cpu_scan", None)
    if cached is None or cached[0] != stamp:
        with torch.no_grad():
            cached = (stamp, make(param))
        try:
            param._vmamba_cpu_scan = cached
        except (AttributeError, RuntimeError):  # tensors that take no attributes: just recompute
            pass
    return cached[1]


def _kernel_A(A_logs):
    """(A = -exp(A_logs) as (K*D, N), the same as (K, N, D) for the kernel's channel vectors)."""
    A = -torch.exp(A_logs.to(torch.float32))
    return A, A.view(NUM_DIRECTIONS, -1, A.shape[1]).transpose(1, 2).contiguous()


def _fused_forward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, save_states):
    batch, d, height, width = x.shape
    length = height * width
    rank, d_state = dt_projs_weight.shape[2], A_logs.shape[1]
    width_proj = rank + 2 * d_state
    # Channels-last rows; free when x already is channels_last (the model keeps it so).
    rows = _f32(x.permute(0, 2, 3, 1)).view(batch * length, d)
    w_proj = x_proj_weight.to(torch.float32).reshape(NUM_DIRECTIONS * width_proj, d)
    proj = rows @ w_proj.t()  # (B*L, 4 * (R + 2N)): [dts | B | C] of every direction at each pixel
    A, A_kernel = _derived(A_logs, _kernel_A)
    inputs = dict(
        u=rows, proj=proj, wdt=_derived(dt_projs_weight, lambda w: _f32(w.transpose(1, 2))),
        bias=_f32(dt_projs_bias), A=A_kernel, D=_f32(Ds),
    )
    block, route_groups = _fused_tasks(d, batch)
    sizes = dict(batch=batch, length=length, height=height, width=width, channels=d, groups=NUM_DIRECTIONS,
                 group_channels=d, d_state=d_state, rank=rank, block=block, route_groups=route_groups,
                 chunk=_chunk(d_state), fused=1)
    y = torch.empty(route_groups, batch, height, width, d, dtype=torch.float32)
    states = None
    if save_states:
        n_chunks = -(-length // sizes["chunk"])
        states = torch.empty(batch, NUM_DIRECTIONS, n_chunks, d_state, d)
    _run(False, **sizes, **inputs, softplus=1, y=y, states=states)
    return _merge_slices(y).permute(0, 3, 1, 2), inputs, sizes, states, w_proj, A


class _CrossSelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        y, inputs, sizes, states, w_proj, A = _fused_forward(
            x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, save_states=True)
        ctx.inputs, ctx.sizes, ctx.states, ctx.w_proj, ctx.A = inputs, sizes, states, w_proj, A
        ctx.dtypes = [t.dtype for t in (x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)]
        return y

    @staticmethod
    @once_differentiable
    @torch.autocast(device_type="cpu", enabled=False)
    def backward(ctx, grad_y):
        inputs, sizes = ctx.inputs, ctx.sizes
        b, length, d = sizes["batch"], sizes["length"], sizes["channels"]
        height, width = sizes["height"], sizes["width"]
        rank, d_state = sizes["rank"], sizes["d_state"]
        k = NUM_DIRECTIONS
        n_blocks = -(-d // sizes["block"])
        du = torch.empty(sizes["route_groups"], b * length, d)
        red = torch.empty(b, n_blocks, length, k * (rank + 2 * d_state))
        dwdt = torch.empty(b, k, rank, d)
        dbias = torch.empty(b, k, d)
        dA = torch.empty(b, k, d_state, d)
        dD = torch.empty(b, k, d)
        _run(True, **sizes, **inputs, softplus=1, grad_y=_f32(grad_y.permute(0, 2, 3, 1)),
             states_in=ctx.states, du=du, red=red, dwdt=dwdt, dbias=dbias, dA=dA, dD=dD)
        du = _merge_slices(du)
        d_proj = (red[:, 0] if n_blocks == 1 else red.sum(1)).view(b * length, -1)
        t_x, t_xp, t_dtw, t_dtb, t_alog, t_ds = ctx.dtypes
        need = ctx.needs_input_grad
        dx = d_xproj = None
        if need[0]:
            dx = torch.addmm(du, d_proj, ctx.w_proj).view(b, height, width, d).permute(0, 3, 1, 2).to(t_x)
        if need[1]:
            d_xproj = (d_proj.t() @ inputs["u"]).view(k, rank + 2 * d_state, d).to(t_xp)
        d_alogs = dA.sum(0).transpose(1, 2).reshape(k * d, d_state) * ctx.A
        ctx.inputs = ctx.states = None
        return (dx, d_xproj, dwdt.sum(0).transpose(1, 2).to(t_dtw), dbias.sum(0).to(t_dtb),
                d_alogs.to(t_alog), dD.sum(0).reshape(k * d).to(t_ds))


def cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """Fused SS2D core: (B, Di, H, W) -> (B, Di, H, W) float32 (channels-last strides).

    Same result as ``compose_cross_selective_scan`` (cross-scan, x/dt projections, selective scan
    with softplus, cross-merge), forward and backward.
    """
    _check_fused_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if not _native_ok(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        from . import compose_cross_selective_scan
        return compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                            backend="torch")
    # The kernel reads float32 buffers: autocast must not turn the projection matmul into bf16/fp16.
    with torch.autocast(device_type="cpu", enabled=False):
        if _needs_grad(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
            return _CrossSelectiveScanCPU.apply(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
        return _fused_forward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, save_states=False)[0]
