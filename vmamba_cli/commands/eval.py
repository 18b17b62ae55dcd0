"""`vmamba eval`: top-1 / top-5 / loss of a model on an image folder, on one process or under torchrun."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from vmamba_cli.commands._common import ALLOW_NON_FINITE_HELP, MAX_PIXELS_HELP, console, fail, print_json, user_errors
from vmamba_cli.data import DEFAULT_MAX_PIXELS, MAX_PIXELS_CEILING
from vmamba_cli.errors import EXIT_ERROR
from vmamba_cli.runtime import AMP_HELP, MAX_RESOLUTION, MIN_RESOLUTION

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


def print_sweep_table(sweeps) -> None:
    """One row per (model, resolution): top-1, top-5, loss, images, images/s."""
    first = sweeps[0].results[0]
    table = Table(title=f"vmamba eval: accuracy against resolution on {first.data_dir}", title_justify="left")
    several = len(sweeps) > 1
    if several:
        table.add_column("model")
    for name in ("resolution", "top-1 %", f"top-{first.top5_k} %", "loss", "images", "failed", "images/s"):
        table.add_column(name, justify="right")
    for sweep in sweeps:
        for result in sweep.results:
            cells = [f"{result.resolution}", "n/a" if result.top1 is None else f"{result.top1:.2f}",
                     "n/a" if result.top5 is None else f"{result.top5:.2f}",
                     "n/a" if result.loss is None else f"{result.loss:.4f}", f"{result.num_images}",
                     f"{result.num_failed}",
                     "n/a" if result.images_per_sec is None else f"{result.images_per_sec:.1f}"]
            table.add_row(*([sweep.label] if several else []), *cells)
    console.print(table)
    for sweep in sweeps:
        r = sweep.results[0]
        console.print(f"{sweep.label}: {r.weights or 'random init'} ({r.model}), own size {sweep.preset_resolution}px; "
                      f"{r.num_class_folders} folders -> {r.num_classes}-class head ({r.class_mapping})",
                      highlight=False, markup=False, soft_wrap=True)
    console.print(f"setup: crop_pct {first.crop_pct:.4g}, {first.device}, batch {first.batch_size} x "
                  f"{first.world_size} process(es)" + (f", amp {first.amp}" if first.amp else ""), highlight=False)
    if any(r.weights is None for s in sweeps for r in s.results[:1]):
        console.print("[yellow]warning:[/] a model without --weights: its numbers are those of random init")
    failures = {f.path: f.reason for s in sweeps for r in s.results for f in r.failures}
    if failures:
        console.print(f"[red]{len(failures)} image(s) could not be read:[/]")
        for path, reason in list(failures.items())[:MAX_FAILURES_SHOWN]:
            console.print(f"  {path}: {reason}", markup=False, highlight=False, soft_wrap=True)


def _split_positionals(data_dir: Path, extra: list[str], resolution: Optional[List[int]]) -> tuple[Path, list[int] | None]:
    """``--resolution 224 288 384`` puts 288 and 384 among the positional arguments (an option takes one
    value); the integers there, when --resolution was given, are more resolutions. A folder whose name is
    an integer and that exists stays the data folder."""
    tokens = [str(data_dir), *extra]
    numbers = [t for t in tokens if t.isdigit() and not Path(t).is_dir()] if resolution else []
    for number in numbers:  # the bounds Typer applies to --resolution itself
        if not MIN_RESOLUTION <= int(number) <= MAX_RESOLUTION:
            raise typer.BadParameter(f"{number} is not in the range {MIN_RESOLUTION}<=x<={MAX_RESOLUTION}",
                                     param_hint="'--resolution' / '-r'")
    others = [t for t in tokens if t not in numbers]
    if len(others) != 1:
        unexpected = others[1:] if others else []
        what = (f"unexpected argument(s): {' '.join(unexpected)} (one DATA_DIR; several models: "
                f"repeat --weights)") if unexpected else "missing DATA_DIR"
        raise typer.BadParameter(what)
    return Path(others[0]), ([*resolution, *map(int, numbers)] if resolution else None)


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_extra_args": True})
    def eval_command(
        ctx: typer.Context,
        data_dir: Path = typer.Argument(..., help="Image folder with one sub-folder per class "
                                             "(ImageNet val layout: WordNet-id folders such as n01440764)."),
        model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="Registered model name (default "
                                                  "vmamba-tiny; taken from the file for our .safetensors). "
                                                  "Repeat to pair with several --weights."),
        weights: Optional[List[str]] = typer.Option(None, "--weights", "-w", help="Checkpoint: official .pth, "
                                                    "our .safetensors, a registered weights name / URL, or an .onnx file from "
                                                    "`vmamba export` (run by onnxruntime). "
                                                    "Repeat to compare several models (one table row and "
                                                    "one plot line each)."),
        ema: bool = typer.Option(False, "--ema", help="Use the EMA weights of an official checkpoint."),
        allow_non_finite: bool = typer.Option(False, "--allow-non-finite", help=ALLOW_NON_FINITE_HELP),
        resolution: Optional[List[int]] = typer.Option(None, "--resolution", "-r", min=MIN_RESOLUTION,
                                                       max=MAX_RESOLUTION,
                                                       help="Center-crop size in pixels; several sizes "
                                                            "(`-r 224 288 384`) evaluate each with the model "
                                                            "loaded once (default: the size a `vmamba train` "
                                                            "checkpoint records, else 224)."),
        crop_pct: Optional[float] = typer.Option(None, "--crop-pct",
                                                 help="Resize the short side to resolution/crop_pct, then crop "
                                                      "(default: the checkpoint's, else 0.875)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="Images per batch (per process)."),
        workers: Optional[int] = typer.Option(None, "--workers", "-j", min=0, help="DataLoader worker processes "
                                              "(default: min(4, CPUs per process - 1))."),
        amp: str = typer.Option("auto", "--amp", help=AMP_HELP),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N images."),
        max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, max=MAX_PIXELS_CEILING,
                                       help=MAX_PIXELS_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON document on stdout "
                                      "(`rows`: one entry per model and resolution)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the JSON results to FILE."),
        predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write a per-image CSV "
                                                   "(path, target, top-5 classes and probabilities, correct); "
                                                   "one model at one resolution only."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Draw top-1 against resolution to FILE.png "
                                            "(one line per model)."),
    ):
        """Top-1, top-5 and loss on an image folder; exact counts under `torchrun -m vmamba_cli eval`.

        Several resolutions (`-r 224 288 384 512`) and several `--weights` give one row per model and
        resolution, and `--plot` draws accuracy against resolution.

        Exit status: 0 all images evaluated; 1 error (bad weights, folder or classes; nothing evaluated);
        2 bad command line; 3 finished, but some images could not be read (listed in the summary and JSON).
        """
        from vmamba_cli.errors import VMambaError
        from vmamba_cli.evaluate import evaluate, evaluate_resolutions, model_runs
        from vmamba_cli.runtime import check_output_file, process_group

        data_dir, resolutions = _split_positionals(data_dir, list(ctx.args), resolution)
        try:
            runs = model_runs(model, weights)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        sweep_mode = len(runs) > 1 or (resolutions is not None and len(resolutions) > 1) or plot is not None
        if sweep_mode and predictions is not None:
            raise typer.BadParameter("--predictions writes one model at one resolution; drop it, or evaluate "
                                     "one --weights at one --resolution")
        for path in (output, predictions, plot):  # before the work, not after it
            if path is not None:
                check_output_file(path)
        with contextlib.ExitStack() as stack:
            with user_errors():
                dist = stack.enter_context(process_group(device))  # torchrun: join its group
            try:
                if not sweep_mode:
                    result = evaluate(
                        data_dir, runs[0].model, runs[0].weights, ema=ema,
                        resolution=resolutions[0] if resolutions else None, crop_pct=crop_pct,
                        device=device, batch_size=batch_size, workers=workers, amp=amp,
                        limit=limit, predictions=predictions is not None, progress=sys.stderr.isatty(),
                        max_pixels=max_pixels, allow_non_finite=allow_non_finite,
                    )
                    sweeps = None
                else:
                    # Without --resolution each model runs at its own size (None).
                    sweeps = [evaluate_resolutions(data_dir, run.model, run.weights, resolutions=resolutions or [None],
                                                   label=run.label, ema=ema, crop_pct=crop_pct, device=device,
                                                   batch_size=batch_size, workers=workers, amp=amp, limit=limit,
                                                   progress=sys.stderr.isatty(), max_pixels=max_pixels,
                                                   allow_non_finite=allow_non_finite)
                              for run in runs]
            except VMambaError:
                raise  # reported once by the CLI (vmamba_cli/cli.py), from rank 0 only
            except (ValueError, FileNotFoundError) as exc:
                # Every process meets the same bad input: one of them says so.
                raise (fail(str(exc)) if dist.is_main else typer.Exit(EXIT_ERROR)) from None
            if dist.is_main:
                if sweeps is None:
                    write_outputs(result, output, predictions, _document([_single_sweep(result)]))
                    print_summary(result)
                    if json_out:
                        print_json(_document([_single_sweep(result)]))
                else:
                    write_outputs(None, output, None, _document(sweeps))
                    if plot is not None:
                        _write_plot(sweeps, plot)
                    print_sweep_table(sweeps)
                    if json_out:
                        print_json(_document(sweeps))
            # The other processes wait for the files: torchrun stops every worker once one exits non-zero.
            dist.barrier()
        exit_code = result.exit_code if sweeps is None else max(s.exit_code for s in sweeps)
        if exit_code and dist.is_main:
            raise typer.Exit(exit_code)


def _single_sweep(result):
    from vmamba_cli.evaluate import ResolutionSweep

    return ResolutionSweep(Path(result.weights).stem if result.weights else result.model, [result], result.resolution)


def _document(sweeps) -> dict:
    from vmamba_cli.evaluate import sweep_document

    return sweep_document(sweeps)


def _write_plot(sweeps, path: Path) -> None:
    from vmamba_cli.evaluate import plot_accuracy_vs_resolution

    try:
        plot_accuracy_vs_resolution(sweeps, path)
    except OSError as exc:
        raise fail(f"{path}: cannot write ({exc.strerror or exc})") from None
    console.print(f"plot written to {path}", highlight=False)


def write_outputs(result, output: Optional[Path], predictions: Optional[Path], document: dict | None = None) -> None:
    """``--output`` gets ``document`` (the --json document), ``--predictions`` the per-image CSV."""
    from vmamba_cli.weights import atomic_write

    def save_document(path):
        import json

        text = json.dumps(document if document is not None else result.to_dict(), indent=2) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    for path, save, what in ((output, save_document, "results"),
                             (predictions, result.save_predictions if result is not None else None,
                              "per-image predictions")):
        if path is None:
            continue
        try:
            save(path)
        except OSError as exc:
            raise fail(f"{path}: cannot write ({exc.strerror or exc})") from None
        console.print(f"{what} written to {path}", highlight=False)


__all__ = ["register", "print_summary", "print_sweep_table"]
