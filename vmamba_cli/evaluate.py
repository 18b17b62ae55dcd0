"""ImageNet-style evaluation of a classifier on an image folder, on one process or many (torchrun).

The folder holds one sub-folder per class. Folders are mapped to the model's class indices by, in order:

1. the class names stored in the checkpoint, when every folder name is one of them;
2. the ImageNet-1k WordNet ids (``n01440764`` ...) in their standard (sorted) order, when every folder is
   one and the head has 1000 classes: a validation subset with only some of the classes still maps right;
3. the sorted folder names, when their number equals the head's number of classes.

Multi-process runs shard the images without padding (process ``r`` of ``w`` takes images ``r, r+w, ...``)
and add the per-process sums with ``all_reduce``: every image is counted exactly once whatever the
dataset size. Images that cannot be read are counted and listed as failures, never dropped.
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from vmamba_cli import jsonout
from vmamba_cli.data import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Preprocess, class_subfolders, eval_transform,
                             find_images, load_image)
from vmamba_cli.errors import (EXIT_ERROR, EXIT_IMAGE_FAILURES, EXIT_OK, EXIT_USAGE, DataError, ImageError,  # noqa: F401
                               InputError)
from vmamba_cli.export import is_onnx_file, load_onnx
from vmamba_cli.metrics import TOPK, TopKAccumulator
from vmamba_cli.model import DEFAULT_MODEL
from vmamba_cli.runtime import Dist, amp_name, autocast, check_memory, check_resolution, process_group, resolve_amp
from vmamba_cli.weights import atomic_write, load_model

WNID_PATTERN = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids; position = class index of the standard (sorted) order."""
    from importlib.resources import files

    text = files("vmamba_cli").joinpath("imagenet_synsets.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


# -- classes -------------------------------------------------------------------------------------------

@dataclass
class ClassMapping:
    """Which model class index each class folder stands for."""

    folders: list[str]            # sorted folder names
    indices: list[int]            # model class index of each folder
    kind: str                     # "class-names" | "imagenet-wnid" | "sorted-folders"
    class_names: list[str] | None = None  # index -> human-readable name, when known

    def name_of(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return str(self.class_names[index])
        return str(index)


def class_folders(data_dir: str | os.PathLike) -> list[str]:
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected one sub-folder per class)")
    folders = class_subfolders(root)
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder per class)")
    return folders


def map_classes(data_dir: str | os.PathLike, num_classes: int,
                class_names: Sequence[str] | None = None) -> ClassMapping:
    """Map each class folder of ``data_dir`` to a class index of a head with ``num_classes`` outputs."""
    folders = class_folders(data_dir)
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) == num_classes:
        position = {str(n): i for i, n in enumerate(names)}
        if len(position) == len(names) and all(f in position for f in folders):
            return ClassMapping(folders, [position[f] for f in folders], "class-names", names)
    wnids = imagenet_wnids()
    wnid_index = {w: i for i, w in enumerate(wnids)}
    is_imagenet = all(WNID_PATTERN.match(f) and f in wnid_index for f in folders)
    if is_imagenet and num_classes == len(wnids):
        return ClassMapping(folders, [wnid_index[f] for f in folders], "imagenet-wnid", names)
    if len(folders) == num_classes:
        # Folder i is class i: the folder names are the labels (checkpoint names, if any, disagree).
        return ClassMapping(folders, list(range(num_classes)), "sorted-folders", folders)
    hint = (" (the folders are ImageNet WordNet ids, which need a 1000-class head)" if is_imagenet else
            " (folders map to classes in sorted order unless they are ImageNet WordNet ids or match "
            "the checkpoint's class names)")
    raise DataError(f"{Path(data_dir)}: {len(folders)} class folders but the model head has "
                     f"{num_classes} classes{hint}")


# -- data ----------------------------------------------------------------------------------------------

@dataclass
class FolderScan:
    samples: list[tuple[str, int]]   # (image path, model class index), in folder then path order
    ignored: int                     # files without an image extension, left out


def scan_image_folder(data_dir: str | os.PathLike, mapping: ClassMapping) -> FolderScan:
    root = Path(data_dir)
    samples: list[tuple[str, int]] = []
    ignored = 0
    for folder, index in zip(mapping.folders, mapping.indices):
        # An empty class folder only adds no samples (its "contains no images" is not an error here).
        scan = find_images([root / folder])
        samples.extend((str(path), index) for path in scan.files)
        ignored += scan.ignored
    if not samples:
        raise DataError(f"{root}: no images in its class folders (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return FolderScan(samples, ignored)


class EvalSample(NamedTuple):
    index: int                       # position in the whole (unsharded) dataset
    target: int
    image: torch.Tensor | None       # None when the file could not be read
    error: str | None


class EvalBatch(NamedTuple):
    images: torch.Tensor | None      # the readable images only
    targets: torch.Tensor
    indices: torch.Tensor
    failures: list[tuple[int, str]]  # (dataset index, reason) of unreadable images


class EvalImageDataset(torch.utils.data.Dataset):
    """(path, target) samples -> preprocessed tensors; an unreadable file yields a failure marker
    instead of raising, so that one bad JPEG does not kill the DataLoader or the run."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, indices: Sequence[int] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples = samples
        self.transform = transform
        self.indices = list(range(len(samples))) if indices is None else list(indices)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> EvalSample:
        index = self.indices[i]
        path, target = self.samples[index]
        try:
            image = self.transform(load_image(path, max_pixels=self.max_pixels))
        except ImageError as exc:
            return EvalSample(index, target, None, exc.problem)
        except Exception as exc:  # a decoder or transform error on one file must not stop the run
            return EvalSample(index, target, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        return EvalSample(index, target, image, None)


def collate_eval(samples: Sequence[EvalSample]) -> EvalBatch:
    ok = [s for s in samples if s.error is None]
    images = torch.stack([s.image for s in ok]) if ok else None
    return EvalBatch(images, torch.tensor([s.target for s in ok], dtype=torch.long),
                     torch.tensor([s.index for s in ok], dtype=torch.long),
                     [(s.index, s.error) for s in samples if s.error is not None])


# -- results -------------------------------------------------------------------------------------------

@dataclass
class EvalFailure:
    path: str
    reason: str


@dataclass
class Prediction:
    path: str
    target: int
    topk: list[int]
    probs: list[float]
    error: str | None = None

    @property
    def correct(self) -> bool:
        return bool(self.topk) and self.topk[0] == self.target


@dataclass
class EvalResult:
    model: str
    weights: str | None
    data_dir: str
    class_mapping: str
    num_classes: int
    num_class_folders: int
    num_images: int                  # images evaluated (readable)
    num_failed: int                  # images that could not be read
    correct_top1: int
    correct_top5: int
    top5_k: int                      # k of the "top-5" figure: min(5, num_classes)
    loss_sum: float
    wall_time_s: float
    resolution: int
    crop_pct: float
    device: str
    batch_size: int
    world_size: int
    amp: str | None
    ema: bool
    ignored_files: int = 0
    num_nonfinite: int = 0           # images whose logits hold NaN/inf (counted as wrong)
    failures: list[EvalFailure] = field(default_factory=list)
    predictions: list[Prediction] | None = None   # per image, dataset order, when asked for
    class_names: list[str] | None = field(default=None, repr=False)
    rank: int = 0

    @property
    def top1(self) -> float | None:
        return 100.0 * self.correct_top1 / self.num_images if self.num_images else None

    @property
    def top5(self) -> float | None:
        return 100.0 * self.correct_top5 / self.num_images if self.num_images else None

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.num_images if self.num_images else None

    @property
    def images_per_sec(self) -> float | None:
        return self.num_images / self.wall_time_s if self.wall_time_s > 0 else None

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def exit_code(self) -> int:
        return EXIT_IMAGE_FAILURES if self.num_failed else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `vmamba eval --json` (per-image predictions go to the CSV instead)."""
        return {
            "model": self.model, "weights": self.weights, "data_dir": self.data_dir,
            "top1": self.top1, "top5": self.top5, "top5_k": self.top5_k, "loss": _json_number(self.loss),
            "num_images": self.num_images, "num_failed": self.num_failed,
            "correct_top1": self.correct_top1, "correct_top5": self.correct_top5,
            "images_per_sec": self.images_per_sec, "wall_time_s": self.wall_time_s,
            "num_classes": self.num_classes, "num_class_folders": self.num_class_folders,
            "class_mapping": self.class_mapping, "ignored_files": self.ignored_files,
            "num_nonfinite": self.num_nonfinite,
            "resolution": self.resolution, "crop_pct": self.crop_pct, "device": self.device,
            "batch_size": self.batch_size, "world_size": self.world_size, "amp": self.amp, "ema": self.ema,
            "failures": [asdict(f) for f in self.failures],
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        text = jsonout.dumps(self.to_dict()) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def save_predictions(self, path: str | os.PathLike) -> Path:
        """Per-image CSV: path, target, the top-k classes with names and probabilities, correct, error."""
        if self.predictions is None:
            raise ValueError("no per-image predictions were collected (evaluate(..., predictions=True))")
        k = self.top5_k
        name = (lambda i: self.class_names[i] if self.class_names and 0 <= i < len(self.class_names) else "")
        header = ["path", "target", "target_name"]
        for j in range(1, k + 1):
            header += [f"pred_{j}", f"name_{j}", f"prob_{j}"]
        header += ["correct", "error"]

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                out = csv.writer(fh)
                out.writerow(header)
                for p in self.predictions:
                    row: list[Any] = [p.path, p.target, name(p.target)]
                    for j in range(k):
                        if j < len(p.topk):
                            row += [p.topk[j], name(p.topk[j]), f"{p.probs[j]:.6f}"]
                        else:
                            row += ["", "", ""]
                    row += ["" if p.error else int(p.correct), p.error or ""]
                    out.writerow(row)

        return atomic_write(path, write)


# -- evaluation ----------------------------------------------------------------------------------------

def _check_arguments(resolutions, *, batch_size: int, crop_pct: float | None, limit: int | None,
                     max_pixels: int) -> None:
    """Refuse bad evaluation arguments before a process group, a model or a data loader exists."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    for resolution in resolutions:
        check_resolution(resolution)
    if max_pixels < 1:
        raise InputError(f"max_pixels must be at least 1, got {max_pixels}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")


def evaluate(
    data_dir: str | os.PathLike,
    model: str | torch.nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    *,
    ema: bool = False,
    class_names: Sequence[str] | None = None,
    resolution: int | None = None,
    crop_pct: float | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    amp: str = "auto",
    limit: int | None = None,
    predictions: bool = False,
    progress: bool = False,
    distributed: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_non_finite: bool = False,
) -> EvalResult:
    """Evaluate a classifier on an image folder (one sub-folder per class).

    ``model`` is a registered name (built with ``vmamba_cli.weights.load_model(model, weights, ema=ema)``)
    or an ``nn.Module`` (then ``weights`` is ignored and ``class_names`` may name its classes).
    ``resolution`` / ``crop_pct`` left at None take the model's preset (docs/design.md §10): the one a
    checkpoint records (e.g. the input size a model was trained at), else the registered model's. ``amp`` is an ``--amp`` value (``vmamba_cli.runtime.resolve_amp``).
    ``distributed=None`` joins a torch.distributed group when launched by torchrun (``WORLD_SIZE`` > 1):
    gloo on CPU, nccl on CUDA. Every process returns the same totals; ``result.is_main_process`` says
    which one should print and write files. ``limit`` keeps the first N images (folder order). Images
    whose header claims more than ``max_pixels`` pixels are failures, never decoded.
    """
    _check_arguments([resolution], batch_size=batch_size, crop_pct=crop_pct, limit=limit, max_pixels=max_pixels)
    with process_group(device, distributed=distributed) as dist:
        return _evaluate(data_dir, _load(model, weights, ema, class_names, allow_non_finite), ema=ema, resolution=resolution,
                         crop_pct=crop_pct, dist=dist, batch_size=batch_size, workers=workers,
                         amp_dtype=resolve_amp(amp, dist.device), limit=limit, predictions=predictions,
                         progress=progress, max_pixels=max_pixels)


class _Loaded(NamedTuple):
    net: torch.nn.Module
    name: str
    source: str | None
    preset: Preprocess
    class_names: list[str] | None


def _load(model, weights, ema: bool, class_names, allow_non_finite: bool = False) -> _Loaded:
    if isinstance(model, torch.nn.Module):
        names = list(class_names) if class_names is not None else None
        return _Loaded(model, type(model).__name__, None, Preprocess(), names)
    # An .onnx file runs in onnxruntime, with its own class names and preset.
    loaded = (load_onnx(weights) if is_onnx_file(weights)
              else load_model(model, weights, ema=ema, allow_non_finite=allow_non_finite))
    names = list(class_names) if class_names is not None else loaded.class_names
    return _Loaded(loaded.model, loaded.name, loaded.source, loaded.preprocess, names)


def _evaluate(data_dir, loaded: _Loaded, *, ema, resolution, crop_pct, dist: Dist, batch_size, workers,
              amp_dtype, limit, predictions, progress, max_pixels=DEFAULT_MAX_PIXELS) -> EvalResult:
    dev, rank, world_size = dist.device, dist.rank, dist.world_size
    net, model_name, source, names = loaded.net, loaded.name, loaded.source, loaded.class_names
    preset = loaded.preset.with_overrides(input_size=resolution, crop_pct=crop_pct)
    num_classes = _num_classes(net)
    mapping = map_classes(data_dir, num_classes, names)
    scan = scan_image_folder(data_dir, mapping)
    samples = scan.samples[:limit] if limit else scan.samples
    _check_memory(net, preset.input_size, max(1, min(batch_size, -(-len(samples) // world_size))), dev)

    # Shard by stride, without padding: each image lands on exactly one process.
    dataset = EvalImageDataset(samples, eval_transform(preset),
                               indices=range(rank, len(samples), world_size), max_pixels=max_pixels)
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) // world_size - 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_eval, pin_memory=dev.type == "cuda",
                                         persistent_workers=False)
    net = net.to(dev).eval()

    accumulator = TopKAccumulator(num_classes, TOPK, dev)
    failures: list[tuple[int, str]] = []
    rows: list[tuple[int, int, list[int], list[float]]] = []
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), unit="img", desc="eval", file=sys.stderr, dynamic_ncols=True,
                   leave=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            failures.extend(batch.failures)
            if batch.images is not None:
                images = batch.images.to(dev, non_blocking=True)
                targets = batch.targets.to(dev, non_blocking=True)
                with autocast(dev, amp_dtype):
                    logits = net(images)
                top_idx, top_probs = accumulator.update(logits, targets)
                if predictions:
                    for i, t, idx, p in zip(batch.indices.tolist(), batch.targets.tolist(),
                                            top_idx.cpu().tolist(), top_probs.float().cpu().tolist()):
                        rows.append((i, t, idx, p))
            if bar is not None:
                # Progress counts the whole job: this shard times the number of processes.
                bar.update((len(batch.indices) + len(batch.failures)) * world_size)
    if bar is not None:
        bar.close()

    totals = accumulator.totals(dist)
    gathered = dist.all_gather((failures, rows if predictions else None))
    failures = [f for part in gathered for f in part[0]]
    if predictions:
        rows = [r for part in gathered for r in part[1]]
    wall = time.perf_counter() - start

    failures.sort()
    failure_list = [EvalFailure(samples[i][0], reason) for i, reason in failures]
    prediction_list = None
    if predictions:
        prediction_list = [Prediction(samples[i][0], t, idx, p) for i, t, idx, p in rows]
        prediction_list += [Prediction(samples[i][0], samples[i][1], [], [], reason) for i, reason in failures]
        order = {path: i for i, (path, _) in enumerate(samples)}
        prediction_list.sort(key=lambda p: order[p.path])

    return EvalResult(
        model=model_name, weights=source, data_dir=str(data_dir), class_mapping=mapping.kind,
        num_classes=num_classes, num_class_folders=len(mapping.folders), num_images=totals.count,
        num_failed=len(failures), correct_top1=totals.correct_top1, correct_top5=totals.correct_topk,
        top5_k=totals.k, loss_sum=totals.loss_sum, wall_time_s=wall, resolution=preset.input_size, crop_pct=preset.crop_pct,
        device=str(dev), batch_size=batch_size, world_size=world_size,
        amp=amp_name(amp_dtype) if amp_dtype is not None else None, ema=ema, ignored_files=scan.ignored,
        num_nonfinite=totals.nonfinite, failures=failure_list, predictions=prediction_list,
        class_names=mapping.class_names, rank=rank,
    )


# -- accuracy against resolution ----------------------------------------------------------------------

@dataclass
class ResolutionSweep:
    """One model evaluated at several input sizes (the paper's generalisation-to-resolution test)."""

    label: str                       # how tables and plots name the model (weights file stem by default)
    results: list[EvalResult]        # one per resolution, in the order asked
    preset_resolution: int           # the input size of the model's preset (a checkpoint's training size)

    @property
    def resolutions(self) -> list[int]:
        return [r.resolution for r in self.results]

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=EXIT_OK)

    @property
    def is_main_process(self) -> bool:
        return all(r.is_main_process for r in self.results)


def evaluate_resolutions(
    data_dir: str | os.PathLike,
    model: str | torch.nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    *,
    resolutions: Sequence[int | None],
    label: str | None = None,
    ema: bool = False,
    class_names: Sequence[str] | None = None,
    crop_pct: float | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    amp: str = "auto",
    limit: int | None = None,
    progress: bool = False,
    distributed: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_non_finite: bool = False,
) -> ResolutionSweep:
    """:func:`evaluate` at each of ``resolutions`` with the model built and its weights loaded once
    (None in ``resolutions``: the model's own size, as :func:`evaluate` without a resolution).

    Every resolution uses the same evaluation transform (resize the short side to resolution / crop_pct,
    center-crop), so the images show the same content at more or fewer pixels, as in the paper's
    test at larger inputs. VMamba has no position embedding, so one model runs at any size. Under
    torchrun the counts are exact at every resolution, as for :func:`evaluate`.
    """
    resolutions = [None if r is None else int(r) for r in resolutions]
    if not resolutions:
        raise InputError("give at least one resolution")
    _check_arguments(resolutions, batch_size=batch_size, crop_pct=crop_pct, limit=limit, max_pixels=max_pixels)

    with process_group(device, distributed=distributed) as dist:
        loaded = _load(model, weights, ema, class_names, allow_non_finite)
        amp_dtype = resolve_amp(amp, dist.device)
        results = [_evaluate(data_dir, loaded, ema=ema, resolution=r, crop_pct=crop_pct, dist=dist,
                             batch_size=batch_size, workers=workers, amp_dtype=amp_dtype, limit=limit,
                             predictions=False, progress=progress, max_pixels=max_pixels) for r in resolutions]
    if label is None:
        label = Path(str(loaded.source)).stem if loaded.source else loaded.name
    return ResolutionSweep(label, results, loaded.preset.input_size)


class ModelRun(NamedTuple):
    """One model of a comparison: what ``evaluate_resolutions`` gets, and its row / legend label."""
    model: str | None
    weights: str | None
    label: str


def model_runs(models: Sequence[str | None] | None, weights: Sequence[str | None] | None) -> list[ModelRun]:
    """Pair ``--model`` and ``--weights`` values (None or empty: the default model, its default
    weights): one of either side serves every entry of the other,
    otherwise they pair in order (ValueError when the counts differ). Labels are the weights files'
    stems (else the model names), made unique with the parent folder, then the whole path, when they
    collide."""
    models, weights = list(models or [None]), list(weights or [None])
    if len(models) == 1:
        models = models * len(weights)
    elif len(weights) == 1:
        weights = weights * len(models)
    if len(models) != len(weights):
        raise ValueError(f"{len(models)} --model and {len(weights)} --weights: give one --model for all, "
                         f"or one per --weights")
    stems = [Path(w).stem if w else (m or DEFAULT_MODEL) for w, m in zip(weights, models)]
    labels = stems
    if len(set(stems)) < len(stems):
        labels = [f"{Path(w).parent.name}/{Path(w).stem}" if w else s for w, s in zip(weights, stems)]
        if len(set(labels)) < len(labels):
            labels = [w or s for w, s in zip(weights, stems)]
    return [ModelRun(m, w, label) for m, w, label in zip(models, weights, labels)]


def sweep_document(sweeps: Sequence[ResolutionSweep]) -> dict[str, Any]:
    """The JSON document of `vmamba eval --json` for one or more models at one or more resolutions.

    ``rows`` is always present: one :meth:`EvalResult.to_dict` per (model, resolution), with ``label``.
    With one model at one resolution the top level is also that row's document (the shape of a plain
    `vmamba eval --json`); otherwise the top level holds what the rows share (``data_dir``, ``device``,
    ``batch_size``, ``world_size``, ``amp``) and the lists ``labels`` and ``resolutions``.
    """
    rows = [{"label": sweep.label, **result.to_dict()} for sweep in sweeps for result in sweep.results]
    if len(rows) == 1:
        single = {k: v for k, v in rows[0].items() if k != "label"}
        return {**single, "rows": rows}
    first = rows[0] if rows else {}
    return {
        **{key: first.get(key) for key in ("data_dir", "device", "batch_size", "world_size", "amp")},
        "labels": [sweep.label for sweep in sweeps],
        "resolutions": sorted({r for sweep in sweeps for r in sweep.resolutions}),
        "rows": rows,
    }


def plot_accuracy_vs_resolution(sweeps: Sequence[ResolutionSweep], path: str | os.PathLike,
                                title: str | None = None) -> Path:
    """Top-1 against input resolution, one line per model, as a PNG (written atomically). A dotted
    vertical line marks each model's preset size (the size a `vmamba train` checkpoint was trained at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for sweep in sweeps:
        points = sorted((r.resolution, r.top1) for r in sweep.results if r.top1 is not None)
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sweep.label)
        ax.axvline(sweep.preset_resolution, color=line.get_color(), linestyle=":", alpha=0.6)
    resolutions = sorted({r for sweep in sweeps for r in sweep.resolutions})
    ax.set_xticks(resolutions)
    ax.set_xlabel("input resolution (pixels; dotted: the model's own size)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    first = sweeps[0].results[0] if sweeps and sweeps[0].results else None
    ax.set_title(title or (f"accuracy against resolution on {first.data_dir}" if first else ""))
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # JSON has no NaN


def _check_memory(net: torch.nn.Module, resolution: int, batch_size: int, device: torch.device) -> None:
    """Refuse a batch whose activations cannot fit (vmamba_cli.runtime.check_memory); models without
    a VMamba config are estimated with the stem width of vmamba-tiny's patch embedding (96 at 1/4)."""
    config = getattr(net, "config", None)
    dims = getattr(config, "dims", None)
    check_memory(resolution, batch_size, int(dims[0]) if dims else 96, device,
                 patch_size=int(getattr(config, "patch_size", 4) or 4))


def _num_classes(net: torch.nn.Module) -> int:
    config = getattr(net, "config", None)
    n = getattr(config, "num_classes", None) or getattr(net, "num_classes", None)
    if not n:
        raise InputError("the model has no classifier head (num_classes is 0)")
    return int(n)


__all__ = [
    "EXIT_ERROR", "EXIT_IMAGE_FAILURES", "EXIT_OK", "EXIT_USAGE", "ClassMapping", "EvalBatch", "EvalFailure",
    "EvalImageDataset", "EvalResult", "EvalSample", "ModelRun", "Prediction", "ResolutionSweep", "class_folders",
    "collate_eval", "evaluate", "evaluate_resolutions", "imagenet_wnids", "map_classes", "model_runs",
    "plot_accuracy_vs_resolution",
    "scan_image_folder", "sweep_document",
]
