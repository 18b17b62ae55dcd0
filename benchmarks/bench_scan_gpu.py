"""GPU benchmark of the Triton selective scan and of vmamba-tiny against torchvision swin_t.

    python benchmarks/bench_scan_gpu.py                       # H100 SXM peak 3350 GB/s
    python benchmarks/bench_scan_gpu.py --peak-gbs 2039       # A100 80GB
    python benchmarks/bench_scan_gpu.py --skip-models --json  # scan only, one JSON document on stdout

Scan shapes (bf16 u / delta / B / C, float32 A / D / delta_bias, softplus, float32 output):
  * VMamba-T stage 0 at 224x224, batch 128: (B=128, K*D=384, N=1, L=3136)
  * stage 0 at 1024x1024, batch 1:           (B=1,   K*D=384, N=1, L=65536)

Achieved GB/s uses the minimum traffic of the op (state on chip): forward reads u, delta, B, C and
writes y; backward reads u, delta, B, C, dy and writes du, ddelta, dB, dC. Time = median of CUDA
event timings. Models follow spec §7: inference fp32, eval, no_grad, batch 128; training = forward +
backward under autocast (float16) with CrossEntropyLoss, no optimizer step.
Without a CUDA device (or without triton) the script says so and exits with status 0.
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


def bench_scan(name, batch, groups, per_group, d_state, length, args, backend="triton"):
    from vmamba_cli.kernels import selective_scan

    device = torch.device("cuda")
    x = _scan_inputs(batch, groups, per_group, d_state, length, torch.bfloat16, device)
    order = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    leaves = [x[k].requires_grad_(True) for k in order]

    def forward():
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
        rows.append({"case": name, "backend": backend, "phase": phase, "ms": round(ms, 4),
                     "min_bytes_MB": round(nbytes / 1e6, 1), "GB/s": round(gbs, 1),
                     "pct_peak": round(100 * gbs / args.peak_gbs, 1)})
    return rows


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
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM peak of the GPU (H100 SXM: 3350)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128, help="model batch (halved on OOM)")
    parser.add_argument("--model-warmup", type=int, default=10)
    parser.add_argument("--model-iters", type=int, default=30)
    parser.add_argument("--skip-models", action="store_true", help="scan only")
    parser.add_argument("--torch-baseline", action="store_true", help="also time the blocked PyTorch scan")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
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

    device_name = torch.cuda.get_device_name()
    scan_rows = []
    cases = (("224px b128 stage0", 128, 4, 96, 1, 3136), ("1024px b1 stage0", 1, 4, 96, 1, 65536))
    for case in cases:
        scan_rows += bench_scan(*case, args)
        if args.torch_baseline:
            scan_rows += bench_scan(*case, args, backend="torch")
    model_rows = [] if args.skip_models else bench_models(args)

    report = {"device": device_name, "peak_gbs": args.peak_gbs, "torch": torch.__version__,
              "scan": scan_rows, "models": model_rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"device: {device_name}  (peak {args.peak_gbs:.0f} GB/s, torch {torch.__version__})", file=sys.stderr)
    print(f"{'case':<20} {'backend':<8} {'phase':<5} {'ms':>9} {'min MB':>8} {'GB/s':>8} {'% peak':>7}",
          file=sys.stderr)
    for r in scan_rows:
        print(f"{r['case']:<20} {r['backend']:<8} {r['phase']:<5} {r['ms']:>9.3f} {r['min_bytes_MB']:>8.1f} "
              f"{r['GB/s']:>8.1f} {r['pct_peak']:>6.1f}%", file=sys.stderr)
    for r in model_rows:
        if "ratio" in r:
            print(f"{r['mode']:<20} {r['model']:<22} ratio {r['ratio']:.3f}", file=sys.stderr)
        else:
            print(f"{r['mode']:<20} {r['model']:<22} batch {r['batch']:>4} {r['img/s']:>9.1f} img/s "
                  f"peak {r['peak_MiB']} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
