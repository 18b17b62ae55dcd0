"""onnxruntime vs PyTorch eager on this CPU: vmamba-tiny (by default) at 224, batch 8, each runtime in its own process.

The ONNX file is exported here (``vmamba_cli.export``); PyTorch runs the same weights eagerly with
its default scan backend. Each round starts one process per runtime, one after the other (the order
alternates between rounds), and each process times ``--runs`` forwards after a warm-up; the figure
is the median over rounds of (torch seconds / onnxruntime seconds), each side's seconds being the
median of its runs: above 1 means onnxruntime is faster.

Why separate processes: with both runtimes in one process, PyTorch's forwards were at times about
2x slower right after onnxruntime had run (0.85-1.1 s instead of about 0.45 s per batch in the first
paired runs), which made onnxruntime look twice as good as it is. The cause was not pinned down (not
onnxruntime's spinning worker threads: turning spinning off changed nothing), and later checks did
not reproduce it (benchmarks/results/2026-12-03-cpu-2vcpu/after-onnxruntime.txt); separate processes
rule it out. Every child applies the malloc tuning the `vmamba` command applies at start-up
(``vmamba_cli.memory.tune_malloc``), so PyTorch is timed as users run it.

    python benchmarks/bench_onnx_cpu.py [--model vmamba-tiny] [--resolution 224] [--batch 8]
                                        [--rounds 3] [--runs 3] [--pt2] [--ort-profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(spec: dict) -> dict:
    """Time one runtime in this process: a warm-up forward, then ``runs`` timed ones."""
    import numpy as np
    import torch

    from vmamba_cli.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(spec["threads"])
    x = torch.from_numpy(np.load(spec["input"]))
    if spec.get("profile"):
        return _profile_onnxruntime(spec, x)
    if spec["runtime"] == "torch":
        from vmamba_cli.model import create_model

        model = create_model(spec["model"]).eval()
        model.load_state_dict(torch.load(spec["weights"]))

        def forward():
            return model(x).numpy()
    elif spec["runtime"] == "pt2":
        import vmamba_cli  # noqa: F401  (registers the scan operator the program calls)

        program = torch.export.load(spec["pt2"]).module()

        def forward():
            return program(x).numpy()
    else:
        from vmamba_cli.export import OnnxClassifier

        clf = OnnxClassifier(spec["onnx"], threads=spec["threads"])

        def forward():
            return clf(x)
    seconds = []
    with torch.inference_mode():
        out = forward()                                   # warm-up
        for _ in range(spec["runs"]):
            start = time.perf_counter()
            forward()
            seconds.append(time.perf_counter() - start)
    np.save(spec["output"], out)
    return {"seconds": seconds, "load": os.getloadavg()[0]}


def _profile_onnxruntime(spec: dict, x) -> dict:
    """onnxruntime's own profiler over a first forward and ``runs`` more (its profiling cannot start
    later): seconds per forward by op type, averaged over all of them."""
    import collections

    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(spec["output"]).with_suffix(""))
    session = onnxruntime.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    for _ in range(spec["runs"]):
        session.run(None, feed)
    by_op = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e6 / (spec["runs"] + 1)
    return {"seconds_by_op": dict(by_op.most_common()), "load": os.getloadavg()[0]}


def _spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{spec['runtime']} child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vmamba-tiny")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per process")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pt2", action="store_true",
                        help="also time the .pt2 program of `vmamba export --format pt2`, loaded with torch.export.load")
    parser.add_argument("--ort-profile", action="store_true",
                        help="also run onnxruntime's profiler in one more process: seconds per forward by op type")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from vmamba_cli.export import export_program, export_pt2, onnx_model_proto
    from vmamba_cli.model import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    print(f"{args.model} {args.resolution}x{args.resolution} batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, load {os.getloadavg()[0]:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(model.state_dict(), tmp / "weights.pt")
        np.save(tmp / "input.npy", torch.randn(args.batch, 3, args.resolution, args.resolution).numpy())
        start = time.perf_counter()
        program = export_program(model, resolution=args.resolution)
        print(f"torch.export {time.perf_counter() - start:.1f} s", flush=True)
        base = {"model": args.model, "threads": args.threads, "runs": args.runs, "input": str(tmp / "input.npy"),
                "weights": str(tmp / "weights.pt")}
        path = tmp / "model.onnx"
        start = time.perf_counter()
        onnx.save_model(onnx_model_proto(program), str(path))
        print(f"ONNX translation {time.perf_counter() - start:.1f} s, file {path.stat().st_size / 1e6:.1f} MB",
              flush=True)
        specs = {"torch": {**base, "runtime": "torch", "output": str(tmp / "torch.npy")},
                 "onnxruntime": {**base, "runtime": "onnxruntime", "onnx": str(path), "output": str(tmp / "ort.npy")}}
        if args.pt2:
            export_pt2(model, tmp / "model.pt2", resolution=args.resolution)   # as `vmamba export --format pt2`
            specs["pt2"] = {**base, "runtime": "pt2", "pt2": str(tmp / "model.pt2"), "output": str(tmp / "pt2.npy")}
        others = [name for name in specs if name != "torch"]
        ratios = {name: [] for name in others}
        medians = {name: [] for name in specs}
        for round_index in range(args.rounds):
            order = list(specs) if round_index % 2 == 0 else list(specs)[::-1]
            seconds = {}
            for runtime in order:
                result = _spawn(specs[runtime])
                seconds[runtime] = statistics.median(result["seconds"])
                medians[runtime].append(seconds[runtime])
            for name in others:
                ratios[name].append(seconds["torch"] / seconds[name])
            print(f"  round {round_index + 1}: " + ", ".join(f"{name} {seconds[name]:.3f} s" for name in specs)
                  + f"; load {result['load']:.2f}", flush=True)
        reference = np.load(tmp / "torch.npy")
        for name in others:
            err = float(np.abs(np.load(specs[name]["output"]) - reference).max())
            print(f"{name}: max |{name} - torch| logits {err:.2e}; median s per batch: torch "
                  f"{statistics.median(medians['torch']):.3f}, {name} {statistics.median(medians[name]):.3f}; "
                  f"speed vs torch eager: {statistics.median(ratios[name]):.2f}x "
                  f"(rounds: {' '.join(f'{r:.2f}' for r in ratios[name])})", flush=True)
        if args.ort_profile:
            result = _spawn({**specs["onnxruntime"], "profile": True, "output": str(tmp / "ort-profile.json")})
            total = sum(result["seconds_by_op"].values())
            print(f"onnxruntime profile, s per forward by op type (all nodes {total:.3f} s):", flush=True)
            for op_type, seconds in list(result["seconds_by_op"].items())[:15]:
                print(f"  {op_type:20s} {seconds:.3f}  {100 * seconds / total:4.1f}%", flush=True)

if __name__ == "__main__":
    main()
