"""Fused SS2D core forward (backend "cpu", no grad) at the four vmamba-tiny stage shapes, batch 8: median ms of 15.

    python scan_lanes_trial.py LABEL      (run once on the tree as it is, once with scan_lanes16.patch applied)
"""
import torch, time, statistics as st, sys
from vmamba_cli.memory import tune_malloc
from vmamba_cli import kernels
tune_malloc(); torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
out = []
for (D, S, R) in [(96, 56, 6), (192, 28, 12), (384, 14, 24), (768, 7, 48)]:
    x = torch.randn(8, D, S, S, generator=g).contiguous(memory_format=torch.channels_last)
    xp = torch.randn(4, R + 2, D, generator=g) * D ** -0.5
    dtw = torch.randn(4, D, R, generator=g) * R ** -0.5
    b = torch.randn(4, D, generator=g) - 4
    A = torch.zeros(4 * D, 1); Ds = torch.ones(4 * D)
    with torch.no_grad():
        y = kernels.cross_selective_scan(x, xp, dtw, b, A, Ds, backend="cpu")
        ref = kernels.cross_selective_scan(x, xp, dtw, b, A, Ds, backend="torch")
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        for _ in range(3): kernels.cross_selective_scan(x, xp, dtw, b, A, Ds, backend="cpu")
        ts = []
        for _ in range(15):
            t = time.perf_counter(); kernels.cross_selective_scan(x, xp, dtw, b, A, Ds, backend="cpu"); ts.append(time.perf_counter() - t)
    out.append(f"D{D}: {st.median(ts)*1e3:.2f} ms (err {err:.1e})")
print(sys.argv[1], " | ".join(out))
