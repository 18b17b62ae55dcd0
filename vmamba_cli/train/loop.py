"""The epoch loop of `vmamba train`: the official recipe (docs/design.md §9) in one process or under
``torchrun`` (DDP).

``train(config)`` runs or continues the run in ``config.output`` and returns its summary. The run
folder holds::

    config.json              resolved settings + derived numbers (world size, effective batch, LRs)
    metrics.jsonl            one JSON line per epoch: loss, lr, top-1/top-5 of the model and its EMA, images/s
    summary.json             final (or interrupted / diverged) state of the run
    curves.png               loss and accuracy per epoch
    last.safetensors         model weights (+ EMA under ema.*) with class names: usable by predict / eval
    best.safetensors         the same for the epoch with the best held-out top-1
    best_ema.safetensors     the EMA weights (as the model's own) of the epoch with the best EMA top-1
    last.state.safetensors   everything needed to continue exactly: model, EMA, optimizer, scheduler,
                             scaler, epoch / position in the epoch, RNG states of every rank

Every file is written to a temporary name and renamed. Resuming (automatic when the run folder
holds a state) continues exactly: with the same settings and ``workers=0`` an interrupted and
resumed run ends with the same weights and metrics as an uninterrupted one, also when stopped
mid-epoch (with workers > 0 it is exact at epoch boundaries).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from vmamba_cli.data import Preprocess, eval_transform
from vmamba_cli.errors import TrainingDiverged
from vmamba_cli.metrics import TopKAccumulator
from vmamba_cli.runtime import Dist, autocast, check_memory, check_output_dir, process_group, resolve_amp
from vmamba_cli.train import artifacts
from vmamba_cli.train.architecture import build_model, model_label
from vmamba_cli.train.config import TrainConfig
from vmamba_cli.train.data import (MixupCutmix, ResumableDistributedSampler, ShardSampler, build_datasets,
                                   soft_target_cross_entropy, steps_per_epoch, train_transform)
from vmamba_cli.train.schedule import ModelEma, WarmupCosineSchedule, scale_lr, weight_decay_groups
from vmamba_cli.train.checkpoints import RunCheckpoints
from vmamba_cli.train.state import RunProgress, load_resumable_state, seed_everything
from vmamba_cli.train.stop import StepInfo, StopRequest


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def output_dir(config: TrainConfig) -> Path:
    data_name = "digits" if config.data == "digits" else (Path(config.data).name or "data")
    return Path(config.output.format(data=data_name, model=config.model))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate_held_out(model: nn.Module, loader, num_classes: int, dist: Dist,
                      amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Held-out loss, top-1 and top-5 (percent), summed exactly over the ranks' shards."""
    was_training = model.training
    model.eval()
    accumulator = TopKAccumulator(num_classes, device=dist.device)
    for images, labels in loader:
        images, labels = images.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
        with autocast(dist.device, amp_dtype):
            logits = model(images)
        accumulator.update(logits, labels)
    model.train(was_training)
    totals = accumulator.totals(dist)
    return {"loss": totals.loss or 0.0, "top1": totals.top1 or 0.0, "top5": totals.topk or 0.0}


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = None,
          hooks: Iterable[Callable[[StepInfo], None]] = (), auto_resume: bool = True) -> dict[str, Any]:
    """Train (or continue) the run of ``config`` and return its summary (also in summary.json).

    ``summary["status"]`` is "completed", "interrupted" (stop request: a resumable checkpoint was
    saved) or "already-complete". A NaN/inf loss raises ``TrainingDiverged`` after writing
    summary.json; the checkpoints on disk are those of the last good epoch.
    """
    log = log or _log_stderr
    previous_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        with process_group(config.device) as dist:
            trainer = Trainer(config, dist, progress=progress, log=log if dist.is_main else (lambda _m: None),
                              hooks=list(hooks), auto_resume=auto_resume)
            return trainer.run()
    finally:
        torch.set_num_threads(previous_threads)


class Trainer:
    """One run: every component is built here, in the order that makes resumed runs bit-exact."""

    def __init__(self, config: TrainConfig, dist: Dist, *, progress: bool, log: Callable[[str], None],
                 hooks: list[Callable[[StepInfo], None]], auto_resume: bool):
        c = self.config = config
        self.dist, self.log, self.hooks = dist, log, hooks
        self.show_progress = progress and dist.is_main
        self.device = dist.device
        self.run_dir = output_dir(config)
        if dist.is_main:
            check_output_dir(self.run_dir)  # before the data is read or a model built
        resume_state = load_resumable_state(self.run_dir, config, auto_resume)
        self.resumed = resume_state is not None

        self.data = build_datasets(
            c.data, c.image_size,
            train_transform=train_transform(
                c.image_size, crop_scale=c.crop_scale, crop_ratio=c.crop_ratio, hflip=c.hflip,
                randaugment=c.randaugment, randaugment_ops=c.randaugment_ops,
                randaugment_magnitude=c.randaugment_magnitude, randaugment_mstd=c.randaugment_mstd,
                color_jitter=c.color_jitter, random_erasing=c.random_erasing, interpolation=c.interpolation),
            eval_transform_fn=lambda crop_pct: eval_transform(self._preprocess(crop_pct)),
            val_fraction=c.val_fraction, split_seed=c.split_seed, subset=c.subset, crop_pct=c.eval_crop_pct)
        # What predict / eval should do with this run's checkpoints (the held-out evaluation's preset).
        self.preprocess = self._preprocess(self.data.eval_crop_pct)
        self.class_names = list(self.data.class_names)
        self.num_classes = c.num_classes or len(self.class_names)
        if self.num_classes < len(self.class_names):
            raise ValueError(f"num_classes={self.num_classes} but the data has {len(self.class_names)} classes")
        self.class_names += [f"class_{i}" for i in range(len(self.class_names), self.num_classes)]

        # Seeded after the data is built: building it imports libraries lazily (scikit-learn, timm, and
        # through them rich, whose import draws from Python's `random`), and the first run in a process
        # must draw the same augmentations as the next. The same initial weights on every rank (DDP
        # would broadcast rank 0's anyway, but the EMA copy and a restarted rank must agree);
        # augmentation streams then differ per rank.
        seed_everything(c.seed)
        model, self.model_name = build_model(c, self.num_classes, resume_state["arch"] if resume_state else None)
        if resume_state is not None:
            self.model_name = resume_state.get("model_name", self.model_name)
        check_memory(c.image_size, c.batch_size, int(model.config.dims[0]), self.device,
                     patch_size=model.config.patch_size, training=True, options="--image-size or --batch-size")
        self.model = model.to(self.device)
        if dist.rank:
            seed_everything(c.seed + dist.rank)

        self.effective_batch = c.batch_size * dist.world_size * c.accum_steps
        scale = (lambda lr: scale_lr(lr, self.effective_batch, c.lr_scale_batch)) if c.lr_scale_batch else (lambda lr: lr)
        self.lrs = {"lr": scale(c.lr), "warmup_lr": scale(c.warmup_lr), "min_lr": scale(c.min_lr)}
        self.steps_per_epoch = steps_per_epoch(len(self.data.train), c.batch_size, dist.world_size, c.accum_steps)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.data.train)} training images are fewer than one step of "
                             f"{self.effective_batch} (batch {c.batch_size} x {dist.world_size} processes x "
                             f"{c.accum_steps} accumulation); lower the batch size")
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, c.weight_decay), lr=self.lrs["lr"],
                                           betas=tuple(c.betas), eps=c.eps)
        self.schedule = WarmupCosineSchedule(
            self.optimizer, base_lr=self.lrs["lr"], warmup_lr=self.lrs["warmup_lr"], min_lr=self.lrs["min_lr"],
            warmup_steps=round(c.warmup_epochs * self.steps_per_epoch), total_steps=c.epochs * self.steps_per_epoch)
        self.amp_dtype = resolve_amp(c.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.mixer = MixupCutmix(self.num_classes, mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                                 switch_prob=c.mixup_switch_prob, label_smoothing=c.label_smoothing)

        # Compiled on its device, then wrapped for DDP; checkpoints and evaluation use self.model
        # itself, so saved keys carry no "_orig_mod." prefix. dynamic=False: a smaller last batch
        # recompiles once instead of tracing symbolic shapes.
        compiled = torch.compile(self.model, dynamic=False) if c.compile else self.model
        self.ddp_module = self._wrap_ddp(compiled)
        # After the DDP wrap, which copies rank 0's weights into every rank's model.
        self.ema = ModelEma(self.model, c.ema_decay) if c.ema else None
        self.train_module = self.ddp_module
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.sampler = ResumableDistributedSampler(self.data.train, num_replicas=dist.world_size, rank=dist.rank,
                                                   shuffle=True, seed=c.seed)
        self.val_loader = self._loader(self.data.val, ShardSampler(len(self.data.val), dist.world_size, dist.rank),
                                       batch_size=c.batch_size * 2, drop_last=False)
        self.info = artifacts.RunInfo(
            run_dir=self.run_dir, model_name=self.model_name, model_label=model_label(self.model, self.model_name, c.model),
            params=_count_params(self.model), data=self.data.description, data_name=c.data,
            num_classes=self.num_classes, world_size=dist.world_size, effective_batch=self.effective_batch,
            device=str(self.device), epochs=c.epochs)
        self.stop = StopRequest(self.log)
        self.checkpoints = RunCheckpoints(
            self.run_dir, c, dist, self.model, self.ema, self.optimizer, self.schedule, self.scaler,
            self.model_name, self.class_names, self.preprocess, self.data.description)
        self.progress = self.checkpoints.restore(resume_state, self.log) if resume_state is not None else RunProgress()

    def _preprocess(self, crop_pct: float) -> Preprocess:
        return Preprocess(input_size=self.config.image_size, crop_pct=crop_pct, interpolation=self.config.interpolation)

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # Depthwise conv weights (C, 1, k, k) have a stride quirk on their size-1 axis; harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool, generator=None):
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.config.workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda", generator=generator, persistent_workers=False)

    # -- files for people -------------------------------------------------------------------------------
    def _resolved(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "derived": {
                "run_dir": str(self.run_dir), "world_size": self.dist.world_size,
                "effective_batch": self.effective_batch,
                "lr": self.lrs["lr"], "warmup_lr": self.lrs["warmup_lr"], "min_lr": self.lrs["min_lr"],
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.config.epochs * self.steps_per_epoch,
                "warmup_steps": self.schedule.warmup_steps, "num_classes": self.num_classes,
                "model_name": self.model_name, "params": self.info.params,
                "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
                "grad_scaler": self.scaler is not None,
                "device": str(self.device), "data": self.data.description,
                "train_images": len(self.data.train), "val_images": len(self.data.val),
            },
            "model_config": self.model.config.to_dict(),
            "class_names": self.class_names,
        }

    def _summary(self, status: str, message: str | None = None, hashes: list[str] | None = None) -> dict[str, Any]:
        return artifacts.summary(self.info, self.progress, status, message, hashes)

    def _finish(self, summary: dict[str, Any]) -> None:
        if self.dist.is_main:
            artifacts.finish(self.info, summary)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c, p = self.config, self.progress
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for path in artifacts.remove_stale_temp_files(self.run_dir):
                self.log(f"removed {path.name}, left by an interrupted write")
            if not self.resumed:
                artifacts.start_metrics(self.run_dir)
            artifacts.write_json(self.run_dir / "config.json", self._resolved())
        if p.epoch >= c.epochs:
            self.log(f"{self.run_dir}: all {c.epochs} epochs are done (raise --epochs to continue)")
            return self._summary("already-complete")
        self.log(f"{self.data.description}; {self.info.model_label} ({self.info.params / 1e6:.2f}M params, "
                 f"{self.num_classes} classes) on {self.device}, {self.dist.world_size} process(es), effective "
                 f"batch {self.effective_batch}, lr {self.lrs['lr']:.3g}, {self.steps_per_epoch} steps/epoch")
        with self.stop:
            while self.progress.epoch < c.epochs:
                if not self._train_epoch():
                    return self._interrupted()
                self._end_epoch()
        hashes = self.dist.all_gather(artifacts.weights_hash(self.checkpoints.weights_state()))
        summary = self._summary("completed", hashes=hashes)
        self._finish(summary)
        return summary

    def _interrupted(self) -> dict[str, Any]:
        p = self.progress
        self.checkpoints.save(p, best=False, top1=None)
        where = f"epoch {p.epoch + 1} step {p.batches_done // self.config.accum_steps}"
        message = (f"stopped at {where}; checkpoint saved in {self.run_dir} "
                   f"(continue with: vmamba train --resume {self.run_dir})")
        summary = self._summary("interrupted", message)
        self._finish(summary)
        self.log(message)
        return summary

    def _stop_flags(self, bad: bool) -> tuple[bool, bool]:
        """(any rank diverged, any rank asked to stop): all ranks take the same decision."""
        if not self.dist.enabled:
            return bad, self.stop.requested
        bad_any, stop_any = self.dist.all_reduce_sum([float(bad), float(self.stop.requested)])
        return bad_any > 0, stop_any > 0

    def _diverged(self, what: str, value: float) -> None:
        p = self.progress
        step = p.batches_done // self.config.accum_steps
        good = self.run_dir / "last.safetensors"
        kept = (f"the last good checkpoint is {good} (epoch {p.epoch})" if good.exists()
                else "no checkpoint had been written yet")
        message = (f"{what} became {value} at epoch {p.epoch + 1} step {step + 1} (lr {self.schedule.lr:.3g}); "
                   f"training stopped and {kept}. Lower the learning rate (--lr) or use --amp none.")
        self._finish(self._summary("diverged", message))
        raise TrainingDiverged(message)

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False when a stop was requested (position saved)."""
        c, dist, p = self.config, self.dist, self.progress
        micro_total = self.steps_per_epoch * c.accum_steps
        self.sampler.set_epoch(p.epoch, start=p.batches_done * c.batch_size)
        # Worker seeds come from this generator: seeding it per epoch makes epoch-boundary resumes exact.
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + dist.rank * 7919 + p.epoch)
        loader = self._loader(self.data.train, self.sampler, c.batch_size, drop_last=True, generator=generator)
        self.model.train()
        bar = None
        if self.show_progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=p.batches_done // c.accum_steps,
                       desc=f"epoch {p.epoch + 1}/{c.epochs}", file=sys.stderr, leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        try:
            iterator = iter(loader)
            while p.batches_done < micro_total:
                images, labels = next(iterator)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                images, targets = self.mixer(images, labels)
                last_micro = (p.batches_done + 1) % c.accum_steps == 0
                sync = contextlib.nullcontext() if (last_micro or not dist.enabled) else self.ddp_module.no_sync()
                with sync:
                    with autocast(self.device, self.amp_dtype):
                        logits = self.train_module(images)
                    loss = soft_target_cross_entropy(logits, targets)
                    loss_value = loss.item()
                    bad, _ = self._stop_flags(not math.isfinite(loss_value)) if dist.enabled \
                        else (not math.isfinite(loss_value), False)
                    if bad:
                        self._diverged("the training loss", loss_value if not math.isfinite(loss_value) else float("nan"))
                    scaled = loss / c.accum_steps
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                p.totals.loss_sum += loss_value * labels.numel()
                p.totals.samples += labels.numel()
                p.batches_done += 1
                if not last_micro:
                    continue
                self._optimizer_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.schedule.lr:.2e}", refresh=False)
                info = StepInfo(p.epoch, p.batches_done // c.accum_steps, p.global_step, loss_value,
                                self.schedule.lr, self.stop)
                for hook in self.hooks:
                    hook(info)
                _, stop = self._stop_flags(False)
                if stop:
                    return False
        finally:
            p.totals.train_time += time.perf_counter() - start
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
        self.progress.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model)

    def _end_epoch(self) -> None:
        c, p = self.config, self.progress
        eval_start = time.perf_counter()
        metrics = evaluate_held_out(self.model, self.val_loader, self.num_classes, self.dist, self.amp_dtype)
        ema_metrics = evaluate_held_out(self.ema.module, self.val_loader, self.num_classes, self.dist,
                                        self.amp_dtype) if self.ema is not None else None
        eval_time = time.perf_counter() - eval_start
        loss_sum, samples = self.dist.all_reduce_sum([p.totals.loss_sum, p.totals.samples])
        train_time = p.totals.train_time
        record = {
            "epoch": p.epoch + 1, "step": p.global_step,
            "train_loss": loss_sum / max(samples, 1.0), "lr": self.schedule.lr,
            "val_loss": metrics["loss"], "top1": metrics["top1"], "top5": metrics["top5"],
            "ema_top1": ema_metrics["top1"] if ema_metrics else None,
            "ema_top5": ema_metrics["top5"] if ema_metrics else None,
            "images": samples, "train_time_s": train_time, "images_per_s": samples / max(train_time, 1e-9),
            "epoch_time_s": train_time + eval_time, "global_batch": self.effective_batch,
        }
        p.epoch += 1
        p.batches_done = 0
        p.totals = RunProgress().totals
        is_best = record["top1"] > p.best["top1"]
        if is_best:
            p.best = {"top1": record["top1"], "epoch": p.epoch}
        # The EMA is the model the official runs report: its best epoch is kept too (best_ema.safetensors).
        is_best_ema = ema_metrics is not None and ema_metrics["top1"] > p.best_ema["top1"]
        if is_best_ema:
            p.best_ema = {"top1": ema_metrics["top1"], "epoch": p.epoch}
        if self.dist.is_main:
            artifacts.append_metrics(self.run_dir, record)
        self.checkpoints.save(p, best=is_best, top1=record["top1"], best_ema=is_best_ema,
                              ema_top1=record["ema_top1"])
        ema = f", EMA {record['ema_top1']:.2f}" if ema_metrics else ""
        self.log(f"epoch {p.epoch}/{c.epochs}: loss {record['train_loss']:.4f}, held-out top-1 "
                 f"{record['top1']:.2f}% top-5 {record['top5']:.2f}%{ema}, lr {record['lr']:.3g}, "
                 f"{record['images_per_s']:.0f} img/s, {record['epoch_time_s']:.1f}s")
