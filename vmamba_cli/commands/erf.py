"""`vmamba erf`: effective receptive field heat maps, measured and rendered (docs/design.md §8)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from vmamba_cli.commands._common import console, fail, print_json, resolve_device, user_errors
from vmamba_cli.erf import (AREA_THRESHOLDS, DEFAULT_NUM_IMAGES, DEFAULT_RESOLUTION, NORM_LABELS, NORMS,
                            InputSource, PanelResult, compute_panels, erf_report, folder_source, panel_specs,
                            render_erf, save_erf_maps)
from vmamba_cli.runtime import check_output_file


def _split(values: Optional[List[str]]) -> list[str]:
    """Repeated options and comma-separated lists alike: `--compare a,b --compare c`."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _show(results: list[PanelResult], source: InputSource, norm: str) -> None:
    table = Table(title=f"High-contribution area on {NORM_LABELS[norm]} ({source.resolution}x{source.resolution},"
                        f" {source.describe()})", title_justify="left")
    table.add_column("model")
    table.add_column("images", justify="right")
    for t in AREA_THRESHOLDS:
        table.add_column(f"t={t}: side / area", justify="right")
    table.add_column("s/image", justify="right")
    for r in results:
        images = str(r.erf.used) + (f" (+{r.erf.skipped_nonfinite} NaN)" if r.erf.skipped_nonfinite else "")
        cells = [f"{a.side} / {a.area_ratio:.4f}" for a in r.areas]
        per_image = r.erf.seconds_per_image
        table.add_row(r.spec.title, images, *cells, "-" if per_image is None else f"{per_image:.2f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command("erf")
    def erf_command(
        model: Optional[List[str]] = typer.Option(None, "--model", "-m", show_default=False,
                                                  help="Registered VMamba model; repeat for several panels "
                                                       "\\[default: vmamba-tiny, or the model of --weights]."),
        weights: Optional[List[str]] = typer.Option(None, "--weights", "-w", show_default=False,
                                                    help="Weights for each --model (same order): local file, "
                                                         "registry name or URL \\[default: fresh official init]."),
        images: Optional[List[str]] = typer.Option(None, "--images", "-i", show_default=False,
                                                   help="Image folder, file or glob (repeatable) \\[default: "
                                                        "built-in photos from scikit-image/scikit-learn/matplotlib]."),
        noise: bool = typer.Option(False, "--noise", help="Use Gaussian N(0,1) inputs instead of photos."),
        num_images: int = typer.Option(DEFAULT_NUM_IMAGES, "--num-images", "-n", min=1,
                                       help="Images averaged per model (NaN maps are skipped and counted)."),
        resolution: int = typer.Option(DEFAULT_RESOLUTION, "--resolution", "-r", min=32,
                                       help="Inputs are resized (short side, bicubic) and center-cropped to this."),
        norm: str = typer.Option("pow", "--norm", help="pow: map**0.2 / max (VMamba paper); "
                                                       "log: log10(map+1) / max (RepLKNet)."),
        out: str = typer.Option("erf.png", "--out", "-o", help="Heat map image to write."),
        save_map: Optional[str] = typer.Option(None, "--save-map", show_default=False,
                                               help="Also save the raw averaged maps (.npy or .safetensors)."),
        compare: Optional[List[str]] = typer.Option(None, "--compare", show_default=False,
                                                    help="torchvision models to put beside: NAME (random init) or "
                                                         "NAME:TAG (torchvision's released weights, from its cache), "
                                                         "e.g. --compare resnet50:IMAGENET1K_V2 convnext_tiny:DEFAULT "
                                                         "swin_t vit_b_16:DEFAULT (or comma-separated, or repeated). "
                                                         "ResNet/ConvNeXt/Swin/ViT families."),
        download: bool = typer.Option(False, "--download",
                                      help="Let torchvision download --compare weights missing from its cache "
                                           "(needs a network); without it a missing file is an error naming "
                                           "the file and the folder to put it in."),
        before_after: bool = typer.Option(False, "--before-after",
                                          help="Show each --model twice: fresh init and its --weights."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        scan_backend: str = typer.Option("auto", "--scan-backend", help="Selective-scan backend for VMamba."),
        seed: int = typer.Option(0, "--seed", help="Seed of random inits and of --noise inputs."),
        ema: bool = typer.Option(False, "--ema", help="Use the model_ema entry of official .pth weights."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
        more_compare: Optional[List[str]] = typer.Argument(None, hidden=True, show_default=False,
                                                           metavar="COMPARE_MODEL"),
    ):
        """Effective receptive field: average input-gradient map of the central output position,
        rendered as a heat map and measured as high-contribution area ratios."""
        compare_names = _split(compare)
        if more_compare:
            if compare is None:  # `--compare a b c`: the trailing names belong to --compare
                raise fail(f"unexpected argument {more_compare[0]!r} (did you mean --compare?)")
            compare_names += _split(more_compare)
        models = _split(model) or [None]  # vmamba-tiny, or the architecture of --weights
        if noise and images:
            raise fail("give either --images or --noise, not both")
        if norm not in NORMS:
            raise fail(f"--norm must be one of {', '.join(NORMS)}, not {norm!r}")
        dev = resolve_device(device)
        for path in (out, save_map):  # before the work, not after it
            if path is not None:
                check_output_file(path)
        errors: list[str] = []

        def report_error(message: str) -> None:
            errors.append(message)
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)

        with user_errors():
            specs = panel_specs(models, list(weights or []), before_after=before_after, compare=compare_names,
                                ema=ema)
            if noise:
                source = InputSource("noise", resolution, seed=seed, noise_count=num_images)
            elif images:
                source, scan_errors = folder_source(images, resolution)
                for message in scan_errors:
                    report_error(message)
                if not source.files:
                    raise fail("no input images found")
            else:
                source = InputSource("builtin", resolution)
            if source.available < num_images:
                console.print(f"note: {source.describe()}: averaging {source.available} instead of {num_images}",
                              highlight=False)
            results = _compute(specs, source, num_images=num_images, norm=norm, device=dev, seed=seed,
                               scan_backend=scan_backend, download=download, on_error=report_error)
            panels = [(r.spec.title, r.normalised) for r in results]
            render_erf(panels, out, colorbar_label=NORM_LABELS[norm])
            if save_map:
                save_erf_maps(save_map, [(r.spec.title, r.erf.raw) for r in results],
                              {"panels": [r.spec.title for r in results], "resolution": resolution,
                               "inputs": source.describe(), "norm_for_display": norm})
        report = erf_report(results, source, norm=norm, num_images=num_images, out=out, map_file=save_map,
                            errors=errors)
        if json_out:
            print_json(report)
        else:
            _show(results, source, norm)
        written = out + (f" and {save_map}" if save_map else "")
        console.print(f"wrote {written}", highlight=False, soft_wrap=True)
        if errors:
            raise typer.Exit(1)


def _compute(specs, source, **kwargs) -> list[PanelResult]:
    """compute_panels with a progress bar on a terminal, one line per image otherwise (logs)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    state = {"task": None, "title": "", "done": 0, "expected": 0, "since": 0.0}
    if not console.is_terminal:
        def start(spec, expected):
            state.update(title=spec.title, done=0, expected=expected, since=time.perf_counter())

        def advance(name, used):
            now = time.perf_counter()
            state["done"] += 1
            note = "" if used else " (NaN map, skipped)"
            console.print(f"{state['title']}: {state['done']}/{state['expected']} {name} "
                          f"{now - state['since']:.1f} s{note}", highlight=False, soft_wrap=True)
            state["since"] = now

        return compute_panels(specs, source, on_panel_start=start, on_image=advance, **kwargs)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        def start(spec, expected):
            state["task"] = progress.add_task(spec.title, total=expected)

        def advance(name, used):
            progress.advance(state["task"])

        return compute_panels(specs, source, on_panel_start=start, on_image=advance, **kwargs)
