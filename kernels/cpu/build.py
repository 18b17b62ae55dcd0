"""Build and load the native CPU scan (once per process).

The kernel source (``csrc/scan_cpu.cpp``) is compiled at first use with the system C++ compiler
(``$CXX`` or ``c++``; about 3 s) into a per-user cache and loaded with ctypes: no compile step at
install time and no dependence on PyTorch's C++ ABI or on ninja. The build is attempted once per
process under a file lock (concurrent processes wait for one build). If there is no compiler or
the build fails, ``is_available`` returns False, ``backend="auto"`` picks the PyTorch "torch"
backend, and one line on stderr says so. ``VMAMBA_NO_NATIVE=1`` disables the native kernel. The
cache is ``cache_root()/kernels`` (``$VMAMBA_HOME/kernels``; default ``~/.cache/vmamba/kernels``).
"""

from __future__ import annotations

import ctypes
import hashlib
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

from ..cache import cache_root

__all__ = ["Problem", "load_library", "native_status", "is_available", "SOURCE"]

SOURCE = Path(__file__).with_name("csrc") / "scan_cpu.cpp"
ABI_VERSION = 1
# Flag sets tried in order: tuned for this CPU, portable, and portable without OpenMP (one thread).
# -ffp-contract=fast: ISO -std=c++17 would otherwise forbid fused multiply-adds.
_FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-ffp-contract=fast"),
)


class Problem(ctypes.Structure):
    """Mirror of ``struct Problem`` in csrc/scan_cpu.cpp."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in ("batch", "length", "height", "width", "channels", "groups",
                                               "group_channels", "d_state", "rank", "block", "chunk")]
        + [(name, ctypes.c_int32) for name in ("fused", "softplus", "num_threads", "route_groups")]
        + [(name, ctypes.c_void_p) for name in ("u", "delta", "proj", "wdt", "bias", "A", "D", "grad_y",
                                                  "states_in", "y", "states", "du", "ddelta", "red", "dwdt",
                                                  "dbias", "dA", "dD")]
    )


_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "reason": None}


def _cache_dir() -> Path:
    return cache_root() / "kernels"


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
    if lib.vmamba_scan_abi_version() != ABI_VERSION or lib.vmamba_scan_problem_size() != ctypes.sizeof(Problem):
        raise RuntimeError(f"{path.name} does not match this version of vmamba")
    for fn in (lib.vmamba_scan_forward, lib.vmamba_scan_backward):
        fn.argtypes = [ctypes.POINTER(Problem)]
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
