"""vmamba-tiny with every SS2D core replaced by the identity (y = x), in onnxruntime and in PyTorch eager:
what the rest of the network costs in each runtime (224x224, batch 8, 2 threads, median of 5 after 2 warm-ups).

    python no_scan_floor.py export FILE.onnx      (the ONNX file of the identity-core model)
    python no_scan_floor.py onnxruntime FILE.onnx
    python no_scan_floor.py torch [--full]        (--full: the real model, for reference)
"""
import statistics
import sys
import time

import numpy as np
import torch


def timed(forward, x):
    for _ in range(2):
        forward(x)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    import vmamba_cli.model as model_module
    from vmamba_cli.memory import tune_malloc

    tune_malloc()
    torch.set_num_threads(2)
    mode = sys.argv[1]
    if mode == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(sys.argv[2], options, providers=["CPUExecutionProvider"])
        x = np.random.randn(8, 3, 224, 224).astype(np.float32)
        print(f"onnxruntime, identity cores: {timed(lambda a: session.run(None, {'x': a}), x):.3f} s")
        return
    if "--full" not in sys.argv:
        model_module.cross_selective_scan = lambda x, *args, **kwargs: x.float()
    torch.manual_seed(0)
    model = model_module.create_model("vmamba-tiny").eval()
    if mode == "export":
        import vmamba_cli.export as export_module
        from onnxscript import opset18 as op

        export_module.cross_selective_scan_onnx = lambda x, *args: (op.Identity(x), op.Identity(x), op.Identity(x))
        export_module.export_onnx(model, sys.argv[2], resolution=224)
        return
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        label = "real cores" if "--full" in sys.argv else "identity cores"
        print(f"PyTorch eager, {label}: {timed(model, x):.3f} s")


if __name__ == "__main__":
    main()
