"""`vmamba profile`: params, FLOPs, speed and memory across resolutions, beside torchvision peers."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from vmamba_cli.commands._common import console, fail, print_json, resolve_device, user_errors
from vmamba_cli.runtime import AMP_CHOICES, AMP_HELP, check_output_file, resolve_amp

# Options that take several values; `--resolution 224 512` is read as `--resolution 224 --resolution 512`.
_MULTI_VALUE_OPTIONS = ("--model", "-m", "--resolution", "-r", "--compare", "--runtime")


class _MultiValueCommand(TyperCommand):
    """Lets a list option take space-separated values after one flag (Click needs the flag repeated)."""

    def parse_args(self, ctx, args):
        expanded, current = [], None
        for i, token in enumerate(args):
            if token == "--":
                expanded.extend(args[i:])
                break
            if token.startswith("-") and not _is_number(token):
                name = token.split("=", 1)[0]
                current = name if name in _MULTI_VALUE_OPTIONS else None
                expanded.append(token)
                continue
            if current is not None and expanded and expanded[-1] != current:
                expanded.append(current)
            expanded.append(token)
        return super().parse_args(ctx, expanded)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ratio(row: dict, key: str) -> str:
    value = (row.get("vs") or {}).get(key)
    return "" if value is None else f" ({value:.2f}x)"


def _label(row: dict) -> str:
    """The model column: the name, and the runtime of a row not run by eager PyTorch."""
    return row["model"] + (f" ({row['runtime']})" if row.get("runtime") not in (None, "torch") else "")


def _print_table(rows: list[dict], env: dict, command: str, train: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="vmamba profile (ratios: vs the first VMamba model at the same resolution)",
                  caption=escape(_caption(env, rows, command)), caption_justify="left")
    columns = ["model", "res", "batch", "params", "GFLOPs", "ms/batch", "img/s", "train img/s", "peak MiB",
               "scan GB/s (% bw)"]
    if not train:
        columns.remove("train img/s")
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        if r.get("status") != "ok":
            cells = [_label(r), str(r["resolution"]), str(r.get("batch_size") or "-"),
                     _fmt(r.get("params") and r["params"] / 1e6, ".1f") + "M", _fmt(r.get("gflops"), ".2f"),
                     r.get("status", "?"), r.get("error") or ""]
            cells += [""] * (len(columns) - len(cells))
            table.add_row(*cells)
            continue
        cells = [_label(r), str(r["resolution"]), str(r["batch_size"]), f"{r['params'] / 1e6:.1f}M",
                 _fmt(r.get("gflops"), ".2f"), _fmt(r.get("latency_ms"), ".1f"),
                 _fmt(r.get("images_per_s"), ".3g") + _ratio(r, "images_per_s")]
        if train:
            if r.get("train_status") == "ok":
                cells.append(_fmt(r.get("train_images_per_s"), ".3g") + _ratio(r, "train_images_per_s"))
            else:
                cells.append(r.get("train_status") or "-")
        cells.append(_fmt(r.get("peak_memory_mb"), ".0f") + _ratio(r, "peak_memory_mb"))
        if r.get("scan_gbs") is not None:
            frac = r.get("scan_bandwidth_fraction")
            cells.append(f"{r['scan_gbs']:.2f}" + ("" if frac is None else f" ({100 * frac:.1f}%)"))
        else:
            cells.append("-")
        table.add_row(*cells)
    # Off a terminal rich assumes 80 columns; a log file is better served by unwrapped rows.
    from rich.console import Console

    (console if console.is_terminal else Console(stderr=True, width=170)).print(table)


def _print_scaling(report: dict, train: bool) -> None:
    from rich.table import Table

    from vmamba_cli.profile import describe_crossover

    ref = report["reference"]
    table = Table(title="cost against pixel count: fitted exponent of log cost on log pixels (1 linear, 2 quadratic)"
                        + (f"; where {ref} overtakes each model" if ref else ""))
    columns = ["model", "resolutions", "FLOPs exp", "time exp", "memory exp"]
    if train:
        columns.append("train time exp")
    if ref:
        columns += [f"{ref} ahead in img/s", "ahead in memory"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "resolutions") else "right")
    crossings = {c["model"]: c for c in report["crossovers"]}

    def exp(entry, key):
        value = entry.get(key)
        return "-" if value is None else f"{value:.2f}"

    for entry in report["models"]:
        cells = [entry["model"], " ".join(map(str, entry["resolutions"])) or "-", exp(entry, "flops_exponent"),
                 exp(entry, "time_exponent"), exp(entry, "memory_exponent")]
        if train:
            cells.append(exp(entry, "train_time_exponent"))
        if ref:
            c = crossings.get(entry["model"])
            cells += ["reference", ""] if c is None else [describe_crossover(c["images_per_s"]),
                                                          describe_crossover(c["peak_memory_mb"])]
        table.add_row(*cells)
    from rich.console import Console

    (console if console.is_terminal else Console(stderr=True, width=170)).print(table)


def _caption(env: dict, rows: list[dict], command: str) -> str:
    bandwidth = next((r.get("bandwidth_gbs") for r in rows if r.get("bandwidth_gbs")), None)
    scan_ops = sorted({r["scan_op"] for r in rows if r.get("scan_op")})
    memory = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    load = env.get("loadavg")
    parts = [
        f"device: {env['device_name']} ({env['device']}), torch {env['torch']}, {env['torch_threads']} threads",
        f"scan backend (auto): {env['scan_backend']}" + (f"; timed op: {', '.join(scan_ops)}" if scan_ops else ""),
        f"memory bandwidth (copy): {bandwidth:.1f} GB/s" if bandwidth else "memory bandwidth: not measured",
        f"peak memory: {', '.join(memory) or '-'}",
        "FLOPs: one multiply-add = 1 (VMamba official convention; peers: FlopCounterMode / 2)",
        f"loadavg at start: {' '.join(f'{x:.2f}' for x in load)}" if load else "",
        f"loadavg at end: {' '.join(f'{x:.2f}' for x in env['loadavg_end'])}" if env.get("loadavg_end") else "",
        f"command: {command}",
    ]
    return "\n".join(p for p in parts if p)


def _write_csv(rows: list[dict], path: str) -> None:
    from vmamba_cli.profile import csv_columns, flatten_row
    from vmamba_cli.weights import atomic_write

    columns = csv_columns(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(flatten_row(row))
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def register(app: typer.Typer) -> None:
    @app.command("profile", cls=_MultiValueCommand)
    def profile_command(
        model: List[str] = typer.Option(["vmamba-tiny"], "--model", "-m",
                                        help="VMamba model(s); several values allowed (`vmamba models` lists them)."),
        resolution: List[int] = typer.Option([224], "--resolution", "-r",
                                             help="Square input size(s), e.g. `--resolution 224 512 1024`."),
        compare: List[str] = typer.Option([], "--compare",
                                          help="torchvision models measured in the same run (random weights), "
                                               "e.g. `--compare swin_t convnext_tiny resnet50 vit_b_16`; ViTs "
                                               "are built for each resolution (image_size=res)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b",
                                                 help="Batch size (default 1 on CPU, 32 on CUDA); halved on OOM."),
        train: bool = typer.Option(False, "--train", help="Also time a training step (forward+backward, no optimizer)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        amp: str = typer.Option("none", "--amp", help=AMP_HELP + " Default: none (float32, the paper's "
                                                                 "throughput protocol, docs/design.md §7)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch.set_num_threads for CPU runs."),
        channels_last: bool = typer.Option(False, "--channels-last", help="channels_last model and input."),
        warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Untimed runs first (default 2 CPU, 10 CUDA)."),
        iters: Optional[int] = typer.Option(None, "--iters", min=1, help="Timed runs, median reported (default 5 CPU, 30 CUDA)."),
        scan_bandwidth: bool = typer.Option(True, "--scan-bandwidth/--no-scan-bandwidth",
                                            help="Time the scan calls of one forward and report GB/s."),
        bandwidth_gbs: Optional[float] = typer.Option(None, "--bandwidth-gbs",
                                                      help="Machine memory bandwidth in GB/s (default: measured by a copy)."),
        runtime: List[str] = typer.Option(["torch"], "--runtime",
                                          help="Runtimes timed per VMamba model: torch (eager, always measured: "
                                               "the reference row) and onnxruntime (the model exported to a "
                                               "temporary ONNX file first; CPU), e.g. `--runtime torch "
                                               "onnxruntime`."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
        csv_path: Optional[str] = typer.Option(None, "--csv", help="Write one CSV row per model and resolution."),
        plot: Optional[str] = typer.Option(None, "--plot",
                                           help="Save time per image and peak memory against pixel count "
                                                "(log-log, fitted slopes in the legend) as PNG."),
        compile_model: bool = typer.Option(False, "--compile",
                                           help="Also measure each model under torch.compile (a row each; "
                                                "the warm-up includes the compile)."),
    ):
        """Params, FLOPs, latency, images/s, peak memory and scan GB/s per model and resolution."""
        from vmamba_cli.profile import environment, plot_scaling, profile, scaling_report

        if amp not in AMP_CHOICES:
            raise fail(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise fail(f"--device must be auto, cpu or cuda, got {device!r}")
        dev = resolve_device(device)
        for path in (csv_path, plot):  # before the work, not after it
            if path is not None:
                check_output_file(path)
        amp_dtype = resolve_amp(amp, dev)
        dtype = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"  # profile()'s names
        if threads:
            import torch

            torch.set_num_threads(threads)
        env = environment(dev)
        quiet = json_out

        def log(message: str) -> None:
            if not quiet:
                console.print(f"[dim]{message}[/]", highlight=False)

        with user_errors():
            rows = profile(model, resolution, compare=compare, batch_size=batch_size, device=dev, dtype=dtype,
                           train=train, warmup=warmup, iters=iters, threads=threads, channels_last=channels_last,
                           scan_bandwidth=scan_bandwidth, bandwidth_gbs=bandwidth_gbs, log=log,
                           compile=compile_model, runtimes=[r for r in dict.fromkeys(runtime) if r != "torch"])
        env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        command = "vmamba profile " + " ".join(_command_args(model, resolution, compare, batch_size, train, dev,
                                                             amp, threads, channels_last, warmup, iters,
                                                             compile_model, runtime))
        if csv_path:
            with user_errors():
                _write_csv(rows, csv_path)
        # Exponents and the plot describe the eager rows; a compiled or onnxruntime row repeats its model's name.
        eager_rows = [r for r in rows if r.get("runtime") in (None, "torch")]
        scaling = scaling_report(eager_rows)
        if plot:
            title = f"{env['device_name']} ({env['device']}), {dtype}, batch {rows[0].get('requested_batch_size')}"
            with user_errors():
                plot_scaling(eager_rows, plot, title=title, report=scaling)
        if json_out:
            print_json({"environment": env, "command": command, "rows": rows, "scaling": scaling})
        else:
            _print_table(rows, env, command, train)
            if len(resolution) > 1:
                _print_scaling(scaling, train)
            if csv_path:
                console.print(f"wrote {csv_path}")
            if plot:
                console.print(f"wrote {plot}")
        if rows and all(r.get("status") == "error" for r in rows):
            raise typer.Exit(1)


def _command_args(model, resolution, compare, batch_size, train, dev, amp, threads, channels_last, warmup, iters,
                  compile_model=False, runtime=("torch",)):
    args = ["--model", *model, "--resolution", *map(str, resolution)]
    if list(runtime) != ["torch"]:
        args += ["--runtime", *runtime]
    if compare:
        args += ["--compare", *compare]
    for flag, value in (("--batch-size", batch_size), ("--threads", threads), ("--warmup", warmup),
                        ("--iters", iters)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--device", dev.type, "--amp", amp]
    if train:
        args.append("--train")
    if compile_model:
        args.append("--compile")
    if channels_last:
        args.append("--channels-last")
    return args
