"""Native CPU scan against memory copy, the sequential reference and the PyTorch backend.

    python benchmarks/bench_scan_cpu.py [--threads 2] [--repeat 20] [--skip-reference]

Shape (issue 3): batch 1, K*D = 768 (Di = 192 per direction), N = 1, 56x56 (L = 3136), rank 12,
official-init-like parameters. Figures printed (medians, ms):

* fused forward (no grad) of ``cross_selective_scan`` = cross-scan + projections + scan + merge;
* copy: ``dst.copy_(src)`` moving the same bytes as the scan's minimum traffic (u, delta and y of
  the unfused scan: 3 x 4 x B x KD x L bytes, read + write counted), goal: fused forward <= 4x;
* the sequential reference (``compose_cross_selective_scan(backend="reference")``), goal: >= 15x
  slower than the fused forward;
* the "torch" backend, and the plain ``selective_scan`` interface of the cpu backend;
* forward-with-grad and backward, goal: backward <= 3x forward.
GB/s = the bytes named in each row / time. Load average is printed: other processes share the cores.

Copy, fused forward, forward-with-grad and backward are timed round-robin in one loop (each
round: copy, inference forward, forward with grad, its backward), so the ratios compare rows taken
under the same machine load: on a shared VM, separate timing loops minutes apart drift by 1.5-2x.
The backward gets a channels-last gradient, as it does inside the model.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch


def timed(fn, repeat, warmup=2):
    """(median wall time, median process CPU time summed over threads) in seconds."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def interleaved(fns: dict, repeat: int, warmup: int = 2) -> dict:
    """Runs the callables round-robin; {name: (median wall, median process CPU)} in seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: ([], []) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            samples[name][0].append(time.perf_counter() - t0)
            samples[name][1].append(time.process_time() - c0)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-inner", type=int, default=192)
    parser.add_argument("--d-state", type=int, default=1)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow sequential reference")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args(argv)

    from vmamba_cli.memory import tune_malloc
    tuned = False if args.no_malloc_tuning else tune_malloc()
    torch.set_num_threads(args.threads)
    from vmamba_cli.kernels import compose_cross_selective_scan
    from vmamba_cli.kernels import cpu as scan_cpu

    status = scan_cpu.native_status()
    if not status["available"]:
        sys.exit(f"native kernel unavailable: {status['reason']}")

    torch.manual_seed(0)
    b, d, n, hw = args.batch, args.d_inner, args.d_state, args.size
    rank = math.ceil(d / 16)
    length = hw * hw
    x = torch.nn.functional.silu(torch.randn(b, d, hw, hw)).contiguous(memory_format=torch.channels_last)
    params = dict(
        x_proj_weight=torch.empty(4, rank + 2 * n, d).uniform_(-d ** -0.5, d ** -0.5),
        dt_projs_weight=torch.empty(4, d, rank).uniform_(-rank ** -0.5, rank ** -0.5),
        dt_projs_bias=torch.log(torch.expm1(torch.exp(torch.empty(4, d).uniform_(math.log(1e-3), math.log(0.1))))),
        A_logs=torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(4 * d, 1),
        Ds=torch.ones(4 * d),
    )
    args_fused = (x, *params.values())

    scan_bytes = 3 * 4 * b * 4 * d * length           # u, delta, y of the unfused scan
    fused_bytes = 4 * b * length * (2 * d + 4 * (rank + 2 * n))  # x in, y out, projections in
    src = torch.randn(scan_bytes // 8)                 # copy reads half, writes half
    dst = torch.empty_like(src)

    leaves = [t.clone().requires_grad_() for t in args_fused]
    grad = torch.randn(b, d, hw, hw).contiguous(memory_format=torch.channels_last)
    pending = []

    def inference_forward():
        with torch.inference_mode():
            scan_cpu.cross_selective_scan(*args_fused)

    def forward_grad():
        pending.append(scan_cpu.cross_selective_scan(*leaves))

    def backward():
        torch.autograd.backward(pending.pop(), grad)

    timed_rows = interleaved({"copy": lambda: dst.copy_(src), "fwd": inference_forward,
                              "fwd_grad": forward_grad, "bwd": backward}, args.repeat)
    t_copy, t_fwd, t_fwd_grad, t_bwd = (timed_rows[k] for k in ("copy", "fwd", "fwd_grad", "bwd"))

    with torch.inference_mode():
        t_torch = timed(lambda: compose_cross_selective_scan(*args_fused, backend="torch"), max(3, args.repeat // 4))
        xs = torch.randn(b, 4 * d, length)
        plain = (xs, torch.randn(b, 4 * d, length) * 0.5 - 3, -torch.exp(params["A_logs"]), torch.randn(b, 4, n, length),
                 torch.randn(b, 4, n, length), params["Ds"], params["dt_projs_bias"].reshape(-1))
        t_plain = timed(lambda: scan_cpu.selective_scan(*plain, delta_softplus=True), args.repeat)
        t_ref = None
        if not args.skip_reference:
            t_ref = timed(lambda: compose_cross_selective_scan(*args_fused, backend="reference"), 1, warmup=1)

    load = os.getloadavg()
    print(f"# bench_scan_cpu: B={b} K*D={4 * d} N={n} {hw}x{hw} (L={length}) rank={rank}, "
          f"threads={torch.get_num_threads()}, malloc tuned={tuned}, loadavg={load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"# kernel: {status['library']}")
    rows = [
        ("copy (same bytes as the scan's u+delta+y)", t_copy, scan_bytes),
        ("fused forward, cpu backend (inference)", t_fwd, fused_bytes),
        ("fused forward, counted at scan bytes", t_fwd, scan_bytes),
        ("plain selective_scan, cpu backend", t_plain, scan_bytes),
        ("compose, torch backend", t_torch, scan_bytes),
    ]
    if t_ref is not None:
        rows.append(("compose, sequential reference", t_ref, scan_bytes))
    rows += [("fused forward with grad (saves states)", t_fwd_grad, None), ("fused backward", t_bwd, None)]
    # "cpu ms" is process CPU time over all threads: under contention it moves much less than wall time.
    print(f"{'what':46s} {'ms':>9s} {'cpu ms':>9s} {'GB/s':>7s}")
    for name, (t, cpu), nbytes in rows:
        gbs = f"{nbytes / t / 1e9:7.1f}" if nbytes else f"{'':7s}"
        print(f"{name:46s} {t * 1e3:9.3f} {cpu * 1e3:9.3f} {gbs}")
    ratio = lambda a, b: f"{a[0] / b[0]:6.2f}x wall, {a[1] / max(b[1], 1e-9):6.2f}x cpu"  # noqa: E731
    print(f"fused forward / copy          = {ratio(t_fwd, t_copy)}   (goal <= 4)")
    if t_ref is not None:
        print(f"reference / fused forward     = {ratio(t_ref, t_fwd)}   (goal >= 15)")
    print(f"torch backend / fused forward = {ratio(t_torch, t_fwd)}")
    print(f"backward / forward            = {ratio(t_bwd, t_fwd)}   (goal <= 3)")
    print(f"backward / forward with grad  = {ratio(t_bwd, t_fwd_grad)}")


if __name__ == "__main__":
    main()
