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
Time = median of CUDA event timings. Models follow spec §7: inference fp32, eval, no_grad, batch
128; training = forward + backward under autocast (float16) with CrossEntropyLoss, no optimizer step.
--warm-jobs compiles every kernel first in parallel processes (Triton's cache), --profile prints the
top kernels of one inference batch and one training step, --cross-sweep times cross-scan launch
shapes. Without a CUDA device (or without triton) the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch


def _time_cuda(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters runs, after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


def bench_scan(name, batch, groups, per_group, d_state, length, args, backend="triton", launch=None):
    """Forward / backward rows; ``launch`` = dict(block_d=, block_t=, num_warps=) for the triton backend."""
    from vmamba_cli.kernels import scan_triton, selective_scan

    device = torch.device("cuda")
    x = _scan_inputs(batch, groups, per_group, d_state, length, torch.bfloat16, device)
    order = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    leaves = [x[k].requires_grad_(True) for k in order]

    launch = dict(launch or {})

    maxnreg = launch.pop("maxnreg", None)
    saved = scan_triton.N1_INFERENCE_TILES, scan_triton.N1_TRAINING_TILES, scan_triton.N1_BACKWARD_LAUNCH
    if launch:
        # Register caps are module defaults, not selective_scan arguments: set them for this launch.
        scan_triton.N1_INFERENCE_TILES = scan_triton.N1_TRAINING_TILES = (
            launch["block_t"], launch["block_d"], launch["num_warps"], maxnreg)
        scan_triton.N1_BACKWARD_LAUNCH = (launch["block_d"], launch["num_warps"], maxnreg)

    def forward():
        if launch:
            return scan_triton.selective_scan(*leaves, delta_softplus=True, block_t=launch["block_t"])
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
        label = backend if not launch else f"d{launch['block_d']}/t{launch['block_t']}/w{launch['num_warps']}/r{maxnreg}"
        rows.append({"case": name, "backend": label, "phase": phase, "ms": round(ms, 4),
                     "launch": {**launch, "maxnreg": maxnreg} if launch else None,
                     "min_bytes_MB": round(nbytes / 1e6, 1), "GB/s": round(gbs, 1),
                     "pct_peak": round(100 * gbs / args.peak_gbs, 1),
                     "pct_copy": round(100 * gbs / args.copy_gbs, 1)})
    scan_triton.N1_INFERENCE_TILES, scan_triton.N1_TRAINING_TILES, scan_triton.N1_BACKWARD_LAUNCH = saved
    return rows


# Launch configurations tried by --sweep at the batch-128 stage-0 shape (96 channels per direction).
# Launch variants tried by --sweep at the batch-128 stage-0 shape (96 channels per direction):
# block_t 32 = the training tiles (forward + backward), 128 = the inference forward.
SWEEP = [dict(block_d=d, block_t=t, num_warps=w, maxnreg=r) for d, t, w, r in (
    (16, 32, 2, None), (16, 32, 2, 96), (16, 32, 2, 80), (16, 32, 2, 64), (8, 32, 1, 64), (16, 32, 4, 64),
    (32, 32, 4, 64), (8, 32, 2, 64), (16, 32, 4, 48),
    (8, 128, 2, None), (8, 128, 2, 80), (8, 128, 2, 64), (8, 128, 4, 64), (16, 128, 4, 64))]


def _pick_launches(rows):
    """Set the N = 1 defaults of the scan module to the fastest swept launches (--pick)."""
    from vmamba_cli.kernels import scan_triton

    def best(block_t, phase):
        timed = [r for r in rows if r.get("launch") and r["launch"]["block_t"] == block_t and r["phase"] == phase]
        return min(timed, key=lambda r: r["ms"])["launch"] if timed else None

    train_fwd, train_bwd, infer_fwd = best(32, "fwd"), best(32, "bwd"), best(128, "fwd")
    if train_fwd:
        scan_triton.N1_TRAINING_TILES = (32, train_fwd["block_d"], train_fwd["num_warps"], train_fwd["maxnreg"])
    if train_bwd:
        scan_triton.N1_BACKWARD_LAUNCH = (train_bwd["block_d"], train_bwd["num_warps"], train_bwd["maxnreg"])
    if infer_fwd:
        scan_triton.N1_INFERENCE_TILES = (128, infer_fwd["block_d"], infer_fwd["num_warps"], infer_fwd["maxnreg"])
    print(f"picked: N1_INFERENCE_TILES = {scan_triton.N1_INFERENCE_TILES}, "
          f"N1_TRAINING_TILES = {scan_triton.N1_TRAINING_TILES}, "
          f"N1_BACKWARD_LAUNCH = {scan_triton.N1_BACKWARD_LAUNCH}", file=sys.stderr, flush=True)


# Cross-scan launch variants (block_c, block_hw, mirror, num_warps) tried by --cross-sweep.
CROSS_SWEEP = [(16, 16, False, 4), (16, 16, True, 4), (32, 8, True, 4), (8, 16, True, 4), (32, 16, True, 8),
               (16, 8, True, 2), (64, 8, True, 4), (4, 32, True, 4)]


def bench_cross(args):
    """Cross-scan / merge of a VMamba-T stage-0 map (batch 128, 96 x 56 x 56, float32, channels-last)."""
    from vmamba_cli.kernels import scan_triton

    x = torch.randn(args.batch, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    seq = scan_triton._scan_layout(x)
    nbytes = 5 * x.numel() * x.element_size()
    rows = []

    def row(name, ms):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({"op": name, "ms": round(ms, 4), "GB/s": round(gbs, 1), "pct_copy": round(100 * gbs / args.copy_gbs, 1)})
        print(f"cross {name:<34} {ms:8.3f} ms {gbs:8.1f} GB/s {100 * gbs / args.copy_gbs:6.1f}% copy",
              file=sys.stderr, flush=True)

    row("scan nchw (contiguous() + kernel)",
        _time_cuda(lambda: scan_triton._scan_layout(x.contiguous(), block_c=1, block_hw=32), 3, 10))
    for block_c, block_hw, mirror, warps in CROSS_SWEEP:
        row(f"scan c{block_c}/hw{block_hw}/m{int(mirror)}/w{warps}", _time_cuda(
            lambda: scan_triton._scan_layout(x, block_c=block_c, block_hw=block_hw, mirror=mirror, num_warps=warps),
            3, 10))
    for block_c, block_hw, _, warps in CROSS_SWEEP[1:5]:
        row(f"merge c{block_c}/hw{block_hw}/w{warps}", _time_cuda(
            lambda: scan_triton._merge_layout(seq, 56, 56, block_c=block_c, block_hw=block_hw, num_warps=warps),
            3, 10))
    return rows


def ncu_target(args):
    """One launch of each hot kernel at the batch-128 stage-0 shape, for Nsight Compute."""
    from vmamba_cli.kernels import scan_triton

    x = _scan_inputs(args.batch, 4, 96, 1, 3136, torch.bfloat16, torch.device("cuda"))
    leaves = [x[k].requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    for _ in range(2):
        y = scan_triton.selective_scan(*leaves, delta_softplus=True)
        torch.autograd.grad(y, leaves, torch.randn_like(y))
        with torch.no_grad():
            scan_triton.selective_scan(*leaves, delta_softplus=True)
    fmap = torch.randn(args.batch, 96, 56, 56, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        seq = scan_triton._scan_layout(fmap)
        scan_triton._merge_layout(seq, 56, 56)
    torch.cuda.synchronize()


_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "4090": 1008.0}
_CASES = (("224px b128 stage0", 128, 4, 96, 1, 3136), ("1024px b1 stage0", 1, 4, 96, 1, 65536))


def _warm_jobs_list(args):
    jobs = [("case", 0), ("case", 1)]
    if args.sweep:
        jobs += [("sweep", i) for i in range(len(SWEEP))]
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
    else:
        from vmamba_cli.model import create_model

        model = create_model("vmamba-tiny").cuda()
        args.model_warmup, args.model_iters = 1, 1
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
    """Top CUDA kernels of one vmamba-tiny inference batch and one AMP training step."""
    from torch.profiler import ProfilerActivity, profile

    from vmamba_cli.model import create_model

    model = create_model("vmamba-tiny").cuda()
    images = torch.randn(args.batch, 3, 224, 224, device="cuda")
    target = torch.randint(0, 1000, (args.batch,), device="cuda")

    def infer():
        model.eval()
        with torch.no_grad():
            model(images)

    def train():
        model.train()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()

    tables = {}
    for name, step in (("inference_fp32", infer), ("train_amp", train)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60)
        tables[name] = table
        if out_dir:
            with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
                f.write(table)
    return tables


def _throughput(model, batch, size, args, train: bool):
    device = torch.device("cuda")
    images = torch.randn(batch, 3, size, size, device=device)
    if not train:
        model.eval()

        def step():
            with torch.no_grad():
                model(images)
    else:
        model.train()
        target = torch.randint(0, 1000, (batch,), device=device)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(images), target)
            loss.backward()

    torch.cuda.reset_peak_memory_stats()
    ms = _time_cuda(step, args.model_warmup, args.model_iters)
    return batch / (ms * 1e-3), torch.cuda.max_memory_allocated() / 2**20


def bench_models(args):
    import torchvision

    from vmamba_cli.model import create_model

    torch.backends.cudnn.benchmark = True
    rows = []
    for mode, train in (("inference fp32", False), ("train AMP fwd+bwd", True)):
        results = {}
        for name, build in (("vmamba-tiny", lambda: create_model("vmamba-tiny")),
                            ("swin_t", lambda: torchvision.models.swin_t())):
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
            results[name] = img_s
            rows.append({"mode": mode, "model": name, "batch": batch, "img/s": round(img_s, 1),
                         "peak_MiB": round(mem)})
            del model
            torch.cuda.empty_cache()
        rows.append({"mode": mode, "model": "vmamba-tiny / swin_t", "ratio":
                     round(results["vmamba-tiny"] / results["swin_t"], 3)})
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
    from vmamba_cli.kernels import scan_triton
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
    if args.sweep and args.pick:
        _pick_launches(scan_rows)
    cross_rows = bench_cross(args) if args.cross_sweep else []
    model_rows = [] if args.skip_models else bench_models(args)
    for r in model_rows:
        if "ratio" in r:
            print(f"{r['mode']:<20} {r['model']:<22} ratio {r['ratio']:.3f}", file=sys.stderr)
        else:
            print(f"{r['mode']:<20} {r['model']:<22} batch {r['batch']:>4} {r['img/s']:>9.1f} img/s "
                  f"peak {r['peak_MiB']} MiB", file=sys.stderr)
    report = {"device": device_name, "peak_gbs": args.peak_gbs, "copy_gbs": round(args.copy_gbs, 1),
              "torch": torch.__version__, "triton": triton.__version__, "scan": scan_rows, "cross": cross_rows,
              "models": model_rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_scan_gpu.json"), "w") as f:
            json.dump(report, f, indent=2)
    if args.profile:
        for name, table in profile_models(args, args.out).items():
            print(f"--- {name} ---\n{table}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
