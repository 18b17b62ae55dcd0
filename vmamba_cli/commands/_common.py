"""Shared CLI plumbing: stderr console, one-line errors, device choice, JSON output."""

from __future__ import annotations

import contextlib
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from vmamba_cli import jsonout
from vmamba_cli.errors import EXIT_ERROR, VMambaError

# Human output goes to stderr so that stdout stays parseable (`--json | jq`).
console = Console(stderr=True)


def fail(message: str, code: int = EXIT_ERROR) -> "typer.Exit":
    """Print ``error: message`` on one line and return the Exit to raise."""
    # The message is plain text: brackets in it (`pip install "vmamba[export]"`) are not markup.
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def is_main_process() -> bool:
    """False on the workers of a torchrun job other than rank 0 (they meet the same errors)."""
    return os.environ.get("RANK", "0") in ("", "0")


def report_error(exc: VMambaError) -> "typer.Exit":
    """The one place a user-facing error becomes output: one line on stderr (from rank 0 only under
    torchrun) and the error's exit status. Used by the root command group (vmamba_cli/cli.py)."""
    if is_main_process():
        return fail(str(exc), exc.exit_code)
    return typer.Exit(exc.exit_code)


@contextlib.contextmanager
def user_errors():
    """Turn KeyError / ValueError / FileNotFoundError raised by third-party code or argument checks
    into one line and exit 1. ``VMambaError`` passes through to the CLI's single handler."""
    try:
        yield
    except VMambaError:
        raise
    except KeyError as exc:  # a lookup by a name the user gave; KeyError's str() would quote it
        raise fail(exc.args[0] if exc.args else str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None


def resolve_device(device: str):
    from vmamba_cli.runtime import select_device

    try:
        return select_device(device)
    except ValueError as exc:
        raise fail(str(exc)) from None


ALLOW_NON_FINITE_HELP = "Load weights that hold NaN / Inf values (refused by default: they give NaN outputs)."
MAX_PIXELS_HELP = ("Refuse images whose header claims more pixels than this, before decoding them "
                   "(decompression bombs); the default is Pillow's limit, about 9459x9459.")


def print_json(obj) -> None:
    """One strict JSON document on stdout: non-finite numbers are written as null and reported on
    stderr, so that the output always parses (``jq``, ``json.loads``)."""
    clean, replaced = jsonout.finite(obj)
    sys.stdout.write(jsonout.dumps(clean) + "\n")
    sys.stdout.flush()
    if replaced:
        more = f" (and {len(replaced) - 3} more)" if len(replaced) > 3 else ""
        console.print(f"[yellow]warning:[/] {len(replaced)} non-finite number(s) written as null in the JSON "
                      f"output: {', '.join(replaced[:3])}{more}", highlight=False, soft_wrap=True)

