"""`vmamba train`: parse options into a TrainConfig, call vmamba_cli.train.train, print the result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from vmamba_cli.commands._common import console, fail, print_json
from vmamba_cli.errors import EXIT_INTERRUPTED
from vmamba_cli.runtime import AMP_CHOICES, AMP_HELP, MAX_RESOLUTION
from vmamba_cli.train.config import MIN_IMAGE_SIZE


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flags the user actually gave (None means "not given")."""
    return {k: v for k, v in flags.items() if v is not None}


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        data: Optional[str] = typer.Option(None, "--data", "-d",
                                           help="'digits' (offline, scikit-learn's 8x8 digits) or an image folder: "
                                                "DIR/train/<class>/*, DIR/val/<class>/* or DIR/<class>/* (split off)."),
        config: Optional[str] = typer.Option(None, "--config", "-c",
                                             help="TOML file or preset (imagenet, digits). Default: digits for "
                                                  "--data digits, else imagenet (the official recipe)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model (`vmamba models`)."),
        pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Start from these weights (fine-tuning)."),
        num_classes: Optional[int] = typer.Option(None, "--num-classes", help="New head size (default: classes in the data)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Batch per process."),
        accum_steps: Optional[int] = typer.Option(None, "--accum-steps", min=1, help="Gradient accumulation steps."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Base LR for a total batch of 512 (scaled linearly)."),
        image_size: Optional[int] = typer.Option(None, "--image-size", min=MIN_IMAGE_SIZE, max=MAX_RESOLUTION,
                                                 help="Training resolution."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="Data loader processes per rank."),
        amp: Optional[str] = typer.Option(None, "--amp", help=AMP_HELP + " Default: the preset's (auto)."),
        compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1 ..."),
        threads: Optional[int] = typer.Option(None, "--threads", min=0, help="CPU threads per process (0: default)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed (each process uses seed + rank)."),
        subset: Optional[int] = typer.Option(None, "--subset", min=1, help="Use only the first N training images."),
        output: Optional[str] = typer.Option(None, "--output", "-o",
                                             help="Run folder (default runs/train/{data}-{model}); a run folder "
                                                  "holding a checkpoint is continued."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run folder (or state file) with its saved settings."),
        sets: Optional[List[str]] = typer.Option(None, "--set", help="Any setting: --set mixup=0 --set model_config.depths=[1,1,2,1]"),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved settings as JSON and exit."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
        json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON on stdout."),
    ):
        """Train or fine-tune a VMamba classifier with the official recipe (one process or torchrun DDP)."""
        from vmamba_cli.errors import VMambaError
        from vmamba_cli.train import config_for_resume, load_config, parse_assignment, train

        if amp is not None and amp not in AMP_CHOICES:
            raise fail(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
        try:
            overrides = _overrides(
                data=data, model=model, pretrained=pretrained, num_classes=num_classes, epochs=epochs,
                batch_size=batch_size, accum_steps=accum_steps, lr=lr, image_size=image_size, workers=workers,
                amp=amp, compile=compile_model, device=device, threads=threads, seed=seed, subset=subset,
                output=output)
            for text in sets or []:
                key, value = parse_assignment(text)
                overrides[key] = value
            if resume is not None:
                cfg = config_for_resume(resume, overrides)
            else:
                cfg = load_config(config, overrides)
        except VMambaError:
            raise  # reported once by the CLI (vmamba_cli/cli.py)
        except ValueError as exc:
            raise fail(str(exc)) from None

        if print_config:
            print_json(cfg.to_dict())
            return
        try:
            summary = train(cfg, progress=not no_progress, log=lambda m: console.print(m, highlight=False,
                                                                                       markup=False, soft_wrap=True))
        except VMambaError:
            raise  # bad data, resume, divergence ...: reported once by the CLI (vmamba_cli/cli.py)
        except KeyboardInterrupt:
            raise fail("aborted (second Ctrl-C); the checkpoints in the run folder are those of the last "
                       "completed epoch", code=EXIT_INTERRUPTED) from None
        except (ValueError, FileNotFoundError) as exc:
            raise fail(str(exc)) from None

        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, rank 0 reports
        if json_out:
            print_json(summary)
        if summary["status"] == "completed":
            best = summary.get("best_top1")
            ema = summary.get("best_ema_top1")
            ema_text = f", best EMA {ema:.2f}% at epoch {summary['best_ema_epoch']}" if ema is not None else ""
            console.print(f"done: {summary['epochs_done']} epochs, held-out top-1 {summary['top1']:.2f}% "
                          f"(best {best:.2f}%{ema_text}), {summary['train_time_s']:.0f}s; "
                          f"weights in {summary['run_dir']}",
                          highlight=False, markup=False, soft_wrap=True)
        elif summary["status"] == "interrupted":
            raise typer.Exit(EXIT_INTERRUPTED)
