"""PyTorch eager forwards right after onnxruntime ran in the same process (vmamba-tiny, 224, batch 8).

    python benchmarks/results/2026-12-03-cpu-2vcpu/after_onnxruntime.py MODEL.onnx [--tuned]

MODEL.onnx: `vmamba export --format onnx --no-dynamic --resolution 224` of a vmamba-tiny (any weights).
"""
import sys
import time

import torch

if "--tuned" in sys.argv:
    from vmamba_cli.memory import tune_malloc
    tune_malloc()
from vmamba_cli.export import OnnxClassifier
from vmamba_cli.model import create_model

torch.set_num_threads(2)
model = create_model("vmamba-tiny").eval()
x = torch.randn(8, 3, 224, 224)


def timed(n=3):
    with torch.inference_mode():
        out = []
        for _ in range(n):
            start = time.perf_counter()
            model(x)
            out.append(round(time.perf_counter() - start, 3))
    return out


with torch.inference_mode():
    model(x)
print("malloc tuned" if "--tuned" in sys.argv else "malloc untuned")
print("PyTorch before onnxruntime ran:", timed())
clf = OnnxClassifier(sys.argv[1], threads=2)
for _ in range(3):
    clf(x)
print("PyTorch right after onnxruntime ran:", timed())
