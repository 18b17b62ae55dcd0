"""The `vmamba` command line (Typer). Each subcommand lives in vmamba_cli/commands/."""

from __future__ import annotations

import importlib
from typing import Optional

import typer
from typer.core import TyperGroup

from vmamba_cli.commands import COMMAND_MODULES
from vmamba_cli.commands._common import report_error
from vmamba_cli.errors import VMambaError
from vmamba_cli.version import __version__


class _VMambaGroup(TyperGroup):
    """The root command group: every subcommand runs inside it, so a ``VMambaError`` from any
    command (or the library it calls) is reported here once, as one line and its exit status."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VMambaError as exc:
            raise report_error(exc) from None


app = typer.Typer(
    cls=_VMambaGroup,
    name="vmamba",
    help="VMamba vision backbone: predict, evaluate, train, profile and visualise effective receptive fields.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"vmamba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Show the version and exit."),
):
    """VMamba from one command line; runs on CPU and GPU with no compile step."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"vmamba_cli.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"vmamba_cli.commands.{_name}":
            raise
        continue  # subcommand not built yet
    _module.register(app)


def main() -> None:
    # Keep freed large buffers for reuse instead of page-faulting fresh ones (vmamba_cli/memory.py).
    from vmamba_cli.memory import tune_malloc

    tune_malloc()
    # Images are checked against --max-pixels by vmamba_cli.data.load_image, which reports an image
    # over the limit as that file's error; Pillow's own warning for the same image would only repeat it.
    # Pillow also warns about damaged metadata (e.g. "Corrupt EXIF data") of images it still decodes
    # or then fails on: such an image is predicted, or reported as one error line, so the warning is
    # noise on stderr.
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    app()


if __name__ == "__main__":
    main()
