"""Compiled vmamba-tiny with identity SS2D cores (y = x), with its real cores, and compiled torchvision
convnext_tiny, 224x224 batch 8, 2 threads, all in one process, timed in interleaved rounds (median of
the per-round medians): what torch.compile leaves beside the scan.

    python compile_no_scan.py [--rounds 5]
"""
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F


def identity_core_forward(self, x):
    """SS2D.forward (vmamba_cli/model.py) with the SS2D core replaced by the identity."""
    cdim = self.layout.channel_dim
    x = self.in_proj(x)
    if self.gated:
        x, z = x.chunk(2, dim=cdim)
    if not self.layout.channels_first:
        x = x.permute(0, 3, 1, 2)
    if self.conv2d is not None:
        x = self.conv2d(x)
    y = F.silu(x).float()
    if not self.layout.channels_first:
        y = y.permute(0, 2, 3, 1)
    y = self.out_norm(y.to(self.out_norm.weight.dtype))
    if self.gated:
        y = y * F.silu(z)
    return self.dropout(self.out_proj(y.to(x.dtype)))


def main():
    import torchvision

    import vmamba_cli.model as model_module
    from vmamba_cli.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(2)
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    torch.manual_seed(0)
    real = model_module.create_model("vmamba-tiny").eval()
    identity = model_module.create_model("vmamba-tiny").eval()
    for module in identity.modules():
        if isinstance(module, model_module.SS2D):
            module.forward = types.MethodType(identity_core_forward, module)
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
