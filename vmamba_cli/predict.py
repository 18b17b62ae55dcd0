"""Image classification with a VMamba model: files, folders and globs in, top-k classes out.

``predict`` is what `vmamba predict` runs. Unusable inputs (missing, unreadable, truncated, not an
image) become ``PredictFailure`` entries with a one-line reason; every other image is still predicted.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vmamba_cli.data import DEFAULT_MAX_PIXELS, eval_transform, find_images, load_image
from vmamba_cli.errors import ImageError, InputError
from vmamba_cli.export import is_onnx_file, load_onnx
from vmamba_cli.model import DEFAULT_MODEL
from vmamba_cli.runtime import (AMP_CHOICES, MAX_RESOLUTION, MIN_RESOLUTION, amp_name, autocast, check_memory,
                                check_resolution, resolve_amp, select_device)
from vmamba_cli.weights import LoadedModel, load_model, read_class_names

DEFAULT_TOPK = 5
DEFAULT_BATCH_SIZE = 16
DEFAULT_AMP = "auto"
_NONFINITE = "the model's output is not finite (NaN or inf): no prediction"


@dataclass
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass
class Prediction:
    path: str
    top: list[ClassScore]


@dataclass
class PredictFailure:
    path: str
    error: str


@dataclass
class PredictReport:
    """Everything one `vmamba predict` run produced (``to_dict`` is its --json document)."""

    model: str
    weights: str | None
    device: str
    resolution: int
    crop_pct: float
    topk: int
    amp: str                          # precision used: "none" (float32), "bf16" or "fp16"
    predictions: list[Prediction] = field(default_factory=list)
    failures: list[PredictFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self)


def _labels_for(loaded, labels: str | os.PathLike | Sequence[str] | None, num_classes: int) -> list[str]:
    if labels is None:
        names = loaded.class_names
    elif isinstance(labels, (str, os.PathLike)):
        names = read_class_names(labels)
        if names is None:
            raise InputError(f"{labels}: holds no class names")
        if len(names) != num_classes:
            raise InputError(f"{labels}: has {len(names)} class names but the model has {num_classes} classes")
    else:
        names = list(labels)
        if len(names) != num_classes:
            raise InputError(f"{len(names)} class names given but the model has {num_classes} classes")
    if names is None or len(names) != num_classes:
        names = [f"class {i}" for i in range(num_classes)]
    return [str(n) for n in names]


def _load(path: Path, transform, max_pixels: int) -> torch.Tensor:
    return transform(load_image(path, max_pixels=max_pixels))


def _failure(path: Path, exc: BaseException) -> PredictFailure:
    """A loader thread's exception as this file's failure: the run goes on with the other images."""
    if isinstance(exc, ImageError):
        return PredictFailure(exc.path, exc.problem)
    return PredictFailure(str(path), f"{type(exc).__name__}: {' '.join(str(exc).split())}")


def predict(inputs: Iterable[str | os.PathLike], *, model=None, weights=None, topk: int = DEFAULT_TOPK,
            device: str | torch.device = "auto", batch_size: int = DEFAULT_BATCH_SIZE,
            resolution: int | None = None, crop_pct: float | None = None, amp: str = DEFAULT_AMP,
            ema: bool = False,
            labels: str | os.PathLike | Sequence[str] | None = None, progress: bool = False,
            workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
            allow_non_finite: bool = False) -> PredictReport:
    """Top-``topk`` classes for every image found in ``inputs`` (files, folders, glob patterns).

    ``model`` is a registered name (default vmamba-tiny) or an already loaded ``LoadedModel``;
    ``weights`` a local ``.pth``/``.safetensors``, a registry name or a URL, or an ``.onnx`` file from
    `vmamba export` (run by onnxruntime on the CPU, with the file's class names and preset). With neither
    ``weights`` nor a loaded model, the official checkpoint of ``model`` is used (downloaded once into
    the cache). Images are preprocessed with the model's preset (``LoadedModel.preprocess``: the
    input size and crop a checkpoint recorded); ``resolution`` / ``crop_pct`` override it. ``amp``
    is the precision every command spells the same way (``vmamba_cli.runtime.resolve_amp``: auto,
    none, bf16, fp16). Bad weights raise ``CheckpointError``; bad images end up in ``report.failures``:
    unreadable files, non-regular files, images over ``max_pixels`` pixels (decompression bombs), any
    error of a loader thread, and images whose model output is not finite (NaN / inf).
    """
    if topk < 1:
        raise InputError(f"topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    check_resolution(resolution)
    if max_pixels < 1:
        raise InputError(f"max_pixels must be at least 1, got {max_pixels}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if amp not in AMP_CHOICES:
        raise InputError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    onnx = not isinstance(model, LoadedModel) and is_onnx_file(weights)
    if onnx:  # onnxruntime on the CPU, float32; the PyTorch model is never built
        device, amp = "cpu", "none"
    dev = select_device(device)
    amp_dtype = resolve_amp(amp, dev)
    if isinstance(model, LoadedModel):
        loaded = model
    elif onnx:
        loaded = load_onnx(weights)
    else:
        loaded = load_model(model, weights if weights is not None else (model or DEFAULT_MODEL), ema=ema,
                            allow_non_finite=allow_non_finite)
    net = loaded.model.to(dev).eval()
    num_classes = net.config.num_classes
    names = _labels_for(loaded, labels, num_classes)
    k = min(topk, num_classes)
    preprocess = loaded.preprocess.with_overrides(input_size=resolution, crop_pct=crop_pct)

    start = time.perf_counter()
    scan = find_images(inputs)
    # Before the first forward: the largest batch this run will make must fit in memory.
    check_memory(preprocess.input_size, max(1, min(batch_size, len(scan.files))), net.config.dims[0], dev,
                 patch_size=net.config.patch_size)
    report = PredictReport(model=loaded.name, weights=loaded.source, device=str(dev),
                           resolution=preprocess.input_size, crop_pct=preprocess.crop_pct, topk=k,
                           amp=amp_name(amp_dtype))
    report.failures.extend(PredictFailure(e.path, e.problem) for e in scan.errors)
    transform = eval_transform(preprocess)

    from tqdm import tqdm

    bar = tqdm(total=len(scan.files), unit="img", desc="predict", file=sys.stderr,
               disable=not progress or len(scan.files) < 2,
               leave=False, dynamic_ncols=True)
    workers = workers or min(8, os.cpu_count() or 1)
    with bar, ThreadPoolExecutor(max_workers=workers) as pool, torch.inference_mode():
        batches = [scan.files[i:i + batch_size] for i in range(0, len(scan.files), batch_size)]
        submit = lambda paths: [pool.submit(_load, p, transform, max_pixels) for p in paths]  # noqa: E731
        upcoming = submit(batches[0]) if batches else []
        for number, paths in enumerate(batches):
            # Decode the next batch in the threads while this one runs through the model.
            futures, upcoming = upcoming, (submit(batches[number + 1]) if number + 1 < len(batches) else [])
            tensors, kept = [], []
            for path, future in zip(paths, futures):
                try:
                    tensors.append(future.result())
                    kept.append(path)
                except Exception as exc:  # noqa: BLE001 -- one file's failure, whatever it is
                    report.failures.append(_failure(path, exc))
            if tensors:
                batch = torch.stack(tensors).to(dev, non_blocking=True)
                with autocast(dev, amp_dtype):
                    logits = net(batch).float()
                finite = torch.isfinite(logits).all(dim=-1).tolist()
                values, indices = logits.softmax(dim=-1).topk(k, dim=-1)
                for path, ok, vals, idxs in zip(kept, finite, values.tolist(), indices.tolist()):
                    if not ok:
                        report.failures.append(PredictFailure(str(path), _NONFINITE + (
                            "; try --amp none" if amp_dtype is not None else "")))
                        continue
                    report.predictions.append(Prediction(
                        str(path), [ClassScore(i, names[i], p) for i, p in zip(idxs, vals)]))
            bar.update(len(paths))
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["MAX_RESOLUTION", "MIN_RESOLUTION", "ClassScore", "Prediction", "PredictFailure", "PredictReport",
           "predict"]
