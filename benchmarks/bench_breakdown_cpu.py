"""Where a CPU forward goes: vmamba-tiny and a torchvision peer, part by part, in one process.

    python benchmarks/bench_breakdown_cpu.py                      # 224 batch 8 vs convnext_tiny
    python benchmarks/bench_breakdown_cpu.py --case 1024 --forwards 4

Forward hooks around the leaf modules (linear layers, convolutions, GELU, LayerNorms) and a timer
around the SS2D core call (`cross_selective_scan`) add up wall time per part with
`time.perf_counter`; "rest" is the forward's total minus the parts (SiLU, residual additions,
permutes, layer scale, Python). The two models alternate forward by forward (medians over
``--forwards`` each), so both see the same machine speed. 2 threads, tuned malloc, ``eval()``,
``inference_mode()``, random weights, as bench_e2e_cpu.py.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from bench_e2e_cpu import CASES, PEERS, _build, _start_child  # same cases, setup and models

PARTS = ("linear layers", "convolutions", "GELU", "LayerNorm", "SS2D core", "rest", "total")


def _part(module, nn):
    if isinstance(module, nn.Linear):
        return "linear layers"
    if isinstance(module, nn.Conv2d):
        return "convolutions"
    if isinstance(module, nn.GELU):
        return "GELU"
    if isinstance(module, nn.LayerNorm):
        return "LayerNorm"
    return None


def breakdown(case: str = "224", forwards: int = 8, threads: int = 2) -> dict:
    """Median milliseconds per part for vmamba-tiny and the case's peer."""
    torch = _start_child({"malloc": True, "threads": threads})
    import torch.nn as nn

    from vmamba_cli import model as model_module

    (res, batch), peer = CASES[case], PEERS[case]
    models = {"vmamba-tiny": _build("vmamba-tiny", "auto"), peer: _build(peer, None)}
    spent = collections.defaultdict(float)
    started = {}

    def before(module, args):
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        spent[module._breakdown_part] += time.perf_counter() - started[id(module)]

    for net in models.values():
        for module in net.modules():
            part = _part(module, nn)
            # Leaves of each part only (LayerNorm2d wraps nothing, but be safe with containers).
            if part and not any(_part(child, nn) for child in module.children()):
                module._breakdown_part = part
                module.register_forward_pre_hook(before)
                module.register_forward_hook(after)

    core = model_module.cross_selective_scan

    def timed_core(*args, **kwargs):
        t0 = time.perf_counter()
        out = core(*args, **kwargs)
        spent["SS2D core"] += time.perf_counter() - t0
        return out

    x = torch.randn(batch, 3, res, res)
    samples = {name: collections.defaultdict(list) for name in models}
    model_module.cross_selective_scan = timed_core
    try:
        with torch.inference_mode():
            for net in models.values():
                net(x)
            names = list(models)
            for index in range(forwards):
                for name in (names if index % 2 == 0 else names[::-1]):
                    spent.clear()
                    t0 = time.perf_counter()
                    models[name](x)
                    total = time.perf_counter() - t0
                    for part in PARTS[:-2]:
                        samples[name][part].append(spent.get(part, 0.0))
                    samples[name]["rest"].append(total - sum(spent.values()))
                    samples[name]["total"].append(total)
    finally:
        model_module.cross_selective_scan = core
    return {name: {part: statistics.median(values) * 1e3 for part, values in parts.items()}
            for name, parts in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), default="224")
    parser.add_argument("--forwards", type=int, default=8, help="timed forwards per model (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = breakdown(args.case, args.forwards, args.threads)
    names = list(result)
    res, batch = CASES[args.case]
    print(f"# median ms per forward, {res}x{res} batch {batch}, {args.threads} threads, {args.forwards} forwards each")
    print(f"{'part':16s}" + "".join(f"{name:>16s}" for name in names))
    for part in PARTS:
        print(f"{part:16s}" + "".join(f"{result[name].get(part, 0.0):16.1f}" for name in names))
    a, b = (result[name]["total"] for name in names)
    print(f"speed {names[0]} / {names[1]}: {b / a:.2f}; with the SS2D core time subtracted: "
          f"{b / (a - result[names[0]]['SS2D core']):.2f}")


if __name__ == "__main__":
    main()
