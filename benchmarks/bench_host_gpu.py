"""Host (CPU) cost of launching vmamba's GPU work: what a training step spends before the GPU runs.

    python benchmarks/bench_host_gpu.py [--out DIR]

A VMamba training step issues several hundred small ops; when the host takes longer to issue them
than the GPU takes to run them, images/s follows the host. This prints microseconds per call of
single launches on tiny tensors (GPU time negligible, so the figure is host time): a Triton kernel
launched directly, the channel LayerNorm as an autograd Function, F.layer_norm, a torch add; the
SS2D core forward + backward (fused and composed) at a small map; and the top host-time entries
of one vmamba-tiny AMP training step at batch 4 (profiler table sorted by self CPU time).
Without a CUDA device it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _host_us(fn, iters=300, warmup=20) -> float:
    """Microseconds per fn() call, issue time only (one synchronize at the end of the timed loop)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / iters * 1e6


def launch_costs():
    import dataclasses

    import triton

    from vmamba_cli.kernels import triton as st
    from vmamba_cli.kernels.triton import layernorm as ln

    rows = []
    x = torch.randn(64, 96, device="cuda")
    w, b = torch.ones(96, device="cuda"), torch.zeros(96, device="cuda")
    y, mean, rstd = torch.empty_like(x), torch.empty(64, device="cuda"), torch.empty(64, device="cuda")
    block_r, block_c, warps = ln._launch_shape(96)

    def raw_launch():
        ln._ln_fwd_kernel[(triton.cdiv(64, block_r),)](x, w, b, y, mean, rstd, 64, 96, 1e-5,
                                                       BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)

    rows.append(("triton launch (_ln_fwd_kernel, 12 args)", _host_us(raw_launch)))
    rows.append(("layer_norm_rows (autograd Function, no grad)", _host_us(lambda: ln.layer_norm_rows(x, w, b))))
    rows.append(("F.layer_norm", _host_us(lambda: torch.nn.functional.layer_norm(x, (96,), w, b))))
    rows.append(("torch.add", _host_us(lambda: torch.add(x, x))))

    gen = torch.Generator(device="cuda").manual_seed(0)
    d, rank = 96, 6
    params = [torch.randn(4, rank + 2, d, generator=gen, device="cuda") * 0.1,
              torch.randn(4, d, rank, generator=gen, device="cuda") * 0.3,
              torch.randn(4, d, generator=gen, device="cuda") - 3.0,
              torch.randn(4 * d, 1, generator=gen, device="cuda") * 0.3,
              torch.randn(4 * d, generator=gen, device="cuda")]
    params = [p.requires_grad_(True) for p in params]
    xmap = torch.randn(1, d, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_(True)
    for label, fused in (("fused", True), ("composed", False)):
        tuning = dataclasses.replace(st.DEFAULT_TUNING, fused_cross_scan=fused, fused_training=fused)

        def core_step():
            st.cross_selective_scan(xmap, *params, tuning=tuning).sum().backward()

        rows.append((f"SS2D core fwd+bwd 1x96x8x8, {label}", _host_us(core_step, iters=100)))
    return rows


def step_profile(out_dir):
    from torch.profiler import ProfilerActivity, profile

    from vmamba_cli.model import create_model

    model = create_model("vmamba-tiny").cuda().train()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    target = torch.randint(0, 1000, (4,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(images), target)
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    rows = [("vmamba-tiny AMP train step, batch 4", _host_us(step, iters=10, warmup=2))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=60)
    if out_dir:
        with open(os.path.join(out_dir, "host_profile_train_b4.txt"), "w") as f:
            f.write(table)
    return rows, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for the profiler table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_host_gpu: needs a CUDA device and TRITON_INTERPRET unset; nothing to measure", file=sys.stderr)
        return 0
    rows = launch_costs()
    step_rows, table = step_profile(args.out)
    for label, us in rows + step_rows:
        print(f"{label:<50} {us:10.1f} us/call", flush=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
