"""Training images/s, eager against torch.compile, for vmamba-tiny and torchvision peers.

    python benchmarks/bench_compile_train.py [--device cuda] [--models vmamba-tiny swin_t]
                                             [--batch 64] [--resolution 224] [--steps 20] [--amp bf16]

For each model: one SGD training step (random images and labels, cross-entropy) repeated; the eager
model is timed first, then ``torch.compile`` of the same model (``fullgraph=True`` for VMamba, whose
forward and backward are one graph with the scan operators inside). The first compiled steps are
the compile (reported, not timed). Figures: images/s of ``--steps`` timed steps after ``--warmup``
steps, with a device synchronise around the timed loop; then compiled / eager per model and each
model against the first one. On a CPU it runs as a smoke test of the script (small sizes:
``--device cpu --batch 2 --resolution 64 --steps 2``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _build(name: str, num_classes: int) -> torch.nn.Module:
    if name.startswith("vmamba"):
        from vmamba_cli.model import create_model

        return create_model(name, num_classes=num_classes)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(model, x, y, *, device, amp, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first step, images/s over ``steps`` steps after ``warmup`` more)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return first, steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["vmamba-tiny", "swin_t"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()

    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    if device.type == "cpu" and amp is torch.float16:
        parser.error("--amp fp16 needs a GPU")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch}, {args.resolution}px, amp {args.amp}, "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for model_name in args.models:
        model = _build(model_name, 1000).to(device).train()
        first, eager = _images_per_s(model, x, y, device=device, amp=amp, warmup=args.warmup, steps=args.steps)
        compiled_model = torch.compile(model, fullgraph=model_name.startswith("vmamba"))
        compile_s, compiled = _images_per_s(compiled_model, x, y, device=device, amp=amp, warmup=args.warmup,
                                            steps=args.steps)
        rows.append({"model": model_name, "eager_img_s": eager, "compiled_img_s": compiled,
                     "first_compiled_step_s": compile_s})
        print(f"{model_name:16s} eager {eager:9.1f} img/s   compiled {compiled:9.1f} img/s   "
              f"compiled / eager {compiled / eager:.2f}x   first compiled step {compile_s:.0f} s", flush=True)
        del model, compiled_model
        torch._dynamo.reset()
    reference = rows[0]
    for row in rows[1:]:
        print(f"{reference['model']} / {row['model']}: eager {reference['eager_img_s'] / row['eager_img_s']:.2f}x, "
              f"compiled {reference['compiled_img_s'] / row['compiled_img_s']:.2f}x", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
