"""onnxruntime vs PyTorch eager on this CPU: vmamba-tiny (by default) at 224, batch 8, paired in one process.

The ONNX file is exported here (``vmamba_cli.export.export_onnx``, chunked scan in standard ONNX
operators); PyTorch runs the same weights eagerly with its default scan backend. Runs alternate
(torch, onnxruntime, torch, ...) so that both see the same machine load, and the reported figure is
the median over pairs of (torch seconds / onnxruntime seconds): above 1 means onnxruntime is faster.

    python benchmarks/bench_onnx_cpu.py [--model vmamba-tiny] [--resolution 224] [--batch 8] [--pairs 5]
                                        [--lowering scan chunked]

Each ``--lowering`` (how the scan becomes ONNX, ``vmamba_cli.export.LOWERINGS``) gets its own file
from one torch.export program and its own paired timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from vmamba_cli.export import DEFAULT_LOWERING, LOWERINGS, OnnxClassifier, export_program, onnx_model_proto
from vmamba_cli.model import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vmamba-tiny")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lowering", nargs="+", default=[DEFAULT_LOWERING], choices=list(LOWERINGS))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    print(f"{args.model} {args.resolution}x{args.resolution} batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, load {os.getloadavg()[0]:.2f}",
          flush=True)
    start = time.perf_counter()
    program = export_program(model, resolution=args.resolution)
    print(f"torch.export {time.perf_counter() - start:.1f} s", flush=True)
    with torch.inference_mode():
        eager_logits = model(x)                                      # warm-up (native kernel build / load)
    for lowering in args.lowering:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            start = time.perf_counter()
            onnx.save_model(onnx_model_proto(program, lowering=lowering), str(path))
            export_s = time.perf_counter() - start
            size_mb = path.stat().st_size / 1e6
            clf = OnnxClassifier(path, threads=args.threads)
            start = time.perf_counter()
            ort_logits = clf(x)                                      # first run: session warm-up
            ort_first = time.perf_counter() - start
            err = float(np.abs(ort_logits - eager_logits.numpy()).max())
            torch_s, ort_s = [], []
            with torch.inference_mode():
                for _ in range(args.pairs):
                    start = time.perf_counter()
                    model(x)
                    torch_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    clf(x)
                    ort_s.append(time.perf_counter() - start)
        ratios = [t / o for t, o in zip(torch_s, ort_s)]
        print(f"[lowering {lowering}] ONNX translation {export_s:.1f} s, file {size_mb:.1f} MB, onnxruntime first "
              f"run {ort_first:.2f} s, max |onnx - torch| logits {err:.2e}, load {os.getloadavg()[0]:.2f}")
        print("torch eager s  :", " ".join(f"{t:.3f}" for t in torch_s), f"(median {statistics.median(torch_s):.3f})")
        print("onnxruntime s  :", " ".join(f"{t:.3f}" for t in ort_s), f"(median {statistics.median(ort_s):.3f})")
        print(f"onnxruntime speed vs torch eager (median of paired torch/ort): {statistics.median(ratios):.2f}x "
              f"(pairs: {' '.join(f'{r:.2f}' for r in ratios)})", flush=True)

if __name__ == "__main__":
    main()
