"""End-to-end CPU inference: vmamba-tiny against torchvision convnext_tiny and swin_t.

    python benchmarks/bench_e2e_cpu.py                       # both default cases
    python benchmarks/bench_e2e_cpu.py --case 224 --repeat 5
    python benchmarks/bench_e2e_cpu.py --models vmamba-tiny --backends cpu,torch --case 224

Method (docs/design.md §12.4): a fresh process per (model, case); ``torch.set_num_threads(2)``,
``eval()``, ``torch.inference_mode()``, random init, ``randn`` input; two warm-up forwards (the
second skipped if the first took over 20 s), then the median of ``--repeat`` timed forwards. Peak
memory is the child's ``ru_maxrss`` (includes ~0.7 GiB for importing torch + torchvision). Every
process applies the glibc malloc tuning of ``vmamba_cli.memory.tune_malloc`` (as the CLI does)
unless ``--no-malloc-tuning``. Goals (issue 3): vmamba-tiny img/s >= convnext_tiny at 224 batch 8,
and >= swin_t at 1024x1024 batch 1 with peak memory <= swin_t's.

``--rounds K`` runs the whole model list K times, alternating models, and prints each round's
vmamba / peer speed ratio and their median: on a shared VM the machine's speed drifts over
minutes, so a ratio of two rows taken back to back is steadier than one of two separate runs.
``--paired N`` goes further: one process holds both models and times N pairs of single forwards
(order alternating within the pairs), so each ratio compares forwards seconds apart; it prints the
median and quartiles of the per-pair ratios (speed only: peak memory needs separate processes).
``--without-core`` (with ``--paired``) times a third forward per pair: vmamba-tiny with its SS2D
core (cross-scan, x/dt projections, selective scan, cross-merge) replaced by the identity, i.e. what
an infinitely fast scan would give. Its ratio to the peer bounds what scan-kernel work can reach.
``--compile`` (with ``--paired``) compiles vmamba-tiny and the peer with ``torch.compile`` in the
child (the compile is the untimed warm-up) and times the eager vmamba-tiny as a third forward per
pair: it prints compiled vmamba / compiled peer and compiled / eager vmamba. All forwards then run
under ``torch.no_grad()`` (compiled graphs are made for it) instead of inference mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {"224": (224, 8), "1024": (1024, 1)}
PEERS = {"224": "convnext_tiny", "1024": "swin_t"}


def _start_child(spec: dict):
    """A child's process setup: malloc tuning first (before large tensors exist), then threads."""
    if spec["malloc"]:
        from vmamba_cli.memory import tune_malloc
        tune_malloc()
    import torch

    torch.set_num_threads(spec["threads"])
    return torch


def _child(spec: dict) -> dict:
    import resource
    import statistics
    import time

    torch = _start_child(spec)
    name, res, batch = spec["model"], spec["res"], spec["batch"]
    model = _build(name, spec["backend"])
    x = torch.randn(batch, 3, res, res)
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        first = time.perf_counter() - t0
        if first < 20:
            model(x)
        for _ in range(spec["repeat"]):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"model": name, "backend": spec.get("backend"), "res": res, "batch": batch, "first_s": first,
            "median_s": median, "img_per_s": batch / median, "s_per_img": median / batch,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg": os.getloadavg(), "threads": torch.get_num_threads()}


def _build(name, backend):
    if name.startswith("vmamba"):
        from vmamba_cli.model import create_model
        return create_model(name).set_scan_backend(backend).eval()
    import torchvision
    return getattr(torchvision.models, name)().eval()


def _without_core(model):
    """``model``'s forward with the SS2D core replaced by the identity (benchmark only)."""
    from vmamba_cli import model as model_module

    def forward(x):
        real = model_module.cross_selective_scan
        model_module.cross_selective_scan = lambda features, *args, **kwargs: features
        try:
            return model(x)
        finally:
            model_module.cross_selective_scan = real
    return forward


def _paired_child(spec: dict) -> dict:
    """Per-pair speed ratios vmamba / peer from single forwards alternating in one process."""
    import time

    torch = _start_child(spec)
    vmamba = _build(spec["model"], spec["backend"])
    models = [vmamba, _build(spec["peer"], None)]
    if spec.get("without_core"):
        models.append(_without_core(vmamba))
    compile_s = []
    if spec.get("compile"):
        # Third model: the eager vmamba, so the same pairs also give compiled / eager.
        models = [torch.compile(vmamba), torch.compile(models[1]), vmamba]
    x = torch.randn(spec["batch"], 3, spec["res"], spec["res"])
    ratios, third = [], []
    with torch.no_grad() if spec.get("compile") else torch.inference_mode():
        for model in models:
            t0 = time.perf_counter()
            model(x)
            compile_s.append(time.perf_counter() - t0)
            model(x)
        order = list(range(len(models)))
        for pair in range(spec["pairs"]):
            seconds = [0.0] * len(models)
            for index in (order if pair % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                models[index](x)
                seconds[index] = time.perf_counter() - t0
            ratios.append(seconds[1] / seconds[0])
            if spec.get("compile"):
                third.append(seconds[2] / seconds[0])   # eager time / compiled time: the speedup
            elif len(models) == 3:
                third.append(seconds[1] / seconds[2])
    result = {"ratios": ratios, "loadavg": os.getloadavg(), "first_call_s": compile_s}
    if third:
        result["ratios_compiled_vs_eager" if spec.get("compile") else "ratios_without_core"] = third
    return result


def _spawn(flag: str, spec: dict, what: str) -> dict:
    """Run this script as a child with ``flag spec`` and return the JSON it prints last."""
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _goal(case: str, compiled: bool) -> float:
    """The speed goal of a paired comparison: 1.0x the peer, 1.1x compiled swin_t at 1024."""
    return 1.1 if compiled and case == "1024" else 1.0


def run_paired(backend, case, args) -> dict:
    res, batch = CASES[case]
    spec = {"model": "vmamba-tiny", "backend": backend, "peer": PEERS[case], "res": res, "batch": batch,
            "pairs": args.paired, "threads": args.threads, "malloc": not args.no_malloc_tuning,
            "without_core": args.without_core, "compile": args.compile}
    return _spawn("--paired-child", spec, f"paired {case}")


def run_case(model, backend, case, args) -> dict:
    res, batch = CASES[case]
    spec = {"model": model, "backend": backend, "res": res, "batch": batch, "repeat": args.repeat,
            "threads": args.threads, "malloc": not args.no_malloc_tuning}
    return _spawn("--child", spec, f"{model} {case}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--models", default=None, help="comma list (default: vmamba-tiny and the case's peer)")
    parser.add_argument("--backends", default="cpu", help="scan backends for VMamba models, comma list")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the models this many times")
    parser.add_argument("--paired", type=int, default=0,
                        help="instead: N pairs of forwards of vmamba-tiny and the peer in one process")
    parser.add_argument("--without-core", action="store_true",
                        help="with --paired: also time vmamba-tiny with its SS2D core replaced by the identity")
    parser.add_argument("--compile", action="store_true",
                        help="with --paired: compile both models; also time the eager vmamba-tiny")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paired-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    if args.paired_child:
        print(json.dumps(_paired_child(json.loads(args.paired_child))))
        return
    if args.without_core and not args.paired:
        parser.error("--without-core needs --paired N")
    if args.compile and (not args.paired or args.without_core):
        parser.error("--compile needs --paired N (and no --without-core)")
    if args.paired:
        if args.paired < 2:
            parser.error("--paired needs at least 2 pairs (quartiles)")
        rows = []
        for case in (CASES if args.case == "all" else [args.case]):
            for backend in args.backends.split(","):
                result = run_paired(backend, case, args)
                q1, median, q3 = statistics.quantiles(result["ratios"], n=4)
                tag = " compiled" if args.compile else ""
                print(f"{case}:{tag} vmamba-tiny [{backend}] /{tag} {PEERS[case]} speed, {len(result['ratios'])} pairs in one "
                      f"process: median {median:.2f} (quartiles {q1:.2f}-{q3:.2f}; pairs "
                      + ", ".join(f"{r:.2f}" for r in result["ratios"])
                      + f"); load {result['loadavg'][0]:.2f} (goal >= {_goal(case, args.compile)})", file=sys.stderr,
                      flush=True)
                if "ratios_without_core" in result:
                    q1, median, q3 = statistics.quantiles(result["ratios_without_core"], n=4)
                    print(f"{case}: vmamba-tiny without its SS2D core (identity) / {PEERS[case]} speed, same pairs: "
                          f"median {median:.2f} (quartiles {q1:.2f}-{q3:.2f}): the most scan-kernel work could reach",
                          file=sys.stderr, flush=True)
                if "ratios_compiled_vs_eager" in result:
                    q1, median, q3 = statistics.quantiles(result["ratios_compiled_vs_eager"], n=4)
                    print(f"{case}: compiled / eager vmamba-tiny [{backend}] speed, same pairs: median {median:.2f} "
                          f"(quartiles {q1:.2f}-{q3:.2f}); first calls (compile) "
                          + ", ".join(f"{t:.0f} s" for t in result["first_call_s"]), file=sys.stderr, flush=True)
                rows.append({"case": case, "backend": backend, **result})
        if args.json:
            print(json.dumps(rows, indent=1))
        return

    rows = []
    for round_index in range(args.rounds):
        for case in (CASES if args.case == "all" else [args.case]):
            models = args.models.split(",") if args.models else ["vmamba-tiny", PEERS[case]]
            for model in models:
                for backend in (args.backends.split(",") if model.startswith("vmamba") else [None]):
                    row = run_case(model, backend, case, args)
                    row["round"] = round_index
                    rows.append(row)
                    label = model + (f" [{backend}]" if backend else "")
                    print(f"{label:28s} {row['res']:5d}px b{row['batch']:<2d} {row['img_per_s']:7.2f} img/s "
                          f"{row['s_per_img']:8.3f} s/img  first {row['first_s']:6.2f} s  peak RSS "
                          f"{row['peak_rss_mib']:6.0f} MiB  load {row['loadavg'][0]:.2f}", file=sys.stderr, flush=True)
    for case in (CASES if args.case == "all" else [args.case]):
        peer = PEERS[case]
        res = CASES[case][0]
        by_round = {}
        for row in rows:
            if row["res"] == res:
                by_round.setdefault(row["round"], {})[(row["model"], row["backend"])] = row["img_per_s"]
        for backend in args.backends.split(","):
            key = ("vmamba-tiny", backend)
            ratios = [r[key] / r[(peer, None)] for r in by_round.values() if key in r and (peer, None) in r]
            if ratios:
                print(f"{case}: vmamba-tiny [{backend}] / {peer} img/s per round: "
                      + ", ".join(f"{r:.2f}" for r in ratios)
                      + f"; median {statistics.median(ratios):.2f} (goal >= 1.0)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
