"""GPU benchmark of the Triton selective scan and of vmamba-tiny against torchvision swin_t.

    python benchmarks/bench_scan_gpu.py                          # scan + models, one table
    python benchmarks/bench_scan_gpu.py --sweep --pick           # + launch sweep; models use the fastest
    python benchmarks/bench_scan_gpu.py --skip-models --torch-baseline --json   # scan vs PyTorch only
    bash benchmarks/gpu_session.sh --sweep --pick --profile      # GPU tests first, then this

Scan shapes (bf16 u / delta / B / C, float32 A / D / delta_bias, softplus, float32 output):
  * VMamba-T stage 0 at 224x224, batch 128: (B=128, K*D=384, N=1, L=3136)
  * stage 0 at 1024x1024, batch 1:           (B=1,   K*D=384, N=1, L=65536)

Achieved GB/s uses the minimum traffic of the op (state on chip): forward reads u, delta, B, C and
writes y; backward reads u, delta, B, C, dy and writes du, ddelta, dB, dC. It is printed against the
datasheet bandwidth (--peak-gbs, by GPU name) and a device-to-device copy measured in the same run.
Time = CUDA events around back-to-back calls (docs/design.md §7's method). Models follow §7: inference
fp32, eval, no_grad, batch 128; training = forward + backward under autocast (float16) with
CrossEntropyLoss, no optimizer step. --composed adds vmamba-tiny with the composed SS2D core
(cross-scan copies) and with delta from a batched matmul instead of the scan kernel's projection
(inference, ``fused_dt_proj`` off) to the model table; --host-probe adds batch-4 steps; --graphs
times both models' steps replayed from CUDA graphs. Every variant is a ``TritonTuning`` passed to
the kernels (``dataclasses.replace(DEFAULT_TUNING, ...)``); --pick carries the fastest swept launches
into the model runs. --warm-jobs compiles every kernel first in parallel processes (Triton's
cache), --profile prints the top kernels of one inference batch and one training step and both
models' kernel time per step, --cross-sweep times cross-scan launch shapes. Without a CUDA device
(or without triton) the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys

import torch


def _time_cuda(fn, warmup: int, iters: int) -> float:
    """Milliseconds per call of fn(), run iters times back to back after warmup calls.

    As docs/design.md §7 times models: synchronize before and after the timed loop only, so the host's work
    for the next call overlaps the GPU's work on this one, as in a training or inference loop.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _scan_inputs(batch, groups, per_group, d_state, length, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    channels = groups * per_group

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    return {
        "u": randn(batch, channels, length).to(dtype),
        "delta": (randn(batch, channels, length) * 0.5 - 2.0).to(dtype),
        "A": -torch.exp(randn(channels, d_state) * 0.5),
        "B": randn(batch, groups, d_state, length).to(dtype),
        "C": randn(batch, groups, d_state, length).to(dtype),
        "D": randn(channels),
        "delta_bias": randn(channels) * 0.5,
    }


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), 3, 10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@contextlib.contextmanager
def _model_tuning(model, tuning):
    """Run ``model``'s SS2D cores with ``tuning`` for a block, then with the defaults again."""
    model.set_scan_tuning(tuning)
    try:
        yield
    finally:
        model.set_scan_tuning(None)


def bench_scan(name, batch, groups, per_group, d_state, length, args, backend="triton", launch=None, tuning=None):
    """Forward / backward rows; ``launch`` = dict(block_d=, block_t=, num_warps=, maxnreg=) for the
    triton backend (set for the forward and backward through a tuning object)."""
    from vmamba_cli.kernels import selective_scan
    from vmamba_cli.kernels import triton as scan_triton

    device = torch.device("cuda")
    x = _scan_inputs(batch, groups, per_group, d_state, length, torch.bfloat16, device)
    order = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    leaves = [x[k].requires_grad_(True) for k in order]

    launch = dict(launch or {})

    maxnreg = launch.pop("maxnreg", None)
    tuning = tuning or scan_triton.DEFAULT_TUNING
    if launch:
        # Register caps are tuning entries, not selective_scan arguments: the launch as tables.
        tiles = (launch["block_t"], launch["block_d"], launch["num_warps"], maxnreg)
        tuning = dataclasses.replace(tuning, n1_inference_tiles=tiles, n1_training_tiles=tiles,
                                     n1_backward_launch=(launch["block_d"], launch["num_warps"], maxnreg))

    def forward():
        if launch:
            return scan_triton.selective_scan(*leaves, delta_softplus=True, block_t=launch["block_t"],
                                              tuning=tuning)
        if backend == "triton":
            return selective_scan(*leaves, delta_softplus=True, backend=backend, tuning=tuning)
        return selective_scan(*leaves, delta_softplus=True, backend=backend)

    with torch.no_grad():
        fwd_ms = _time_cuda(forward, args.warmup, args.iters)
    y = forward()
    dout = torch.randn_like(y)

    def backward():
        torch.autograd.grad(y, leaves, dout, retain_graph=True)

    bwd_ms = _time_cuda(backward, args.warmup, args.iters)
    u, delta, B, C = x["u"], x["delta"], x["B"], x["C"]
    fwd_bytes = _nbytes(u, delta, B, C, y)
    # dB and dC are produced in float32; du and ddelta in the input dtype.
    bwd_bytes = _nbytes(u, delta, B, C, dout, u, delta) + 2 * B.numel() * 4
    rows = []
    for phase, ms, nbytes in (("fwd", fwd_ms, fwd_bytes), ("bwd", bwd_ms, bwd_bytes)):
        gbs = nbytes / (ms * 1e-3) / 1e9
        label = (backend if not launch else
                 f"d{launch['block_d']}/t{launch['block_t']}/w{launch['num_warps']}/r{maxnreg}")
        rows.append({"case": name, "backend": label, "phase": phase, "ms": round(ms, 4),
                     "launch": {**launch, "maxnreg": maxnreg} if launch else None,
                     "min_bytes_MB": round(nbytes / 1e6, 1), "GB/s": round(gbs, 1),
                     "pct_peak": round(100 * gbs / args.peak_gbs, 1),
                     "pct_copy": round(100 * gbs / args.copy_gbs, 1)})
    return rows


# Launch configurations tried by --sweep at the batch-128 stage-0 shape (96 channels per direction).
# Launch variants tried by --sweep at the batch-128 stage-0 shape (96 channels per direction):
# block_t 32 = the training tiles (forward + backward), 128 = the inference forward.
SWEEP = [dict(block_d=d, block_t=t, num_warps=w, maxnreg=r) for d, t, w, r in (
    (16, 32, 2, None), (16, 32, 2, 96), (16, 32, 2, 80), (16, 32, 2, 64), (8, 32, 1, 64), (16, 32, 4, 64),
    (32, 32, 4, 64), (8, 32, 2, 64), (16, 32, 4, 48),
    (8, 128, 2, None), (8, 128, 2, 80), (8, 128, 2, 64), (8, 128, 4, 64), (16, 128, 4, 64))]


def _pick_launches(rows, tuning):
    """``tuning`` with the fastest swept N = 1 launches (--pick)."""
    def best(block_t, phase):
        timed = [r for r in rows if r.get("launch") and r["launch"]["block_t"] == block_t and r["phase"] == phase]
        return min(timed, key=lambda r: r["ms"])["launch"] if timed else None

    train_fwd, train_bwd, infer_fwd = best(32, "fwd"), best(32, "bwd"), best(128, "fwd")
    if train_fwd:
        tuning = dataclasses.replace(tuning, n1_training_tiles=(
            32, train_fwd["block_d"], train_fwd["num_warps"], train_fwd["maxnreg"]))
    if train_bwd:
        tuning = dataclasses.replace(tuning, n1_backward_launch=(
            train_bwd["block_d"], train_bwd["num_warps"], train_bwd["maxnreg"]))
    if infer_fwd:
        tuning = dataclasses.replace(tuning, n1_inference_tiles=(
            128, infer_fwd["block_d"], infer_fwd["num_warps"], infer_fwd["maxnreg"]))
    print(f"picked: n1_inference_tiles = {tuning.n1_inference_tiles}, "
          f"n1_training_tiles = {tuning.n1_training_tiles}, "
          f"n1_backward_launch = {tuning.n1_backward_launch}", file=sys.stderr, flush=True)
    return tuning


# Launches of the fused SS2D core's forward (u read from the map) tried by --map-sweep: tiles
# (BLOCK_T, BLOCK_D, num_warps, maxnreg) without / with a backward to follow. The first of each is
# the default. (Its backward runs the plain kernel on sequence-ordered copies: --sweep covers it.)
MAP_SWEEP = (
    [("fwd-infer", v) for v in ((128, 8, 2, 80), (128, 8, 2, None), (128, 16, 2, None), (128, 16, 4, None),
                                (64, 16, 2, None), (64, 8, 2, 80))]
    + [("fwd-train", v) for v in ((32, 16, 2, 96), (32, 8, 2, 64), (32, 16, 4, None), (32, 32, 4, None),
                                  (32, 8, 2, None))]
)
# The tuning entries of each phase: on the map, and the same launch on sequence-ordered data.
_MAP_FIELDS = {"fwd-infer": ("n1_map_inference_tiles", "n1_inference_tiles"),
               "fwd-train": ("n1_map_training_tiles", "n1_training_tiles")}


def _map_case(batch=128, d_inner=96, height=56, width=56, dtype=torch.bfloat16):
    """Fused-core scan inputs at VMamba-T stage 0: x and dout as channels-last maps."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    length, channels = height * width, 4 * d_inner

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    return {
        "x": randn(batch, d_inner, height, width).to(dtype).contiguous(memory_format=torch.channels_last),
        "delta": (randn(batch, channels, length) * 0.5 - 2.0).to(dtype),
        "A": -torch.exp(randn(channels, 1) * 0.5),
        "B": randn(batch, 4, 1, length).to(dtype),
        "C": randn(batch, 4, 1, length).to(dtype),
        "D": randn(channels),
        "delta_bias": randn(channels) * 0.5,
        "dout": randn(batch, d_inner, height, width).contiguous(memory_format=torch.channels_last),
    }


def bench_map_variant(phase, launch, args, case=None, sequence_order=False, tuning=None):
    """Milliseconds of one fused-core scan forward with one launch (passed in a tuning object).
    sequence_order: the same data laid out by the cross-scan, plain kernels."""
    from vmamba_cli.kernels import triton as st
    from vmamba_cli.kernels.triton import launch as scan_launch

    case = case or _map_case(dtype=torch.float32 if phase == "fwd-infer" else torch.bfloat16)
    x = case["x"]
    batch, d_inner, height, width = x.shape
    length = height * width
    scan_args = [case[k] for k in ("delta", "A", "B", "C", "D", "delta_bias")]
    map_field, sequence_field = _MAP_FIELDS[phase]
    tuning = dataclasses.replace(tuning or st.DEFAULT_TUNING, **{map_field: launch, sequence_field: launch})
    if sequence_order:
        x = st.cross_scan(x, tuning=tuning).view(batch, 4 * d_inner, length)
    cfg = st.choose_scan_config(batch, 4, d_inner, 1, length, x.device, training=phase != "fwd-infer",
                                map_io=not sequence_order, tuning=tuning)

    def fn():
        scan_launch.scan_forward(x, *scan_args, True, torch.float32, cfg, phase == "fwd-train")
    return _time_cuda(fn, args.warmup, args.iters)


def bench_map_sweep(args, tuning, pick=False):
    """Time every MAP_SWEEP launch (and the default one on sequence-ordered data); returns the rows
    and ``tuning``, with the fastest launch of each phase if ``pick``."""
    rows = []
    cases = {}
    for phase, launch in MAP_SWEEP:
        dtype = torch.float32 if phase == "fwd-infer" else torch.bfloat16
        case = cases.setdefault(dtype, _map_case(dtype=dtype))
        first = launch == next(v for p, v in MAP_SWEEP if p == phase)
        for sequence_order in ((False, True) if first else (False,)):
            try:
                ms = bench_map_variant(phase, launch, args, case, sequence_order, tuning)
            except Exception as exc:  # a launch that does not compile or run is reported, not fatal
                print(f"map sweep {phase} {launch}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      file=sys.stderr)
                continue
            layout = "sequence" if sequence_order else "map"
            rows.append({"phase": phase, "launch": list(launch), "layout": layout, "ms": round(ms, 4)})
            print(f"fused-core scan {phase:<9} {layout:<8} {str(launch):<22} {ms:8.3f} ms", file=sys.stderr, flush=True)
    if pick:
        for phase, (field, _) in _MAP_FIELDS.items():
            timed = [r for r in rows if r["phase"] == phase and r["layout"] == "map"]
            if timed:
                best = min(timed, key=lambda r: r["ms"])
                tuning = dataclasses.replace(tuning, **{field: tuple(best["launch"])})
        print("picked: " + ", ".join(f"{f} = {getattr(tuning, f)}" for f, _ in _MAP_FIELDS.values()),
              file=sys.stderr, flush=True)
    return rows, tuning


# Cross-scan launch variants (block_c, block_hw, num_warps) tried by --cross-sweep.
CROSS_SWEEP = [(16, 16, 4), (32, 8, 4), (8, 16, 4), (32, 16, 8), (16, 8, 2), (64, 8, 4), (4, 32, 4)]


def bench_cross(args):
    """Cross-scan / merge of a VMamba-T stage-0 map (batch 128, 96 x 56 x 56, float32, channels-last)."""
    from vmamba_cli.kernels.triton import DEFAULT_TUNING
    from vmamba_cli.kernels.triton.cross_scan import merge_layout, scan_layout

    x = torch.randn(args.batch, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    seq = scan_layout(x)
    nbytes = 5 * x.numel() * x.element_size()
    rows = []

    def row(name, ms):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({"op": name, "ms": round(ms, 4), "GB/s": round(gbs, 1), "pct_copy": round(100 * gbs / args.copy_gbs, 1)})
        print(f"cross {name:<34} {ms:8.3f} ms {gbs:8.1f} GB/s {100 * gbs / args.copy_gbs:6.1f}% copy",
              file=sys.stderr, flush=True)

    nchw = dataclasses.replace(DEFAULT_TUNING, cross_scan_launch=(1, 32, 4))
    row("scan nchw (contiguous() + kernel)", _time_cuda(lambda: scan_layout(x.contiguous(), nchw), 3, 10))
    for launch in CROSS_SWEEP:
        block_c, block_hw, warps = launch
        tuning = dataclasses.replace(DEFAULT_TUNING, cross_scan_launch=launch, cross_merge_launch=launch)
        row(f"scan c{block_c}/hw{block_hw}/w{warps}", _time_cuda(lambda: scan_layout(x, tuning), 3, 10))
        row(f"merge c{block_c}/hw{block_hw}/w{warps}", _time_cuda(lambda: merge_layout(seq, 56, 56, tuning), 3, 10))
    return rows


def ncu_target(args):
    """One launch of each hot kernel at the batch-128 stage-0 shape, for Nsight Compute."""
    from vmamba_cli.kernels import triton as scan_triton
    from vmamba_cli.kernels.triton.cross_scan import merge_layout, scan_layout

    x = _scan_inputs(args.batch, 4, 96, 1, 3136, torch.bfloat16, torch.device("cuda"))
    leaves = [x[k].requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    for _ in range(2):
        y = scan_triton.selective_scan(*leaves, delta_softplus=True)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
        with torch.no_grad():
            scan_triton.selective_scan(*leaves, delta_softplus=True)
    fmap = torch.randn(args.batch, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        seq = scan_layout(fmap)
        merge_layout(seq, 56, 56)
    torch.cuda.synchronize()


_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "4090": 1008.0}
_CASES = (("224px b128 stage0", 128, 4, 96, 1, 3136), ("1024px b1 stage0", 1, 4, 96, 1, 65536))


# SS2D core variants compared by --composed: tuning fields changed from the run's tuning.
_COMPOSED = {"fused_cross_scan": False}
_DELTA_MATMUL = {"fused_dt_proj": False}


def _warm_jobs_list(args):
    jobs = [("case", 0), ("case", 1)]
    if args.sweep:
        jobs += [("sweep", i) for i in range(len(SWEEP))]
    if args.map_sweep:
        jobs += [("map", i) for i in range(len(MAP_SWEEP))]
    if not args.skip_models or args.profile:
        jobs += [("model", 0)]
    return jobs


def _warm_one(index, args):
    kind, i = _warm_jobs_list(args)[index]
    args.warmup, args.iters = 1, 1
    if kind == "case":
        bench_scan(*_CASES[i], args)
    elif kind == "sweep":
        bench_scan(*_CASES[0], args, launch=SWEEP[i])
    elif kind == "map":
        phase, launch = MAP_SWEEP[i]
        if launch == next(v for p, v in MAP_SWEEP if p == phase):
            bench_map_variant(phase, launch, args, sequence_order=True)
        bench_map_variant(phase, launch, args)
    else:
        from vmamba_cli.model import create_model

        model = create_model("vmamba-tiny").cuda()
        args.model_warmup, args.model_iters = 1, 1
        from vmamba_cli.kernels.triton import DEFAULT_TUNING

        for switches in ({}, _COMPOSED, _DELTA_MATMUL) if args.composed else ({},):
            with _model_tuning(model, dataclasses.replace(DEFAULT_TUNING, **switches)):
                _throughput(model, args.batch, 224, args, train=False)
                _throughput(model, args.batch, 224, args, train=True)


def warm_caches(args):
    """Compile the kernels every later measurement needs in parallel processes (one per job)."""
    import subprocess
    import time

    start = time.perf_counter()
    jobs = _warm_jobs_list(args)
    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch)]
    base += ["--sweep"] if args.sweep else []
    base += ["--composed"] if args.composed else []
    base += ["--map-sweep"] if args.map_sweep else []
    base += ["--skip-models"] if args.skip_models and not args.profile else []
    running, failed = [], 0
    for index in range(len(jobs)):
        running.append(subprocess.Popen(base + ["--warm-one", str(index)]))
        if len(running) >= args.warm_jobs:
            failed += running.pop(0).wait() != 0
    failed += sum(p.wait() != 0 for p in running)
    print(f"warmed {len(jobs)} jobs in {time.perf_counter() - start:.0f} s ({failed} failed)",
          file=sys.stderr, flush=True)


def profile_models(args, out_dir):
    """Top CUDA kernels of one vmamba-tiny inference batch and one AMP training step, and the total
    kernel time of both steps for vmamba-tiny and swin_t (what a step costs when the host keeps up)."""
    import torchvision
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from vmamba_cli.model import create_model

    tables = {}
    for model_name, build in (("vmamba-tiny", lambda: create_model("vmamba-tiny")),
                              ("swin_t", lambda: torchvision.models.swin_t())):
        model = build().cuda()
        for name, train in (("inference_fp32", False), ("train_amp", True)):
            step = _model_step(model, args.batch, 224, train)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernel_ms = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx",
                                                                  "cuLaunchKernel"))
            print(f"kernel time {model_name:<12} {name:<15} {kernel_ms:8.1f} ms per batch of {args.batch}, "
                  f"{launches} launches", file=sys.stderr, flush=True)
            if model_name != "vmamba-tiny":
                continue
            table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60)
            tables[name] = table
            if out_dir:
                with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
                    f.write(table)
        del model
        torch.cuda.empty_cache()
    return tables


def _model_step(model, batch, size, train: bool, autocast_cache: bool = True):
    """One docs/design.md §7 step on random images: fp32 inference under no_grad, or an AMP (float16) forward
    + backward with CrossEntropyLoss, no optimizer step. Puts the model in the matching mode."""
    device = torch.device("cuda")
    images = torch.randn(batch, 3, size, size, device=device)
    model.train(train)
    if not train:
        def step():
            with torch.no_grad():
                model(images)
        return step
    target = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=autocast_cache):
            loss = loss_fn(model(images), target)
        loss.backward()
    return step


def _graphed_throughput(model, batch, size, args, train: bool):
    """img/s of the same steps as _throughput, captured once as a CUDA graph and replayed: the
    GPU's time per step without the host's (Python, autograd, launches). Autocast's weight cache
    is off, as graph capture requires."""
    step = _model_step(model, batch, size, train, autocast_cache=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = _time_cuda(graph.replay, 3, args.model_iters)
    return batch / (ms * 1e-3)


def _throughput(model, batch, size, args, train: bool):
    step = _model_step(model, batch, size, train)
    torch.cuda.reset_peak_memory_stats()
    ms = _time_cuda(step, args.model_warmup, args.model_iters)
    return batch / (ms * 1e-3), torch.cuda.max_memory_allocated() / 2**20


def bench_models(args, tuning):
    import torchvision

    from vmamba_cli.model import create_model

    torch.backends.cudnn.benchmark = True
    # (name, build, SS2D core tuning fields changed from ``tuning``, modes: None = both, else only "train" / "inference")
    models = [("vmamba-tiny", lambda: create_model("vmamba-tiny"), {}, None),
              ("swin_t", lambda: torchvision.models.swin_t(), {}, None)]
    if args.composed:
        # The other SS2D cores in the same run: composed ops throughout (cross-scan copies, batched
        # projections), and the fused inference core with delta from a batched matmul instead of
        # the scan kernel's own projection.
        models[1:1] = [("vmamba-tiny composed", lambda: create_model("vmamba-tiny"), _COMPOSED, None),
                       ("vmamba-tiny delta-matmul", lambda: create_model("vmamba-tiny"), _DELTA_MATMUL, "inference")]
    rows = []
    for mode, train in (("inference fp32", False), ("train AMP fwd+bwd", True)):
        timed = {}
        runs = [m for m in models if m[3] in (None, "train" if train else "inference")]
        # Rounds alternate the order: the first model timed in a mode measured up to 6 % slow on
        # the H200 (the same configuration timed again later was faster).
        for round_index in range(args.rounds):
            for name, build, switches, _ in (runs if round_index % 2 == 0 else runs[::-1]):
                with _model_tuning(dataclasses.replace(tuning, **switches)):
                    model = build().cuda()
                    batch = args.batch
                    while True:
                        try:
                            img_s, mem = _throughput(model, batch, 224, args, train)
                            break
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            if batch == 1:
                                raise
                            batch //= 2
                    timed.setdefault(name, []).append((img_s, mem, batch))
                    del model
                    torch.cuda.empty_cache()
        for name, build, switches, _ in runs:
            img_s = statistics.median(r[0] for r in timed[name])
            rows.append({"mode": mode, "model": name, "batch": timed[name][0][2], "img/s": round(img_s, 1),
                         "peak_MiB": round(max(r[1] for r in timed[name])),
                         "rounds": [round(r[0], 1) for r in timed[name]]})
            if train and args.host_probe:
                # At batch 4 the GPU work is small: a step's time is mostly the host's (Python,
                # autograd, launches), which batch 128 can hide only if it is shorter than the GPU's.
                with _model_tuning(dataclasses.replace(tuning, **switches)):
                    small = build().cuda()
                    img_s, _ = _throughput(small, 4, 224, args, train)
                    rows.append({"mode": "train AMP batch 4", "model": name, "batch": 4, "img/s": round(img_s, 1),
                                 "ms_per_step": round(4000 / img_s, 2), "peak_MiB": 0})
                    del small
        medians = {r["model"]: r["img/s"] for r in rows if r["mode"] == mode}
        for name in medians:
            if name != "swin_t":
                rows.append({"mode": mode, "model": f"{name} / swin_t", "ratio":
                             round(medians[name] / medians["swin_t"], 3)})
        if args.graphs:
            # Both models replayed from CUDA graphs: GPU time per step only, no host time.
            graphed = {}
            for name, build, switches, _ in runs:
                if switches:
                    continue
                with _model_tuning(dataclasses.replace(tuning, **switches)):
                    model = build().cuda()
                    try:
                        graphed[name] = _graphed_throughput(model, args.batch, 224, args, train)
                    except Exception as exc:  # a model that cannot be captured is reported, not fatal
                        print(f"graphs {mode} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                              file=sys.stderr)
                        continue
                    finally:
                        del model
                        torch.cuda.empty_cache()
                    rows.append({"mode": f"{mode} CUDA graph", "model": name, "batch": args.batch,
                                 "img/s": round(graphed[name], 1), "peak_MiB": 0})
            if "swin_t" in graphed and "vmamba-tiny" in graphed:
                rows.append({"mode": f"{mode} CUDA graph", "model": "vmamba-tiny / swin_t",
                             "ratio": round(graphed["vmamba-tiny"] / graphed["swin_t"], 3)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="HBM peak of the GPU in GB/s (default: by name, H100 SXM 3350, H200 4800, A100 2039)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128, help="model batch (halved on OOM)")
    parser.add_argument("--model-warmup", type=int, default=10)
    parser.add_argument("--model-iters", type=int, default=30)
    parser.add_argument("--skip-models", action="store_true", help="scan only")
    parser.add_argument("--torch-baseline", action="store_true", help="also time the blocked PyTorch scan")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--sweep", action="store_true", help="also time several Triton launch configurations")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the models")
    parser.add_argument("--out", default=None, help="folder for the JSON report and profiler tables")
    parser.add_argument("--warm-jobs", type=int, default=0,
                        help="compile every kernel first in this many parallel processes (fills Triton's cache)")
    parser.add_argument("--warm-only", action="store_true", help="stop after --warm-jobs")
    parser.add_argument("--cross-sweep", action="store_true", help="time cross-scan / merge launch variants")
    parser.add_argument("--map-sweep", action="store_true",
                        help="time launch variants of the fused SS2D core's scan (with --pick: use the fastest)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the models this many times, alternating their order; report the median")
    parser.add_argument("--graphs", action="store_true",
                        help="also time both models' steps replayed from CUDA graphs (GPU time, no host time)")
    parser.add_argument("--host-probe", action="store_true",
                        help="also time training steps at batch 4 (mostly host time: Python, autograd, launches)")
    parser.add_argument("--composed", action="store_true",
                        help="also time vmamba-tiny with the composed SS2D core (cross-scan copies)")
    parser.add_argument("--pick", action="store_true",
                        help="after --sweep, time the models with the fastest swept N = 1 launches")
    parser.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_scan_gpu: unset TRITON_INTERPRET to benchmark real GPU kernels", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("bench_scan_gpu: no CUDA device here; nothing to measure (run it on a GPU machine)", file=sys.stderr)
        return 0
    from vmamba_cli.kernels import triton as scan_triton
    if not scan_triton.is_available(torch.device("cuda")):
        print("bench_scan_gpu: triton is not importable; nothing to measure", file=sys.stderr)
        return 0

    import triton

    device_name = torch.cuda.get_device_name()
    if args.peak_gbs is None:
        args.peak_gbs = next((gbs for key, gbs in _PEAK_GBS.items() if key in device_name), 3350.0)
    if args.ncu_target:
        ncu_target(args)
        return 0
    if args.warm_one is not None:
        args.copy_gbs = args.peak_gbs
        _warm_one(args.warm_one, args)
        return 0
    if args.warm_jobs:
        warm_caches(args)
    if args.warm_only:
        return 0
    args.copy_gbs = copy_bandwidth()
    print(f"device: {device_name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"device-to-device copy {args.copy_gbs:.0f} GB/s (read + write)", file=sys.stderr, flush=True)
    header = (f"{'case':<20} {'backend':<12} {'phase':<5} {'ms':>9} {'min MB':>8} {'GB/s':>8} "
              f"{'% peak':>7} {'% copy':>7}")
    print(header, file=sys.stderr, flush=True)

    def measured(rows):
        for r in rows:
            print(f"{r['case']:<20} {r['backend']:<12} {r['phase']:<5} {r['ms']:>9.3f} {r['min_bytes_MB']:>8.1f} "
                  f"{r['GB/s']:>8.1f} {r['pct_peak']:>6.1f}% {r['pct_copy']:>6.1f}%", file=sys.stderr, flush=True)
        return rows

    scan_rows = []
    for case in _CASES:
        scan_rows += measured(bench_scan(*case, args))
        if args.torch_baseline:
            scan_rows += measured(bench_scan(*case, args, backend="torch"))
    if args.sweep:
        for launch in SWEEP:
            try:
                scan_rows += measured(bench_scan(*_CASES[0], args, launch=launch))
            except Exception as exc:  # a configuration that does not compile or run is reported, not fatal
                print(f"sweep {launch}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
    tuning = scan_triton.DEFAULT_TUNING
    if args.sweep and args.pick:
        tuning = _pick_launches(scan_rows, tuning)
    map_rows = []
    if args.map_sweep:
        map_rows, tuning = bench_map_sweep(args, tuning, pick=args.pick)
    if args.pick and tuning != scan_triton.DEFAULT_TUNING:
        for case in _CASES:   # the scan-goal rows again, with the picked launches
            scan_rows += measured(bench_scan(case[0] + " picked", *case[1:], args, tuning=tuning))
    cross_rows = bench_cross(args) if args.cross_sweep else []
    model_rows = [] if args.skip_models else bench_models(args, tuning)
    for r in model_rows:
        if "ratio" in r:
            print(f"{r['mode']:<20} {r['model']:<30} ratio {r['ratio']:.3f}", file=sys.stderr)
        else:
            extra = f"{r['ms_per_step']} ms/step" if "ms_per_step" in r else f"peak {r['peak_MiB']} MiB"
            print(f"{r['mode']:<20} {r['model']:<30} batch {r['batch']:>4} {r['img/s']:>9.1f} img/s {extra}",
                  file=sys.stderr)
    report = {"device": device_name, "peak_gbs": args.peak_gbs, "copy_gbs": round(args.copy_gbs, 1),
              "torch": torch.__version__, "triton": triton.__version__, "scan": scan_rows, "map_sweep": map_rows,
              "cross": cross_rows, "models": model_rows, "tuning": dataclasses.asdict(tuning)}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_scan_gpu.json"), "w") as f:
            json.dump(report, f, indent=2)
    if args.profile:
        with _model_tuning(tuning):
            tables = profile_models(args, args.out)
        for name, table in tables.items():
            print(f"--- {name} ---\n{table}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
