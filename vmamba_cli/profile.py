"""Params, FLOPs, speed and memory of VMamba models across resolutions, beside torchvision peers.

``profile(models, resolutions, compare=...)`` returns one row (a dict) per (model, resolution):

* ``params``; ``flops`` per image in the official convention (one multiply-add = 1 FLOP; the
  selective scan counted 9*B*L*D*N + B*D*L; ``vmamba_cli.flops``). Peers are counted with
  ``FlopCounterMode`` on the meta device, halved (multiply-adds of convs, linears and attention
  matmuls; this reproduces torchvision's published ``_ops``).
* inference: ``warmup`` forwards, then the median of ``iters`` timed forwards (``torch.inference_mode``,
  synchronised on CUDA) -> ``latency_ms`` per batch and ``images_per_s``.
* training step (``train=True``): forward + cross-entropy + backward, no optimizer (the official
  ``testfwdbwd``) -> ``train_images_per_s``.
* peak memory: CUDA ``max_memory_allocated`` (weights included, as the official script prints it);
  on CPU the growth of the peak RSS over the RSS just before the row (free heap returned with
  ``malloc_trim`` first, the kernel's high-water mark reset through ``/proc/self/clear_refs``), so
  rows measured one after another in the same process do not hide each other.
* scan bandwidth (VMamba rows): the scan calls of one forward, timed on the model's own parameters
  and its exact shapes, against their minimum memory traffic -> ``scan_gbs`` and the fraction of the
  machine's copy bandwidth (measured, or given).
* ``vs``: ratios against the first VMamba model at the same resolution.

Out of memory (``torch.OutOfMemoryError``, or a RuntimeError/MemoryError saying so) halves the batch
down to 1 and retries; a row that still fails says ``OOM`` and the run goes on. The measuring function
is a parameter (``runner``), so the retry logic can be exercised without exhausting memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_cli.export import export_onnx, load_onnx
from vmamba_cli.flops import count_flops
from vmamba_cli.runtime import autocast
from vmamba_cli.peers import build_peer, is_vit

__all__ = [
    "profile", "environment", "measure", "measure_bandwidth", "peer_flops", "is_out_of_memory",
    "MeasureTask", "ProfileOptions", "PeakMemory", "DTYPES", "RATIO_METRICS", "is_torchvision_model",
    "fit_exponent", "crossover", "scaling_report", "describe_crossover", "plot_scaling",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Row fields compared against the reference (first VMamba) model at the same resolution.
# Extra runtimes ``profile(runtimes=...)`` times beside eager PyTorch, one row each per VMamba model.
EXTRA_RUNTIMES = ("onnxruntime",)
RATIO_METRICS = ("images_per_s", "latency_ms", "train_images_per_s", "peak_memory_mb", "flops", "params")
_MiB = float(1 << 20)


# ------------------------------------------------------------------------------------------------
# Options and tasks
# ------------------------------------------------------------------------------------------------

@dataclass
class ProfileOptions:
    device: torch.device
    dtype: str = "float32"
    warmup: int = 2
    iters: int = 5
    channels_last: bool = False
    scan_bandwidth: bool = True
    bandwidth_gbs: float | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """None for float32; otherwise the autocast (AMP) dtype, as the official AMP throughput."""
        return None if self.dtype == "float32" else DTYPES[self.dtype]


@dataclass
class MeasureTask:
    """One measurement: ``mode`` is "inference", "train" or "scan" for ``model`` at ``resolution``."""

    model_name: str
    model: nn.Module
    resolution: int
    batch_size: int
    mode: str
    options: ProfileOptions
    extra: dict = field(default_factory=dict)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------

def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as pm:``; ``pm.peak_mb`` after.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (absolute, weights included).
    CPU (Linux): peak RSS minus the RSS at entry. At entry, free heap is handed back to the OS
    (``malloc_trim``) so the baseline is honest, and the kernel's high-water mark is reset
    (``/proc/self/clear_refs`` = 5). Where that reset is refused, a thread samples RSS every 2 ms.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_mb: float | None = None
        self.method = ""
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        libc = _libc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
        self._baseline = _status_kib("VmRSS")
        if self._baseline is None:
            self.method = "unavailable"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS growth (VmHWM reset via clear_refs)"
        except OSError:
            self.method = "peak RSS growth (sampled every 2 ms)"
            self._sampled_peak = self._baseline
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            rss = _status_kib("VmRSS") or 0
            self._sampled_peak = max(self._sampled_peak, rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / _MiB
            return False
        if self.method == "unavailable":
            return False
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._sampled_peak
        else:
            peak = _status_kib("VmHWM") or 0
        self.peak_mb = max(0, peak - self._baseline) / 1024.0
        return False


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _autocast(options: ProfileOptions):
    return autocast(options.device, options.autocast_dtype)


def _input(task: MeasureTask) -> torch.Tensor:
    opts = task.options
    x = torch.randn(task.batch_size, 3, task.resolution, task.resolution, device=opts.device)
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last else x


def measure(task: MeasureTask) -> dict:
    """The default runner: one inference, training-step or scan measurement (may raise OOM)."""
    if task.mode == "scan":
        return _measure_scan(task)
    opts, model = task.options, task.model
    x = _input(task)
    if task.mode == "inference":
        model.eval()
        with PeakMemory(opts.device) as memory, torch.inference_mode(), _autocast(opts):
            times = _timed(lambda: model(x), opts.device, opts.warmup, opts.iters)
        latency = statistics.median(times)
        return {"latency_ms": latency * 1e3, "images_per_s": task.batch_size / latency,
                "peak_memory_mb": memory.peak_mb, "memory_method": memory.method}
    if task.mode == "train":
        model.train()
        num_classes = task.extra.get("num_classes", 1000)
        labels = torch.randint(0, num_classes, (task.batch_size,), device=opts.device)

        def step():
            with _autocast(opts):
                loss = F.cross_entropy(model(x).float(), labels)
            loss.backward()

        try:
            with PeakMemory(opts.device) as memory:
                times = _timed(step, opts.device, opts.warmup, opts.iters)
        finally:
            model.zero_grad(set_to_none=True)
            model.eval()
        step_time = statistics.median(times)
        return {"train_step_ms": step_time * 1e3, "train_images_per_s": task.batch_size / step_time,
                "train_peak_memory_mb": memory.peak_mb}
    raise ValueError(f"unknown measurement mode {task.mode!r}")


# ------------------------------------------------------------------------------------------------
# Selective scan against the memory bandwidth
# ------------------------------------------------------------------------------------------------

def measure_bandwidth(device: torch.device | str = "cpu", megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), median of ``repeats``."""
    device = torch.device(device)
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), device, warmup=2, iters=repeats)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def _ss2d_modules(model: nn.Module) -> list[list[nn.Module]]:
    """SS2D mixers of each stage (model.layers[i].blocks[j].op)."""
    return [[block.op for block in layer.blocks] for layer in model.layers]


def _measure_scan(task: MeasureTask) -> dict:
    """Time the scan calls of one forward; bytes = their minimum traffic.

    One block per stage is timed (blocks of a stage have identical shapes) and weighted by the
    stage depth. With a fused SS2D backend the timed op is the fused core (its minimum traffic:
    read the map, write the output); otherwise the selective scan itself (read u, delta, B, C,
    write the float32 y).
    """
    from vmamba_cli import kernels
    from vmamba_cli.flops import stage_sizes

    opts, model = task.options, task.model
    device, batch = opts.device, task.batch_size
    backend = getattr(_ss2d_modules(model)[0][0], "scan_backend", "auto")
    resolved = kernels.resolve_backend(backend, device)
    fused = kernels._op(resolved, "cross_selective_scan") is not None
    compute_dtype = opts.autocast_dtype or torch.float32
    total_time = 0.0
    total_bytes = 0
    warmup, iters = min(opts.warmup, 1), max(1, min(opts.iters, 3))
    sizes = stage_sizes(model.config, task.resolution)
    for mixers, (height, width) in zip(_ss2d_modules(model), sizes):
        if not mixers:
            continue
        m = mixers[0]
        d_inner, length = m.d_inner, height * width
        if model.config.channels_first and not opts.channels_last:
            x = torch.randn(batch, d_inner, height, width, device=device, dtype=compute_dtype)
        else:  # channel-last activations reach the core as a permuted view, as in the model
            x = torch.randn(batch, height, width, d_inner, device=device, dtype=compute_dtype).permute(0, 3, 1, 2)
        x = F.silu(x)
        params = [m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        with torch.inference_mode(), _autocast(opts):
            if fused:
                call = lambda: kernels.cross_selective_scan(x, *params, backend=backend)  # noqa: E731
                nbytes = x.numel() * x.element_size() + batch * d_inner * length * 4 + param_bytes
            else:
                xs = kernels.cross_scan(x, backend)
                x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, m.x_proj_weight.to(xs.dtype))
                dts, Bs, Cs = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=2)
                dts = torch.einsum("bkrl,kdr->bkdl", dts, m.dt_projs_weight.to(dts.dtype))
                u = xs.reshape(batch, -1, length).contiguous()
                delta = dts.reshape(batch, -1, length).contiguous()
                Bs, Cs = Bs.contiguous(), Cs.contiguous()
                A = -torch.exp(m.A_logs.float())
                D, bias = m.Ds.float(), m.dt_projs_bias.reshape(-1).float()
                call = lambda: kernels.selective_scan(u, delta, A, Bs, Cs, D, bias,  # noqa: E731
                                                      delta_softplus=True, backend=backend)
                nbytes = (sum(t.numel() * t.element_size() for t in (u, delta, Bs, Cs, A, D, bias))
                          + u.numel() * 4)
            times = _timed(call, device, warmup, iters)
        total_time += len(mixers) * statistics.median(times)
        total_bytes += len(mixers) * nbytes
    gbs = total_bytes / total_time / 1e9 if total_time > 0 else None
    return {"scan_op": f"cross_selective_scan ({resolved} backend, fused)" if fused
            else f"selective_scan ({resolved} backend)",
            "scan_ms": total_time * 1e3, "scan_bytes": total_bytes, "scan_gbs": gbs}


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def is_torchvision_model(name: str) -> bool:
    import torchvision

    try:
        torchvision.models.get_model_builder(name)
    except ValueError:
        return False
    return True


def _check_peers(names: Iterable[str]) -> None:
    import torchvision

    for name in names:
        if ":" in name:
            raise ValueError(f"--compare {name}: profile builds peers with random weights (speed and memory do "
                             f"not depend on them); drop ':{name.partition(':')[2]}'")
        if not is_torchvision_model(name):
            import difflib

            known = torchvision.models.list_models(module=torchvision.models)  # slow: only on error
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown torchvision model {name!r} for --compare{hint}")


def _peer_size(name: str, resolution: int) -> int | None:
    """The size a peer is built for: ViTs have a fixed position grid, so one per resolution."""
    return resolution if is_vit(name) else None


def _build_peer(name: str, resolution: int) -> nn.Module:
    return build_peer(name, image_size=_peer_size(name, resolution))


_PEER_FLOPS: dict = {}


def peer_flops(name: str, resolution: int) -> tuple[int, int]:
    """(multiply-adds per image, params) of a torchvision model, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (name, resolution)
    if key not in _PEER_FLOPS:
        with torch.device("meta"):
            model = _build_peer(name, resolution).eval()
        x = torch.empty(1, 3, resolution, resolution, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        params = sum(p.numel() for p in model.parameters())
        _PEER_FLOPS[key] = (counter.get_total_flops() // 2, params)
    return _PEER_FLOPS[key]


class _ModelSlot:
    """Builds each model once per device (a ViT once per resolution) and releases it when done."""

    def __init__(self, name: str, family: str, options: ProfileOptions):
        self.name, self.family, self.options = name, family, options
        self._model: nn.Module | None = None
        self._key = None

    def get(self, resolution: int) -> nn.Module:
        key = _peer_size(self.name, resolution) if self.family == "torchvision" else None
        if self._model is None or key != self._key:
            self.release()
            if self.family == "vmamba":
                from vmamba_cli.model import create_model

                model = create_model(self.name)
            else:
                model = _build_peer(self.name, resolution)
            model = model.to(self.options.device).eval()
            if self.options.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self._model, self._key = model, key
        return self._model

    def release(self):
        self._model = None
        if self.options.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict:
    """Machine facts recorded with every profile (numbers mean little without them)."""
    device = torch.device(device)
    from vmamba_cli import kernels

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "scan_backend": kernels.resolve_backend("auto", device),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        from vmamba_cli import memory

        env["malloc_tuned"] = bool(getattr(memory, "_done", {}).get("result", False))
    except ImportError:
        pass
    return env


# ------------------------------------------------------------------------------------------------
# The profile
# ------------------------------------------------------------------------------------------------

def _with_oom_retry(runner, task: MeasureTask, slot: _ModelSlot, log) -> tuple[str, int, dict, str | None]:
    """Run ``runner(task)``, halving the batch on OOM. Returns (status, batch, result, error)."""
    batch = task.batch_size
    while True:
        task.batch_size = batch
        try:
            return "ok", batch, runner(task), None
        except Exception as exc:  # noqa: BLE001 - a failing row must not end the run
            if not is_out_of_memory(exc):
                return "error", batch, {}, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            task.model.zero_grad(set_to_none=True)
            if task.options.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            if batch == 1:
                return "OOM", batch, {}, "out of memory at batch 1"
            log(f"{task.model_name} @ {task.resolution}: out of memory at batch {batch} ({task.mode}); "
                f"retrying with {batch // 2}")
            batch //= 2


def _add_ratios(rows: list[dict]) -> None:
    references = {}
    for row in rows:
        if row["family"] == "vmamba":
            references.setdefault(row["resolution"], row)
    for row in rows:
        ref = references.get(row["resolution"])
        vs = {"reference": ref["model"] if ref else None}
        for key in RATIO_METRICS:
            a, b = row.get(key), ref.get(key) if ref else None
            vs[key] = (a / b) if (a is not None and b not in (None, 0)) else None
        row["vs"] = vs


def _compiled_row(row: dict, model: nn.Module, options: ProfileOptions, train: bool, runner, slot, log,
                  num_classes: int) -> dict:
    """``row``'s model under ``torch.compile``, measured like the eager one (no scan row): the first
    warm-up call compiles, so at least one warm-up runs."""
    keep = ("model", "family", "resolution", "device", "dtype", "requested_batch_size", "scan_backend", "flops",
            "flops_method", "params", "gflops")
    compiled_row = {key: row[key] for key in keep if key in row}
    compiled_row.update(compiled=True, runtime="compiled")
    compiled = torch.compile(model)
    opts = replace(options, warmup=max(1, options.warmup))
    name, resolution = row["model"], row["resolution"]
    log(f"{name} @ {resolution}x{resolution}, compiled (the first warm-up call compiles)")
    compiled_row.update(_measure_model(name, compiled, resolution, row["batch_size"], opts, train, num_classes,
                                       runner, slot, log))
    return compiled_row


def _measure_model(name: str, model: nn.Module, resolution: int, batch_size: int, options: ProfileOptions,
                   train: bool, num_classes: int, runner, slot, log) -> dict:
    """Inference (and with ``train`` a training step) of one model, each retried at smaller batches on
    OOM: the row fields ``status``, ``batch_size``, ``error`` and the measured figures."""
    extra = {"num_classes": num_classes}
    status, used, result, error = _with_oom_retry(
        runner, MeasureTask(name, model, resolution, batch_size, "inference", options, extra), slot, log)
    fields = dict(status=status, batch_size=used, error=error, **result)
    if status == "ok" and train:
        t_status, t_used, t_result, t_error = _with_oom_retry(
            runner, MeasureTask(name, model, resolution, used, "train", options, extra), slot, log)
        fields.update(train_status=t_status, train_batch_size=t_used, train_error=t_error, **t_result)
    return fields


def _onnxruntime_row(eager: dict, model: nn.Module, resolution: int, batch_size: int, options: ProfileOptions,
                     threads: int | None, runner: Callable[[MeasureTask], dict], log, exported: dict) -> dict:
    """The onnxruntime row of one VMamba model at one resolution (CPU, float32, the eager row's weights)."""
    name = eager["model"]
    row = {key: eager.get(key) for key in ("model", "family", "resolution", "requested_batch_size", "flops",
                                           "flops_method", "gflops", "params")}
    row.update(runtime="onnxruntime", device="cpu", dtype="float32", scan_backend="onnx (Scans per line)")
    try:
        if "module" not in exported:
            log(f"{name}: exporting to ONNX for onnxruntime")
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(model, os.path.join(tmp, "model.onnx"), name=name,
                                   resolution=max(64, resolution - resolution % 32))
                exported["module"] = load_onnx(path, threads=threads).model
    except Exception as exc:  # noqa: BLE001 - a failing row must not end the run
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row
    cpu_options = ProfileOptions(device=torch.device("cpu"), warmup=options.warmup, iters=options.iters)
    task = MeasureTask(name, exported["module"], resolution, batch_size, "inference", cpu_options)
    status, used, result, error = _with_oom_retry(runner, task, None, log)
    row.update(status=status, batch_size=used, error=error, **result)
    return row


def profile(models: Sequence[str] = ("vmamba-tiny",), resolutions: Sequence[int] = (224,), *,
            compare: Sequence[str] = (), batch_size: int | None = None, device: str | torch.device = "auto",
            dtype: str = "float32", train: bool = False, warmup: int | None = None, iters: int | None = None,
            threads: int | None = None, channels_last: bool = False, scan_bandwidth: bool = True,
            bandwidth_gbs: float | None = None, runner: Callable[[MeasureTask], dict] | None = None,
            log: Callable[[str], None] | None = None, on_row: Callable[[dict], None] | None = None,
            compile: bool = False, runtimes: Sequence[str] = ()) -> list[dict]:
    """Measure every model (VMamba names, then torchvision ``compare`` names) at every resolution.

    Defaults: batch 1 / warm-up 2 / 5 timed runs on CPU, batch 32 / 10 / 30 on CUDA. ``dtype`` other
    than float32 runs under autocast. ``runner`` replaces the measuring function (tests inject OOM).
    Returns one dict per (model, resolution), VMamba models first, each with ``vs`` ratios against
    the first VMamba model at the same resolution. ``compile`` adds a row per model measured under
    ``torch.compile`` (``"compiled": True``) after its eager row; its warm-up includes the compile.
    ``runtimes`` ("onnxruntime") adds, after each VMamba model's eager row, a row for the same weights
    in that runtime (``runtime`` key; the model is exported once to a temporary ONNX file, dynamic in
    size, and run by onnxruntime on the CPU).
    """
    from vmamba_cli import kernels
    from vmamba_cli.model import get_model_spec, resolve_model_name

    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not models and not compare:
        raise ValueError("nothing to profile: give at least one --model or --compare")
    resolutions = [int(r) for r in resolutions]
    for r in resolutions:
        if r < 32:
            raise ValueError(f"resolution {r} is too small (VMamba downsamples by 32)")
    names = [resolve_model_name(m) for m in models]
    _check_peers(compare)
    unknown = [r for r in runtimes if r not in EXTRA_RUNTIMES]
    if unknown:
        raise ValueError(f"unknown runtime {unknown[0]!r}; choose from torch, {', '.join(EXTRA_RUNTIMES)}")
    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    options = ProfileOptions(
        device=device, dtype=dtype,
        warmup=(10 if on_cuda else 2) if warmup is None else int(warmup),
        iters=(30 if on_cuda else 5) if iters is None else int(iters),
        channels_last=channels_last, scan_bandwidth=scan_bandwidth, bandwidth_gbs=bandwidth_gbs,
    )
    batch_size = (32 if on_cuda else 1) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    runner = runner or measure
    scan_backend = kernels.resolve_backend("auto", device)
    if scan_bandwidth and names and bandwidth_gbs is None:
        options.bandwidth_gbs = measure_bandwidth(device)
        log(f"memory bandwidth (copy): {options.bandwidth_gbs:.1f} GB/s")

    rows: list[dict] = []
    exported: dict = {}                 # the ONNX model of the current VMamba model, exported once
    entries = [(n, "vmamba") for n in names] + [(n, "torchvision") for n in compare]
    for name, family in entries:
        slot = _ModelSlot(name, family, options)
        for resolution in resolutions:
            log(f"{name} @ {resolution}x{resolution}")
            row = {"model": name, "family": family, "resolution": resolution, "device": str(device),
                   "dtype": dtype, "requested_batch_size": batch_size,
                   "scan_backend": scan_backend if family == "vmamba" else None}
            try:
                if family == "vmamba":
                    spec = get_model_spec(name)
                    row["flops"] = count_flops(spec.config, resolution)
                    row["flops_method"] = "closed form, official fvcore convention"
                else:
                    row["flops"], row["params"] = peer_flops(name, resolution)
                    row["flops_method"] = "FlopCounterMode / 2 (multiply-adds)"
                model = slot.get(resolution)
                row["params"] = sum(p.numel() for p in model.parameters())
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}")
                    rows.append(row)
                    if on_row:
                        on_row(row)
                    continue
                row.update(status="OOM", error="out of memory while building the model")
                rows.append(row)
                continue
            row["gflops"] = row["flops"] / 1e9 if row.get("flops") is not None else None

            num_classes = getattr(getattr(model, "config", None), "num_classes", 1000)
            row.update(_measure_model(name, model, resolution, batch_size, options, train, num_classes, runner,
                                      slot, log))
            status, used = row["status"], row["batch_size"]
            if status == "ok" and family == "vmamba" and scan_bandwidth:
                task = MeasureTask(name, model, resolution, used, "scan", options)
                s_status, _, s_result, s_error = _with_oom_retry(runner, task, slot, log)
                row.update(s_result)
                if s_status != "ok":
                    row["scan_error"] = s_error
                row["bandwidth_gbs"] = options.bandwidth_gbs
                if row.get("scan_gbs") and options.bandwidth_gbs:
                    row["scan_bandwidth_fraction"] = row["scan_gbs"] / options.bandwidth_gbs
            rows.append(row)
            if on_row:
                on_row(row)
            if compile and status == "ok":
                compiled_row = _compiled_row(row, model, options, train, runner, slot, log, num_classes)
                rows.append(compiled_row)
                if on_row:
                    on_row(compiled_row)
            if family == "vmamba" and "onnxruntime" in runtimes:
                onnx_row = _onnxruntime_row(row, model, resolution, batch_size, options, threads, runner, log,
                                            exported)
                rows.append(onnx_row)
                if on_row:
                    on_row(onnx_row)
        slot.release()
        exported.clear()
    _add_ratios(rows)
    return rows


def csv_columns(rows: list[dict]) -> list[str]:
    """Column order for CSV output: the fixed leading fields, then everything else, then ratios."""
    lead = ["model", "family", "resolution", "status", "batch_size", "params", "flops", "gflops", "latency_ms",
            "images_per_s", "peak_memory_mb", "train_images_per_s", "train_step_ms", "train_peak_memory_mb",
            "scan_gbs", "scan_bandwidth_fraction", "bandwidth_gbs", "scan_ms", "scan_bytes", "scan_op",
            "scan_backend", "device", "dtype"]
    seen = set(lead)
    rest = []
    for row in rows:
        for key in row:
            if key not in seen and key != "vs":
                seen.add(key)
                rest.append(key)
    return lead + rest + ["vs_reference"] + [f"vs_{k}" for k in RATIO_METRICS]


def flatten_row(row: dict) -> dict:
    flat = {k: v for k, v in row.items() if k != "vs"}
    vs = row.get("vs") or {}
    flat["vs_reference"] = vs.get("reference")
    for key in RATIO_METRICS:
        flat[f"vs_{key}"] = vs.get(key)
    return flat


# ------------------------------------------------------------------------------------------------
# Cost against pixel count: fitted exponents and crossovers
# ------------------------------------------------------------------------------------------------

# (row field, name in the report, how a value becomes a cost): time per image is 1 / images/s.
SCALING_METRICS = (
    ("flops", "flops", lambda v: v),
    ("images_per_s", "time", lambda v: 1.0 / v),
    ("peak_memory_mb", "memory", lambda v: v),
    ("train_images_per_s", "train_time", lambda v: 1.0 / v),
    ("train_peak_memory_mb", "train_memory", lambda v: v),
)
# Crossovers are named for these: (row field, higher is better).
CROSSOVER_METRICS = (("images_per_s", True), ("peak_memory_mb", False))


def fit_exponent(pixels: Sequence[float], costs: Sequence[float]) -> dict | None:
    """Least-squares slope of log(cost) against log(pixels): cost ~ a * pixels ** exponent.

    About 1 for a cost linear in pixel count, 2 for one quadratic in it (global attention once the
    attention term dominates). Points with a non-positive or missing cost are left out. Returns
    ``{"exponent", "r2", "points"}``, or None with fewer than two distinct pixel counts.
    """
    pts = [(float(p), float(c)) for p, c in zip(pixels, costs)
           if p is not None and c is not None and p > 0 and c > 0 and math.isfinite(c)]
    if len({p for p, _ in pts}) < 2:
        return None
    xs = [math.log(p) for p, _ in pts]
    ys = [math.log(c) for _, c in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    syy = sum((y - my) ** 2 for y in ys)
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - residual / syy if syy > 0 else 1.0
    return {"exponent": slope, "r2": r2, "points": len(pts)}


def crossover(points: Sequence[tuple[int, float | None, float | None]], higher_is_better: bool) -> dict:
    """Where the reference (VMamba) overtakes a peer, from ``(resolution, reference value, peer value)``.

    A value of None means that side did not fit in memory at that resolution (it counts as
    infinitely worse); points where both are None are dropped. The reference is *ahead* at a
    resolution when it is strictly better there. Result ``status``:

    * ``"ahead_throughout"``: ahead at every resolution measured;
    * ``"overtakes"``: behind at some resolution and ahead from ``resolution`` on to the largest;
      ``estimated_resolution`` interpolates the point of equality linearly in log(ratio) against
      log(pixels) between the last resolution behind and ``resolution`` (None when one side was OOM);
    * ``"behind_at_largest"``: not ahead at the largest resolution measured (it may have been ahead
      in between); ``"no_data"`` when nothing is comparable.

    ``advantage`` per resolution is reference/peer for higher-is-better metrics and peer/reference
    otherwise (above 1: the reference is better; inf/0 when one side was OOM).
    """
    rows = sorted((r, a, b) for r, a, b in points if not (a is None and b is None))
    if not rows:
        return {"status": "no_data", "resolution": None, "estimated_resolution": None, "advantage": []}

    def advantage(a, b):
        if a is None:
            return 0.0
        if b is None:
            return math.inf
        good, bad = (a, b) if higher_is_better else (b, a)
        return good / bad if bad > 0 else math.inf

    adv = [advantage(a, b) for _, a, b in rows]
    ahead = [x > 1.0 for x in adv]
    table = [{"resolution": r, "advantage": x} for (r, _, _), x in zip(rows, adv)]
    if all(ahead):
        return {"status": "ahead_throughout", "resolution": None, "estimated_resolution": None,
                "advantage": table}
    if not ahead[-1]:
        return {"status": "behind_at_largest", "resolution": None, "estimated_resolution": None, "advantage": table}
    first = max(i for i, a in enumerate(ahead) if not a) + 1
    estimate = None
    lo, hi = adv[first - 1], adv[first]
    if 0 < lo and math.isfinite(hi):
        x0, x1 = 2 * math.log(rows[first - 1][0]), 2 * math.log(rows[first][0])
        y0, y1 = math.log(lo), math.log(hi)
        estimate = math.exp((x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0)) / 2) if y1 != y0 else None
    return {"status": "overtakes", "resolution": rows[first][0], "estimated_resolution": estimate,
            "advantage": table}


def _fit_rows(rows: list[dict], field: str) -> list[dict]:
    """Rows of one model usable for ``field``; memory only at the model's most common batch size
    (an OOM retry at a smaller batch would otherwise bend the curve)."""
    if field == "flops":  # counted, not measured: known for rows that ran out of memory too
        return [r for r in rows if r.get("flops") is not None]
    ok = [r for r in rows if r.get(field) is not None and r.get("status") == "ok"]
    if "memory" in field and ok:
        key = "train_batch_size" if field.startswith("train") else "batch_size"
        sizes = [r.get(key) for r in ok]
        common = max(set(sizes), key=lambda b: (sizes.count(b), b or 0))
        ok = [r for r in ok if r.get(key) == common]
    return ok


def scaling_report(rows: list[dict]) -> dict:
    """Exponents of cost against pixel count per model, and where VMamba overtakes each peer.

    ``models``: one entry per model with ``flops_exponent`` (from the counted FLOPs: machine-free),
    ``time_exponent``, ``memory_exponent`` (and the training ones when measured): ``fit_exponent``
    over the resolutions where the model ran. ``crossovers``:
    one entry per other model against the reference (the first VMamba model) for images/s and for
    peak memory (``crossover``); a row that ran out of memory counts as the worse side. Memory is
    compared only where both rows ran at the same batch size.
    """
    names = list(dict.fromkeys(r["model"] for r in rows))
    reference = next((r["model"] for r in rows if r.get("family") == "vmamba"), None)
    models = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        entry = {"model": name, "family": mine[0].get("family"),
                 "resolutions": [r["resolution"] for r in mine if r.get("status") == "ok"]}
        for field, label, cost in SCALING_METRICS:
            usable = _fit_rows(mine, field)
            fit = fit_exponent([r["resolution"] ** 2 for r in usable], [cost(r[field]) for r in usable])
            if fit is None and field.startswith("train"):
                continue
            entry[f"{label}_exponent"] = None if fit is None else fit["exponent"]
            entry[f"{label}_fit"] = fit
        models.append(entry)
    crossovers = []
    if reference is not None:
        ref_rows = {r["resolution"]: r for r in rows if r["model"] == reference}
        for name in names:
            if name == reference:
                continue
            entry = {"model": name, "reference": reference}
            for field, higher in CROSSOVER_METRICS:
                points = []
                for r in (r for r in rows if r["model"] == name):
                    ref = ref_rows.get(r["resolution"])
                    if ref is None or "error" == r.get("status") or "error" == ref.get("status"):
                        continue
                    a = ref.get(field) if ref.get("status") == "ok" else None
                    b = r.get(field) if r.get("status") == "ok" else None
                    if ref.get("status") == "ok" and a is None or r.get("status") == "ok" and b is None:
                        continue  # measured but without this field (e.g. memory unavailable)
                    if field == "peak_memory_mb" and a is not None and b is not None \
                            and ref.get("batch_size") != r.get("batch_size"):
                        continue
                    points.append((r["resolution"], a, b))
                entry[field] = crossover(points, higher)
            crossovers.append(entry)
    return {"reference": reference, "cost": "time per image = 1 / images_per_s; memory = peak_memory_mb",
            "fit": "least squares of log(cost) on log(pixels)", "models": models, "crossovers": crossovers}


def describe_crossover(result: dict) -> str:
    """A table cell for one ``crossover`` result."""
    status = result["status"]
    if status == "ahead_throughout":
        return "ahead throughout"
    if status == "overtakes":
        estimate = result.get("estimated_resolution")
        return f"from {result['resolution']}" + (f" (~{estimate:.0f})" if estimate else "")
    if status == "behind_at_largest":
        return "not within range"
    return "-"


def plot_scaling(rows: list[dict], path, title: str | None = None, report: dict | None = None):
    """Time per image and peak memory against pixel count, log-log, one line per model; the legend
    carries each model's fitted exponents, and dotted guides show slopes 1 and 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vmamba_cli.weights import atomic_write

    report = report or scaling_report(rows)
    exponents = {m["model"]: m for m in report["models"]}
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    models = list(dict.fromkeys(r["model"] for r in rows))
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        style = "-o" if mine[0]["family"] == "vmamba" else "--s"
        for ax, field, cost, key in ((ax_time, "images_per_s", lambda v: 1e3 / v, "time_exponent"),
                                     (ax_mem, "peak_memory_mb", lambda v: v, "memory_exponent")):
            pts = [(r["resolution"] ** 2, cost(r[field])) for r in _fit_rows(mine, field) if r[field] > 0]
            if pts:
                exponent = exponents.get(name, {}).get(key)
                label = name + ("" if exponent is None else f" (slope {exponent:.2f})")
                ax.plot(*zip(*pts), style, label=label, markersize=4)
    pixels = sorted({r["resolution"] ** 2 for r in rows})
    for ax, label in ((ax_time, "time per image (ms)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        lines = ax.get_lines()
        if lines and len(pixels) > 1:
            y0 = min(float(line.get_ydata()[0]) for line in lines)
            for slope, text in ((1, "slope 1"), (2, "slope 2")):
                ax.plot(pixels, [y0 * (p / pixels[0]) ** slope for p in pixels], ":", color="grey",
                        linewidth=0.8)
                ax.annotate(text, (pixels[-1], y0 * (pixels[-1] / pixels[0]) ** slope), fontsize=7,
                            color="grey", ha="right", va="bottom")
        ax.set_xticks(pixels, [f"{round(p ** 0.5)}²" for p in pixels], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("pixels (resolution²)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png")

    try:
        return atomic_write(path, write)
    finally:
        plt.close(fig)
