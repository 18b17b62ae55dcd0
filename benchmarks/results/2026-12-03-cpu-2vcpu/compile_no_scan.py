"""Compiled vmamba-tiny with identity SS2D cores (y = x), with its real cores, and compiled torchvision
convnext_tiny, 224x224 batch 8, 2 threads, all in one process, timed in interleaved rounds (median of
the per-round medians): what torch.compile leaves beside the scan.

    python compile_no_scan.py [--rounds 5]
"""
import statistics
import sys
import time

import torch


def main():
    import torchvision

    import vmamba_cli.model as model_module
    from vmamba_cli.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(2)
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    torch.manual_seed(0)
    # SS2D.forward passes its module's scan_backend to the core: the identity model's cores are
    # marked "identity" and the patched core returns x for them (the rest of the block is unchanged).
    core = model_module.cross_selective_scan

    def core_or_identity(x, *params, backend="auto", **kwargs):
        return x.float() if backend == "identity" else core(x, *params, backend=backend, **kwargs)

    model_module.cross_selective_scan = core_or_identity
    real = model_module.create_model("vmamba-tiny").eval()
    identity = model_module.create_model("vmamba-tiny").eval()
    for module in identity.modules():
        if isinstance(module, model_module.SS2D):
            module.scan_backend = "identity"
    models = {"vmamba-tiny, identity cores": torch.compile(identity),
              "convnext_tiny": torch.compile(torchvision.models.convnext_tiny().eval()),
              "vmamba-tiny, real cores": torch.compile(real)}
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        for model in models.values():
            model(x)
        times = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    model(x)
                    runs.append(time.perf_counter() - start)
                times[name].append(statistics.median(runs))
    base = statistics.median(times["convnext_tiny"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:.3f} s   convnext_tiny / this: {base / median:.2f}x")


if __name__ == "__main__":
    main()
