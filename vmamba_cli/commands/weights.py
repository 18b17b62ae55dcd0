"""`vmamba weights list|download` (the official checkpoints and the cache) and `vmamba convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from vmamba_cli.commands._common import ALLOW_NON_FINITE_HELP, console, print_json

weights_app = typer.Typer(help="Official checkpoints: list them with their cache state, download one.",
                          no_args_is_help=True)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


@weights_app.command("list")
def list_command(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
    """The nine official ImageNet-1k checkpoints, whether they are cached, and their reported top-1."""
    from vmamba_cli.weights import cache_dir, weights_status

    rows = weights_status()
    if json_out:
        print_json({"cache_dir": str(cache_dir()), "weights": rows})
        return
    table = Table(title=f"Official VMamba checkpoints (cache: {cache_dir()})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("name", "file", "cached", "MB", "top-1"):
        table.add_column(column, justify="right" if column in ("MB", "top-1") else "left",
                         no_wrap=True)
    for row in rows:
        table.add_row(row["name"], row["file"], "yes" if row["cached"] else "no",
                      "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.0f}",
                      f"{row['top1']:.1f}")
    console.print(table)
    console.print("Fetch one with `vmamba weights download NAME`; `vmamba predict` fetches the one it needs.",
                  highlight=False)


@weights_app.command("download")
def download_command(
    name: str = typer.Argument(..., help="Model name (vmamba-tiny, ...), official file name, or an http(s) URL."),
    force: bool = typer.Option(False, "--force", help="Download again even when cached."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Download one checkpoint into the cache (verified: size, loadable, keys, SHA-256)."""
    from vmamba_cli.weights import fetch_weights, find_entry
    from vmamba_cli.weights.download import sha256_of

    path = fetch_weights(name, force=force, progress=console.is_terminal)
    entry = find_entry(name)
    info = {"name": entry.name if entry else None, "url": entry.url if entry else name, "path": str(path),
            "size_bytes": path.stat().st_size, "sha256": sha256_of(path)}
    if json_out:
        print_json(info)
    else:
        console.print(f"{info['name'] or name}: {path} ({_size(info['size_bytes'])}, sha256 {info['sha256']})",
                      highlight=False, soft_wrap=True)


def convert_command(
    source: str = typer.Argument(..., metavar="SRC", help="Official .pth checkpoint (or registry name / URL)."),
    destination: Path = typer.Argument(..., metavar="DST", help="Output .safetensors file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", show_default=False,
                                        help="Model of SRC \\[default: inferred from an official file name]."),
    ema: bool = typer.Option(False, "--ema", help="Convert the model_ema entry instead of model."),
    allow_non_finite: bool = typer.Option(False, "--allow-non-finite", help=ALLOW_NON_FINITE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
):
    """Convert an official checkpoint to a safetensors file that carries its model config."""
    from vmamba_cli.runtime import check_output_file
    from vmamba_cli.weights import convert_checkpoint

    check_output_file(destination)  # before the checkpoint is read
    result = convert_checkpoint(source, destination, model=model, ema=ema, allow_non_finite=allow_non_finite)
    if json_out:
        print_json(result.to_dict())
    else:
        console.print(f"{result.source} ({result.entry}) -> {result.destination}: {result.model}, "
                      f"{result.tensors} tensors, {_size(result.size_bytes)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
    app.command("convert")(convert_command)
