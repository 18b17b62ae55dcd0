"""Shared CLI plumbing: stderr console, one-line errors, device choice."""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

# Human output goes to stderr so that stdout stays parseable (`--json | jq`).
console = Console(stderr=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``error: message`` on one line and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors():
    """Turn expected failures (bad weights file, unknown model, bad option) into one line + exit 1."""
    from vmamba_cli.weights import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        raise fail(str(exc)) from None
    except KeyError as exc:  # unknown model names carry their own message
        raise fail(exc.args[0] if exc.args else str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None


def resolve_device(device: str):
    from vmamba_cli.runtime import select_device

    try:
        return select_device(device)
    except ValueError as exc:
        raise fail(str(exc)) from None


def print_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
