"""`vmamba train`: the official recipe (spec §9) in one process or under ``torchrun`` (DDP).

``train(config)`` runs or continues the run in ``config.output`` and returns its summary. The run
folder holds::

    config.json              resolved settings + derived numbers (world size, effective batch, LRs)
    metrics.jsonl            one JSON line per epoch: loss, lr, top-1/top-5 of the model and its EMA, images/s
    summary.json             final (or interrupted / diverged) state of the run
    curves.png               loss and accuracy per epoch
    last.safetensors         model weights (+ EMA under ema.*) with class names: usable by predict / eval
    best.safetensors         the same for the epoch with the best held-out top-1
    last.state.safetensors   everything needed to continue exactly: model, EMA, optimizer, scheduler,
                             scaler, epoch / position in the epoch, RNG states of every rank

Every file is written to a temporary name and renamed. Resuming (automatic when the run folder
holds a state) continues exactly: with the same settings and ``workers=0`` an interrupted and
resumed run ends with the same weights and metrics as an uninterrupted one, also when stopped
mid-epoch (with workers > 0 it is exact at epoch boundaries).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vmamba_cli.device import select_device
from vmamba_cli.schedule import ModelEma, WarmupCosineSchedule, scale_lr, weight_decay_groups
from vmamba_cli.train_config import RESUME_CHANGEABLE, TrainConfig, apply_overrides
from vmamba_cli.train_data import (MixupCutmix, ResumableDistributedSampler, ShardSampler, build_datasets,
                                   eval_transform, soft_target_cross_entropy, steps_per_epoch, train_transform)

STATE_FILE = "last.state.safetensors"
STATE_FORMAT = "vmamba-train-state"
ARCH_FIELDS = ("dims", "depths", "d_state", "ssm_ratio", "dt_rank", "ssm_conv", "ssm_conv_bias", "gated",
               "mlp_ratio", "channels_first", "stem", "downsample", "patch_size", "in_chans")


class TrainingDiverged(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the message says where and which checkpoint is good."""


class ResumeError(ValueError):
    """A run folder or state file that cannot be continued with the given settings."""


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Distributed setup
# ------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or one rank of a ``torchrun`` job (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device, local_rank=local_rank if world > 1 else None)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    initialized = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        initialized = True
    return Dist(rank, world, local_rank, dev, initialized)


# ------------------------------------------------------------------------------------------------
# RNG states (JSON-serialisable, so they travel in the state file's metadata)
# ------------------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# State files: tensors in safetensors, the rest as JSON metadata (nothing is ever unpickled)
# ------------------------------------------------------------------------------------------------

def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key} and collect it."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_join_tensors(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def write_state(path: Path, parts: dict[str, Any]) -> Path:
    """Write nested dicts of tensors and plain values to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    from vmamba_cli.weights import atomic_write

    tensors: dict[str, torch.Tensor] = {}
    skeleton = {name: _split_tensors(value, name, tensors) for name, value in parts.items()}
    metadata = {"format": STATE_FORMAT, "state": json.dumps(skeleton)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise ResumeError(f"{path}: not a readable training state ({' '.join(str(exc).split())[:160]})") from None
    if metadata.get("format") != STATE_FORMAT or "state" not in metadata:
        raise ResumeError(f"{path}: not a vmamba training state file")
    skeleton = json.loads(metadata["state"])
    return {name: _join_tensors(value, tensors) for name, value in skeleton.items()}


def find_state(path: str | os.PathLike) -> Path:
    """The state file for ``--resume PATH`` (a run folder or the state file itself)."""
    path = Path(path)
    candidate = path / STATE_FILE if path.is_dir() else path
    if not candidate.exists():
        where = f"{path} holds no {STATE_FILE}" if path.is_dir() else f"{path}: no such file or run folder"
        raise ResumeError(f"{where}; nothing to resume")
    return candidate


def config_for_resume(resume: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The saved settings of a run, with the ``overrides`` that may change when continuing it."""
    state_path = find_state(resume)
    state = read_state(state_path)
    config = apply_overrides(TrainConfig(), state["config"])
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    forbidden = sorted(k for k, v in overrides.items()
                       if k not in RESUME_CHANGEABLE and getattr(config, k, object()) != v)
    if forbidden:
        raise ResumeError(f"{state_path}: {', '.join(forbidden)} cannot change when resuming "
                          f"(changeable: {', '.join(sorted(RESUME_CHANGEABLE))})")
    overrides["output"] = str(state_path.parent)
    return apply_overrides(config, overrides)


# ------------------------------------------------------------------------------------------------
# Model building
# ------------------------------------------------------------------------------------------------

def set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth increasing linearly over all blocks up to ``rate`` (the official rule)."""
    from vmamba_cli.model import DropPath

    paths = [m for m in model.modules() if isinstance(m, DropPath)]
    for module, p in zip(paths, torch.linspace(0, rate, len(paths)).tolist()):
        module.p = p
    model.config = model.config.replace(drop_path_rate=rate)


def build_model(config: TrainConfig, num_classes: int, arch: dict | None = None):
    """(model, registered name or "custom"). ``arch`` (a saved VMambaConfig) wins when resuming."""
    from vmamba_cli.model import VMambaConfig, VSSM, create_model, get_model_spec, resolve_model_name

    name = resolve_model_name(config.model)
    if arch is not None:
        model = VSSM(VMambaConfig.from_dict(arch))
    elif config.pretrained:
        from vmamba_cli.weights import load_model

        arch_overrides = sorted(set(config.model_config) - {"drop_path_rate"})
        if arch_overrides:
            raise ValueError(f"model_config {', '.join(arch_overrides)} cannot be combined with --pretrained "
                             "(the architecture comes from the weights)")
        loaded = load_model(config.model, config.pretrained, num_classes=num_classes)
        model = loaded.model
        name = loaded.name
        if "drop_path_rate" in config.model_config:
            set_drop_path(model, float(config.model_config["drop_path_rate"]))
    else:
        overrides = dict(config.model_config)
        for key in ("dims", "depths"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        model = create_model(name, num_classes=num_classes, **overrides)
    if config.drop_path is not None:
        set_drop_path(model, config.drop_path)
    spec = get_model_spec(name) if name != "custom" else None
    if spec is not None and any(getattr(model.config, f) != getattr(spec.config, f) for f in ARCH_FIELDS):
        name = "custom"
    model.set_scan_backend(config.scan_backend)
    return model, name


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dist: Dist, autocast) -> dict[str, float]:
    """Held-out loss, top-1 and top-5 (percent), summed exactly over the ranks' shards."""
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0.0, 0.0, 0.0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    loss_sum, correct1, correct5, count = dist.all_reduce_sum([loss_sum, correct1, correct5, count])
    model.train(was_training)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count}


# ------------------------------------------------------------------------------------------------
# Stop requests (Ctrl-C / SIGTERM)
# ------------------------------------------------------------------------------------------------

class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the run to stop after the current step and save; a second
    Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._log("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

@dataclass
class StepInfo:
    """What hooks see after each optimizer step."""

    epoch: int            # 0-based epoch being trained
    step: int             # optimizer steps done in this epoch
    global_step: int
    loss: float
    lr: float
    stop: StopRequest


def _output_dir(config: TrainConfig) -> Path:
    data_name = "digits" if config.data == "digits" else (Path(config.data).name or "data")
    return Path(config.output.format(data=data_name, model=config.model))


def _amp_dtype(config: TrainConfig, device: torch.device):
    if config.amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]


def _weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _json_line(record: dict) -> str:
    return json.dumps(record, allow_nan=True)


def _write_json(path: Path, obj: Any) -> None:
    from vmamba_cli.weights import atomic_write

    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: Path, title: str = "") -> Path | None:
    """Loss (train / held-out) and top-1 (model / EMA) per epoch as a PNG."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vmamba_cli.weights import atomic_write

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train (soft targets)")
    ax_loss.plot(epochs, [r["val_loss"] for r in records], marker="o", label="held-out")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["top1"] for r in records], marker="o", label="model top-1")
    if any(r.get("ema_top1") is not None for r in records):
        ax_acc.plot(epochs, [r.get("ema_top1") for r in records], marker="o", label="EMA top-1")
    ax_acc.plot(epochs, [r["top5"] for r in records], linestyle="--", label="model top-5")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = None,
          hooks: Iterable[Callable[[StepInfo], None]] = (), auto_resume: bool = True) -> dict[str, Any]:
    """Train (or continue) the run of ``config`` and return its summary (also in summary.json).

    ``summary["status"]`` is "completed", "interrupted" (stop request: a resumable checkpoint was
    saved) or "already-complete". A NaN/inf loss raises ``TrainingDiverged`` after writing
    summary.json; the checkpoints on disk are those of the last good epoch.
    """
    log = log or _log_stderr
    dist = setup_distributed(config.device)
    previous_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _Run(config, dist, progress, log if dist.is_main else (lambda _m: None), list(hooks),
                    auto_resume).run()
    finally:
        torch.set_num_threads(previous_threads)
        if dist.initialized_here:
            torch.distributed.destroy_process_group()


class _Run:
    def __init__(self, config: TrainConfig, dist: Dist, progress: bool, log, hooks, auto_resume: bool):
        self.config, self.dist, self.log, self.hooks = config, dist, log, hooks
        self.progress = progress and dist.is_main
        self.device = dist.device
        self.run_dir = _output_dir(config)
        self.state_path = self.run_dir / STATE_FILE
        self.auto_resume = auto_resume

    # -- setup ----------------------------------------------------------------------------------
    def _load_resume_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        if not self.auto_resume:
            raise ResumeError(f"{self.run_dir} already holds a run ({STATE_FILE}); resume it or choose another output")
        state = read_state(self.state_path)
        saved = apply_overrides(TrainConfig(), state["config"])
        current = self.config.to_dict()
        diffs = [f"{k}: {v!r} -> {current[k]!r}" for k, v in saved.to_dict().items()
                 if k not in RESUME_CHANGEABLE and current.get(k) != v]
        if diffs:
            raise ResumeError(f"{self.run_dir} holds a run with other settings ({'; '.join(diffs[:4])}); "
                              f"continue it with --resume {self.run_dir}, or choose another --output")
        return state

    def _setup(self) -> None:
        c, dist = self.config, self.dist
        self.resume_state = self._load_resume_state()
        # The same initial weights on every rank (DDP would broadcast rank 0's anyway, but the EMA
        # copy and a restarted rank must agree); augmentation streams then differ per rank.
        seed_everything(c.seed)

        self.data = build_datasets(
            c.data, c.image_size,
            train_transform=train_transform(
                c.image_size, crop_scale=c.crop_scale, crop_ratio=c.crop_ratio, hflip=c.hflip,
                randaugment=c.randaugment, randaugment_ops=c.randaugment_ops,
                randaugment_magnitude=c.randaugment_magnitude, random_erasing=c.random_erasing,
                interpolation=c.interpolation),
            eval_transform_fn=lambda crop_pct: eval_transform(c.image_size, crop_pct, c.interpolation),
            val_fraction=c.val_fraction, split_seed=c.split_seed, subset=c.subset, crop_pct=c.eval_crop_pct)
        self.class_names = list(self.data.class_names)
        num_classes = c.num_classes or len(self.class_names)
        if num_classes < len(self.class_names):
            raise ValueError(f"num_classes={num_classes} but the data has {len(self.class_names)} classes")
        if num_classes > len(self.class_names):
            self.class_names += [f"class_{i}" for i in range(len(self.class_names), num_classes)]
        self.num_classes = num_classes

        arch = self.resume_state["arch"] if self.resume_state else None
        model, self.model_name = build_model(c, num_classes, arch)
        if self.resume_state is not None:
            self.model_name = self.resume_state.get("model_name", self.model_name)
        self.model = model.to(self.device)
        if dist.rank:
            seed_everything(c.seed + dist.rank)

        self.world = dist.world_size
        self.effective_batch = c.batch_size * self.world * c.accum_steps
        scale = (lambda lr: scale_lr(lr, self.effective_batch, c.lr_scale_batch)) if c.lr_scale_batch else (lambda lr: lr)
        self.lrs = {"lr": scale(c.lr), "warmup_lr": scale(c.warmup_lr), "min_lr": scale(c.min_lr)}
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), c.batch_size, self.world, c.accum_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.data.train)} training images are fewer than one step of "
                             f"{self.effective_batch} (batch {c.batch_size} x {self.world} processes x "
                             f"{c.accum_steps} accumulation); lower the batch size")
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, c.weight_decay), lr=self.lrs["lr"],
                                           betas=tuple(c.betas), eps=c.eps)
        self.schedule = WarmupCosineSchedule(
            self.optimizer, base_lr=self.lrs["lr"], warmup_lr=self.lrs["warmup_lr"], min_lr=self.lrs["min_lr"],
            warmup_steps=round(c.warmup_epochs * self.steps_per_epoch), total_steps=c.epochs * self.steps_per_epoch)
        self.amp_dtype = _amp_dtype(c, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.mixer = MixupCutmix(num_classes, mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                                 switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing)

        module: nn.Module = self.model
        if dist.enabled:
            import warnings

            from torch.nn.parallel import DistributedDataParallel

            # Depthwise conv weights (C, 1, k, k) have a stride quirk on their size-1 axis; harmless.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp_module = module
        # After the DDP wrap, which copies rank 0's weights into every rank's model.
        self.ema = ModelEma(self.model, c.ema_decay) if c.ema else None
        # dynamic=False: a smaller last batch recompiles instead of tracing symbolic shapes, which
        # inductor 2.14 fails on for this model ("cannot determine truth value of Relational").
        self.train_module = torch.compile(module, dynamic=False) if c.compile else module
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.sampler = ResumableDistributedSampler(self.data.train, num_replicas=self.world, rank=dist.rank,
                                                   shuffle=True, seed=c.seed)
        self.val_loader = self._loader(self.data.val, ShardSampler(len(self.data.val), self.world, dist.rank),
                                       batch_size=c.batch_size * 2, drop_last=False)

        # Position and history (overwritten when resuming).
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.best = {"top1": -1.0, "epoch": 0}
        self.acc = self._fresh_accumulators()
        if self.resume_state is not None:
            self._restore(self.resume_state)

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool, generator=None):
        c = self.config
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=c.workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda", generator=generator,
            persistent_workers=False)

    @staticmethod
    def _fresh_accumulators() -> dict[str, float]:
        return {"loss_sum": 0.0, "samples": 0.0, "train_time": 0.0}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- checkpoints ----------------------------------------------------------------------------
    def _metadata(self, extra: dict | None = None) -> dict[str, Any]:
        c = self.config
        meta = {"source": "vmamba train", "epoch": self.epoch, "image_size": c.image_size,
                "eval_crop_pct": self.data.eval_crop_pct, "data": self.data.description,
                "run": str(self.run_dir)}
        meta.update(extra or {})
        return meta

    def _weights_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.model.state_dict())
        if self.ema is not None:
            state.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return state

    def _save_weights(self, path: Path, extra: dict | None = None) -> None:
        from vmamba_cli.weights import save_model

        save_model(path, self.model, name=self.model_name, class_names=self.class_names,
                   extra=self._metadata(extra), state_dict=self._weights_state())

    def _save_state(self, rng_all: list[dict]) -> None:
        parts = {
            "config": self.config.to_dict(),
            "arch": self.model.config.to_dict(),
            "position": {"epoch": self.epoch, "batches_done": self.batches_done, "global_step": self.global_step,
                         "world_size": self.world},
            "best": dict(self.best),
            "accumulators": dict(self.acc),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_all,
            "class_names": self.class_names,
            "model_name": self.model_name,
        }
        write_state(self.state_path, parts)

    def _checkpoint(self, *, best: bool, top1: float | None) -> None:
        """Every rank's RNG state goes into the state file; rank 0 writes (state first, then weights)."""
        rng_all = self.dist.all_gather(capture_rng(self.device))
        if self.dist.is_main:
            self._save_state(rng_all)
            extra = {"top1": top1, "mid_epoch_step": self.batches_done // self.config.accum_steps or None}
            self._save_weights(self.run_dir / "last.safetensors", extra)
            if best:
                self._save_weights(self.run_dir / "best.safetensors", {"top1": top1})
        self.dist.barrier()

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        pos = state["position"]
        self.epoch, self.batches_done, self.global_step = int(pos["epoch"]), int(pos["batches_done"]), int(pos["global_step"])
        self.best = dict(state["best"])
        self.acc = dict(state["accumulators"])
        rng = state["rng"]
        if int(pos["world_size"]) != self.world:
            # Another partition of the data: restart the epoch that was in progress.
            self.log(f"resuming with {self.world} processes instead of {pos['world_size']}: "
                     f"epoch {self.epoch + 1} restarts from its beginning (not bit-exact)")
            self.global_step -= self.batches_done // self.config.accum_steps
            self.schedule.load_state_dict({"step_index": self.global_step})
            self.batches_done, self.acc = 0, self._fresh_accumulators()
            seed_everything(self.config.seed + self.dist.rank + 1_000_003 * self.epoch)
        else:
            restore_rng(rng[self.dist.rank], self.device)
        # Lines past the saved epoch came from an epoch that did not reach its checkpoint.
        if self.dist.is_main:
            records = [r for r in read_metrics(self.run_dir) if r["epoch"] <= self.epoch]
            from vmamba_cli.weights import atomic_write

            text = "".join(_json_line(r) + "\n" for r in records)
            atomic_write(self.run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))
        where = f"epoch {self.epoch + 1}, step {self.batches_done // self.config.accum_steps}" if self.batches_done \
            else f"the end of epoch {self.epoch}"
        self.log(f"resuming {self.run_dir} from {where}")

    # -- files ----------------------------------------------------------------------------------
    def _resolved(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "derived": {
                "run_dir": str(self.run_dir), "world_size": self.world, "effective_batch": self.effective_batch,
                "lr": self.lrs["lr"], "warmup_lr": self.lrs["warmup_lr"], "min_lr": self.lrs["min_lr"],
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.config.epochs * self.steps_per_epoch,
                "warmup_steps": self.schedule.warmup_steps, "num_classes": self.num_classes,
                "model_name": self.model_name, "params": _count_params(self.model),
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
                "device": str(self.device), "data": self.data.description,
                "train_images": len(self.data.train), "val_images": len(self.data.val),
            },
            "model_config": self.model.config.to_dict(),
            "class_names": self.class_names,
        }

    def _summary(self, status: str, message: str | None = None, hashes: list[str] | None = None) -> dict[str, Any]:
        records = read_metrics(self.run_dir)
        last = records[-1] if records else {}
        summary = {
            "status": status,
            "run_dir": str(self.run_dir),
            "epochs_done": self.epoch, "epochs": self.config.epochs, "global_step": self.global_step,
            "model": self.model_name, "params": _count_params(self.model),
            "data": self.data.description, "num_classes": self.num_classes,
            "world_size": self.world, "effective_batch": self.effective_batch, "device": str(self.device),
            "top1": last.get("top1"), "top5": last.get("top5"), "ema_top1": last.get("ema_top1"),
            "ema_top5": last.get("ema_top5"),
            "best_top1": max((r["top1"] for r in records), default=None),
            "best_epoch": self.best.get("epoch") or None,
            "best_ema_top1": max((r["ema_top1"] for r in records if r.get("ema_top1") is not None), default=None),
            "train_time_s": sum(r["epoch_time_s"] for r in records),
            "images_per_s": (sum(r["images"] for r in records) / max(sum(r["train_time_s"] for r in records), 1e-9))
            if records else None,
            "checkpoints": {name: str(self.run_dir / name) for name in
                            ("last.safetensors", "best.safetensors", STATE_FILE) if (self.run_dir / name).exists()},
        }
        if message:
            summary["message"] = message
        if hashes is not None:
            summary["weights_sha256_per_rank"] = hashes
        return summary

    def _finish_files(self, summary: dict) -> None:
        if self.dist.is_main:
            _write_json(self.run_dir / "summary.json", summary)
            plot_curves(read_metrics(self.run_dir), self.run_dir / "curves.png",
                        f"{self._model_label()} on {self.config.data}")

    def _model_label(self) -> str:
        if self.model_name != "custom":
            return self.model_name
        cfg = self.model.config
        return (f"{self.config.model} with dims {'-'.join(map(str, cfg.dims))}, "
                f"depths {'-'.join(map(str, cfg.depths))}")

    # -- loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._setup()
        c = self.config
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.run_dir / "config.json", self._resolved())
        if self.epoch >= c.epochs:
            summary = self._summary("already-complete")
            self.log(f"{self.run_dir}: all {c.epochs} epochs are done (raise --epochs to continue)")
            return summary
        self.log(f"{self.data.description}; {self._model_label()} ({_count_params(self.model) / 1e6:.2f}M params, "
                 f"{self.num_classes} classes) on {self.device}, {self.world} process(es), effective batch "
                 f"{self.effective_batch}, lr {self.lrs['lr']:.3g}, {self.steps_per_epoch} steps/epoch")
        with StopRequest(self.log) as stop:
            self.stop = stop
            while self.epoch < c.epochs:
                finished = self._train_epoch()
                if not finished:
                    self._checkpoint(best=False, top1=None)
                    where = f"epoch {self.epoch + 1} step {self.batches_done // c.accum_steps}"
                    message = (f"stopped at {where}; checkpoint saved in {self.run_dir} "
                               f"(continue with: vmamba train --resume {self.run_dir})")
                    summary = self._summary("interrupted", message)
                    self._finish_files(summary)
                    self.log(message)
                    return summary
                self._end_epoch()
        hashes = self.dist.all_gather(_weights_hash(self._weights_state()))
        summary = self._summary("completed", hashes=hashes)
        self._finish_files(summary)
        return summary

    def _stop_flags(self, bad: bool) -> tuple[bool, bool]:
        """(any rank diverged, any rank asked to stop): all ranks take the same decision."""
        if not self.dist.enabled:
            return bad, self.stop.requested
        bad_any, stop_any = self.dist.all_reduce_sum([float(bad), float(self.stop.requested)])
        return bad_any > 0, stop_any > 0

    def _diverged(self, what: str, value: float) -> None:
        c = self.config
        step = self.batches_done // c.accum_steps
        good = self.run_dir / "last.safetensors"
        kept = (f"the last good checkpoint is {good} (epoch {self.epoch})" if good.exists()
                else "no checkpoint had been written yet")
        message = (f"{what} became {value} at epoch {self.epoch + 1} step {step + 1} (lr {self.schedule.lr:.3g}); "
                   f"training stopped and {kept}. Lower the learning rate (--lr) or use --amp none.")
        summary = self._summary("diverged", message)
        self._finish_files(summary)
        raise TrainingDiverged(message)

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when a stop was requested (position saved)."""
        c, dist = self.config, self.dist
        micro_total = self.steps_per_epoch * c.accum_steps
        self.sampler.set_epoch(self.epoch, start=self.batches_done * c.batch_size)
        # Worker seeds come from this generator: seeding it per epoch makes epoch-boundary resumes exact.
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + dist.rank * 7919 + self.epoch)
        loader = self._loader(self.data.train, self.sampler, c.batch_size, drop_last=True, generator=generator)
        self.model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=self.batches_done // c.accum_steps,
                       desc=f"epoch {self.epoch + 1}/{c.epochs}", file=sys.stderr, leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            iterator = iter(loader)
            while self.batches_done < micro_total:
                images, labels = next(iterator)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                images, targets = self.mixer(images, labels)
                last_micro = (self.batches_done + 1) % c.accum_steps == 0
                sync = contextlib.nullcontext() if (last_micro or not dist.enabled) else self.ddp_module.no_sync()
                with sync:
                    with self._autocast():
                        logits = self.train_module(images)
                    loss = soft_target_cross_entropy(logits, targets)
                    loss_value = loss.item()
                    bad, _ = self._stop_flags(not math.isfinite(loss_value)) if dist.enabled else (not math.isfinite(loss_value), False)
                    if bad:
                        self._diverged("the training loss", loss_value if not math.isfinite(loss_value) else float("nan"))
                    scaled = loss / c.accum_steps
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                self.acc["loss_sum"] += loss_value * labels.numel()
                self.acc["samples"] += labels.numel()
                self.batches_done += 1
                if not last_micro:
                    continue
                self._optimizer_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.schedule.lr:.2e}", refresh=False)
                info = StepInfo(self.epoch, self.batches_done // c.accum_steps, self.global_step, loss_value,
                                self.schedule.lr, self.stop)
                for hook in self.hooks:
                    hook(info)
                _, stop = self._stop_flags(False)
                if stop:
                    return False
        finally:
            self.acc["train_time"] += time.perf_counter() - start
            if bar is not None:
                bar.close()
        return True

    def _optimizer_step(self) -> None:
        c = self.config
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
            if self.scaler is None and not math.isfinite(norm.item()):
                self._diverged("the gradient norm", norm.item())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model)

    def _end_epoch(self) -> None:
        c = self.config
        eval_start = time.perf_counter()
        metrics = evaluate(self.model, self.val_loader, self.device, self.dist, self._autocast)
        ema_metrics = evaluate(self.ema.module, self.val_loader, self.device, self.dist, self._autocast) \
            if self.ema is not None else None
        eval_time = time.perf_counter() - eval_start
        loss_sum, samples = self.dist.all_reduce_sum([self.acc["loss_sum"], self.acc["samples"]])
        train_time = self.acc["train_time"]
        record = {
            "epoch": self.epoch + 1, "step": self.global_step,
            "train_loss": loss_sum / max(samples, 1.0), "lr": self.schedule.lr,
            "val_loss": metrics["loss"], "top1": metrics["top1"], "top5": metrics["top5"],
            "ema_top1": ema_metrics["top1"] if ema_metrics else None,
            "ema_top5": ema_metrics["top5"] if ema_metrics else None,
            "images": samples, "train_time_s": train_time, "images_per_s": samples / max(train_time, 1e-9),
            "epoch_time_s": train_time + eval_time, "global_batch": self.effective_batch,
        }
        self.epoch += 1
        self.batches_done = 0
        self.acc = self._fresh_accumulators()
        is_best = record["top1"] > self.best["top1"]
        if is_best:
            self.best = {"top1": record["top1"], "epoch": self.epoch}
        if self.dist.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(_json_line(record) + "\n")
        self._checkpoint(best=is_best, top1=record["top1"])
        ema = f", EMA {record['ema_top1']:.2f}" if ema_metrics else ""
        self.log(f"epoch {self.epoch}/{c.epochs}: loss {record['train_loss']:.4f}, held-out top-1 "
                 f"{record['top1']:.2f}% top-5 {record['top5']:.2f}%{ema}, lr {record['lr']:.3g}, "
                 f"{record['images_per_s']:.0f} img/s, {record['epoch_time_s']:.1f}s")
