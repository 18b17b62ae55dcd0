"""`vmamba eval`: top-1 / top-5 / loss of a model on an image folder, on one process or under torchrun."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from vmamba_cli.commands._common import console, fail, print_json, user_errors
from vmamba_cli.errors import EXIT_ERROR
from vmamba_cli.runtime import AMP_HELP

MAX_FAILURES_SHOWN = 20


def print_summary(result) -> None:
    table = Table(title=f"vmamba eval: {result.model} on {result.data_dir}", show_header=False,
                  title_justify="left")
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    pct = (lambda v: "n/a" if v is None else f"{v:.3f} %")
    table.add_row("top-1", pct(result.top1))
    table.add_row(f"top-{result.top5_k}", pct(result.top5))
    table.add_row("loss", "n/a" if result.loss is None else f"{result.loss:.4f}")
    table.add_row("images", f"{result.num_images}")
    table.add_row("failed", f"[red]{result.num_failed}[/]" if result.num_failed else "0")
    table.add_row("images/s", "n/a" if result.images_per_sec is None else f"{result.images_per_sec:.1f}")
    table.add_row("wall time", f"{result.wall_time_s:.2f} s")
    table.add_row("classes", f"{result.num_class_folders} folders -> {result.num_classes}-class head "
                             f"({result.class_mapping})")
    table.add_row("weights", result.weights or "random init")
    table.add_row("setup", f"{result.resolution}px, crop_pct {result.crop_pct:.4g}, {result.device}, "
                           f"batch {result.batch_size} x {result.world_size} process(es)"
                           + (f", amp {result.amp}" if result.amp else ""))
    console.print(table)
    if result.weights is None:
        console.print("[yellow]warning:[/] no --weights: these are the numbers of a randomly initialised model")
    if result.num_nonfinite:
        console.print(f"[yellow]warning:[/] {result.num_nonfinite} image(s) gave NaN/inf logits "
                      f"(counted as wrong{'; try without --amp' if result.amp else ''})")
    if result.ignored_files:
        console.print(f"note: {result.ignored_files} file(s) without an image extension were not evaluated")
    if result.failures:
        console.print(f"[red]{result.num_failed} image(s) could not be read:[/]")
        for failure in result.failures[:MAX_FAILURES_SHOWN]:
            console.print(f"  {failure.path}: {failure.reason}", markup=False, highlight=False, soft_wrap=True)
        if len(result.failures) > MAX_FAILURES_SHOWN:
            console.print(f"  ... and {len(result.failures) - MAX_FAILURES_SHOWN} more (all listed in --json / --output)")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        data_dir: Path = typer.Argument(..., help="Image folder with one sub-folder per class "
                                             "(ImageNet val layout: WordNet-id folders such as n01440764)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Registered model name (default "
                                            "vmamba-tiny; taken from the file for our .safetensors)."),
        weights: Optional[str] = typer.Option(None, "--weights", "-w", help="Checkpoint: official .pth, our "
                                              ".safetensors, a registered weights name / URL, or an "
                                              ".onnx file from `vmamba export` (run by onnxruntime)."),
        ema: bool = typer.Option(False, "--ema", help="Use the EMA weights of an official checkpoint."),
        resolution: Optional[int] = typer.Option(None, "--resolution", "-r",
                                                 help="Center-crop size in pixels (default: the size a `vmamba "
                                                      "train` checkpoint records, else 224)."),
        crop_pct: Optional[float] = typer.Option(None, "--crop-pct",
                                                 help="Resize the short side to resolution/crop_pct, then crop "
                                                      "(default: the checkpoint's, else 0.875)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch (per process)."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", help="DataLoader worker processes "
                                              "(default: min(4, CPUs per process - 1))."),
        amp: str = typer.Option("auto", "--amp", help=AMP_HELP),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N images."),
        json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON document on stdout."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the JSON results to FILE."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write a per-image CSV "
                                                   "(path, target, top-5 classes and probabilities, correct)."),
    ):
        """Top-1, top-5 and loss on an image folder; exact counts under `torchrun -m vmamba_cli eval`.

        Exit status: 0 all images evaluated; 1 error (bad weights, folder or classes; nothing evaluated);
        2 bad command line; 3 finished, but some images could not be read (listed in the summary and JSON).
        """
        from vmamba_cli.errors import VMambaError
        from vmamba_cli.evaluate import evaluate
        from vmamba_cli.runtime import process_group

        with contextlib.ExitStack() as stack:
            with user_errors():
                dist = stack.enter_context(process_group(device))  # torchrun: join its group
            try:
                result = evaluate(
                    data_dir, model, weights, ema=ema, resolution=resolution, crop_pct=crop_pct,
                    device=device, batch_size=batch_size, workers=workers, amp=amp,
                    limit=limit, predictions=predictions is not None, progress=sys.stderr.isatty(),
                )
            except VMambaError:
                raise  # reported once by the CLI (vmamba_cli/cli.py), from rank 0 only
            except (ValueError, FileNotFoundError) as exc:
                # Every process meets the same bad input: one of them says so.
                raise (fail(str(exc)) if dist.is_main else typer.Exit(EXIT_ERROR)) from None
            if result.is_main_process:
                write_outputs(result, output, predictions)
                print_summary(result)
                if json_out:
                    print_json(result.to_dict())
            # The other processes wait for the files: torchrun stops every worker once one exits non-zero.
            dist.barrier()
        if result.exit_code and result.is_main_process:
            raise typer.Exit(result.exit_code)


def write_outputs(result, output: Optional[Path], predictions: Optional[Path]) -> None:
    for path, save, what in ((output, result.save_json, "results"),
                             (predictions, result.save_predictions, "per-image predictions")):
        if path is None:
            continue
        try:
            save(path)
        except OSError as exc:
            raise fail(f"{path}: cannot write ({exc.strerror or exc})") from None
        console.print(f"{what} written to {path}", highlight=False)


__all__ = ["register", "print_summary"]
