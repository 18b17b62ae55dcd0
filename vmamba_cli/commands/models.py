"""`vmamba models`: the registered configurations and their reported numbers."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from vmamba_cli.commands._common import console, print_json
from vmamba_cli.model import DEFAULT_MODEL, MODELS, resolve_model_name


def models_table() -> list[dict]:
    """One dict per registered model (what `vmamba models --json` prints)."""
    default = resolve_model_name(DEFAULT_MODEL)
    rows = []
    for spec in MODELS.values():
        rows.append({
            "name": spec.name, "aliases": list(spec.aliases), "paper_name": spec.paper_name,
            "official_name": spec.official_name, "default": spec.name == default,
            "params": spec.params, "gflops": spec.gflops, "top1": spec.top1, "top5": spec.top5,
            "checkpoint": spec.checkpoint, "url": spec.url, "preprocess": spec.preprocess.to_dict(),
        })
    return rows


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")):
        """List registered VMamba models with params, FLOPs, ImageNet top-1 and checkpoint."""
        rows = models_table()
        if json_out:
            print_json(rows)
            return
        table = Table(title="VMamba models (ImageNet-1k, 224x224, numbers reported by the authors)")
        for col in ("name", "aliases", "paper", "params", "GFLOPs", "top-1", "checkpoint"):
            table.add_column(col, justify="right" if col in ("params", "GFLOPs", "top-1") else "left",
                             no_wrap=col in ("name", "checkpoint"), overflow="fold")
        for r in rows:
            name = r["name"] + (" (default)" if r["default"] else "")
            table.add_row(name, ", ".join(r["aliases"]), escape(r["paper_name"]), f"{r['params'] / 1e6:.1f}M",
                          f"{r['gflops']:.2f}", f"{r['top1']:.1f}", r["checkpoint"])
        console.print(table)
