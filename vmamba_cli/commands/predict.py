"""`vmamba predict`: top-k ImageNet classes for images, folders and glob patterns."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from vmamba_cli.commands._common import ALLOW_NON_FINITE_HELP, MAX_PIXELS_HELP, console, print_json, resolve_device
from vmamba_cli.data import DEFAULT_MAX_PIXELS, MAX_PIXELS_CEILING
from vmamba_cli.predict import (DEFAULT_AMP, DEFAULT_BATCH_SIZE, DEFAULT_TOPK, MAX_RESOLUTION, MIN_RESOLUTION,
                                PredictReport, predict)
from vmamba_cli.runtime import AMP_CHOICES, AMP_HELP


def _show(report: PredictReport) -> None:
    if report.predictions:
        table = Table(title=f"{report.model} on {report.device}, top-{report.topk}", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("#", justify="right")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for prediction in report.predictions:
            for rank, score in enumerate(prediction.top, 1):
                table.add_row(prediction.path if rank == 1 else "", str(rank), score.label,
                              f"{score.probability:.4f}")
            table.add_section()
        console.print(table)
    for failure in report.failures:
        console.print(f"[bold red]error:[/] {failure.path}: {failure.error}", highlight=False, soft_wrap=True)
    summary = f"{len(report.predictions)} image(s) predicted"
    if report.failures:
        summary += f", {len(report.failures)} failed"
    console.print(f"{summary} in {report.seconds:.2f} s (weights: {report.weights or 'random init'})",
                  highlight=False, soft_wrap=True)


def _check_amp(value: str) -> str:
    if value not in AMP_CHOICES:
        raise typer.BadParameter(f"must be one of {', '.join(AMP_CHOICES)}, got {value!r}")
    return value


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        images: List[str] = typer.Argument(..., metavar="IMAGE...",
                                           help="Image files, folders (searched recursively) or glob patterns."),
        model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                            help="Registered model name \\[default: vmamba-tiny, or the model of "
                                                 "official --weights]."),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", show_default=False,
                                              help="Local .pth/.safetensors, a registry name (`vmamba weights "
                                                   "list`), an http(s) URL, or an .onnx file from `vmamba export` "
                                                   "(run by onnxruntime) \\[default: the official checkpoint "
                                                   "of --model, downloaded once into $VMAMBA_HOME]."),
        topk: int = typer.Option(DEFAULT_TOPK, "--topk", "-k", min=1, help="Classes shown per image."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", "-b", min=1, help="Images per forward."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r", min=MIN_RESOLUTION, max=MAX_RESOLUTION,
                                                 show_default=False,
                                                 help="Input size fed to the model \\[default: the model's preset: "
                                                      "the size a checkpoint was trained at, else 224]."),
        crop_pct: Optional[float] = typer.Option(None, "--crop-pct", min=0.01, max=1.0,
                                                 show_default=False,
                                                 help="Center-crop ratio: the short side is resized to "
                                                      "resolution/crop-pct first \\[default: the model's preset, "
                                                      "224/256 for the releases]."),
        amp: str = typer.Option(DEFAULT_AMP, "--amp", callback=_check_amp, help=AMP_HELP),
        labels: Optional[Path] = typer.Option(None, "--labels", show_default=False,
                                              help="Class names: text file (one per line) or JSON list "
                                                   "\\[default: from the checkpoint, else ImageNet-1k]."),
        ema: bool = typer.Option(False, "--ema", help="Use the model_ema entry of an official .pth."),
        allow_non_finite: bool = typer.Option(False, "--allow-non-finite", help=ALLOW_NON_FINITE_HELP),
        max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, max=MAX_PIXELS_CEILING,
                                       help=MAX_PIXELS_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    ):
        """Classify images: top-k classes with probabilities. Exit status 1 when any input failed."""
        dev = resolve_device(device)
        report = predict(images, model=model, weights=weights, topk=topk, device=dev, batch_size=batch_size,
                         resolution=resolution, crop_pct=crop_pct, amp=amp, ema=ema, labels=labels,
                         progress=console.is_terminal, max_pixels=max_pixels, allow_non_finite=allow_non_finite)
        if json_out:
            print_json(report.to_dict())
            for failure in report.failures:
                console.print(f"[bold red]error:[/] {failure.path}: {failure.error}", highlight=False,
                              soft_wrap=True)
        else:
            _show(report)
        if report.failures:
            raise typer.Exit(1)
