"""`vmamba export`: the classifier as an ONNX file (standard operators) or a torch.export program (.pt2)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vmamba_cli.commands._common import console, fail, user_errors
from vmamba_cli.export import DEFAULT_OPSET, SIZE_MULTIPLE, export_onnx, export_pt2
from vmamba_cli.model import DEFAULT_MODEL
from vmamba_cli.weights import load_model


class ExportFormat(str, Enum):
    onnx = "onnx"
    pt2 = "pt2"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        out: Path = typer.Option(..., "--out", "-o", help="File to write (.onnx or .pt2)."),
        fmt: ExportFormat = typer.Option(..., "--format", "-f", help="onnx (runs in onnxruntime) or pt2 "
                                                                     "(torch.export ExportedProgram)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                            help="Registered model name \\[default: vmamba-tiny, or the model of "
                                                 "the --weights file]."),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", show_default=False,
                                              help="Local .pth/.safetensors, a registry name or an http(s) URL "
                                                   "\\[default: the official checkpoint of --model]."),
        opset: int = typer.Option(DEFAULT_OPSET, "--opset", min=18, help="ONNX opset (onnx format only)."),
        dynamic: bool = typer.Option(True, "--dynamic/--no-dynamic",
                                     help="Free batch, height and width (multiples of 32); otherwise fixed to "
                                          "--resolution and batch 1."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r", min=32, show_default=False,
                                                 help="Example (or, with --no-dynamic, the fixed) input size, "
                                                      "recorded as the file's input size \\[default: the "
                                                      "input size of the weights' preset]."),
        ema: bool = typer.Option(False, "--ema", help="Use the model_ema entry of an official .pth."),
    ):
        """Export a classifier for deployment: ONNX for onnxruntime / TensorRT / OpenVINO, or a .pt2 program."""
        if dynamic and resolution is not None and resolution % SIZE_MULTIPLE:
            raise fail(f"--resolution {resolution}: a dynamic export needs a multiple of {SIZE_MULTIPLE}")
        with user_errors():
            loaded = load_model(model, weights if weights is not None else (model or DEFAULT_MODEL), ema=ema)
            if resolution is None:
                resolution = loaded.preprocess.input_size
                if dynamic and resolution % SIZE_MULTIPLE:
                    raise fail(f"the preset's input size {resolution} is not a multiple of {SIZE_MULTIPLE}: "
                               f"give --resolution")
            start = time.perf_counter()
            if fmt is ExportFormat.onnx:
                # The metadata records the preset predict/eval use with the file: the weights' own, at
                # the example's size.
                path = export_onnx(loaded.model, out, opset=opset, dynamic=dynamic, resolution=resolution,
                                   batch=2 if dynamic else 1, name=loaded.name, class_names=loaded.class_names,
                                   preprocess=loaded.preprocess.with_overrides(input_size=resolution))
            else:
                path = export_pt2(loaded.model, out, dynamic=dynamic, resolution=resolution,
                                  batch=2 if dynamic else 1)
        console.print(f"wrote {path} ({fmt.value}, {loaded.name}, weights: {loaded.source or 'random init'}) "
                      f"in {time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)
