"""User-facing errors: one base class, one subclass per kind of bad input, and the exit statuses.

The command line catches ``VMambaError`` once (vmamba_cli/cli.py) and prints ``error: <message>`` on
one line of stderr, then exits with the error's ``exit_code``; no traceback. Library code raises these
for problems the user can fix (a bad file, an unknown name, a bad value); anything else is a bug and
keeps its traceback. This module imports nothing, so every layer above the kernels may use it.
"""

# Exit statuses of the `vmamba` commands (docs/eval.md, docs/predict.md, docs/train.md).
EXIT_OK = 0
EXIT_ERROR = 1             # the command could not do its work: bad weights, data, option value, device
EXIT_USAGE = 2             # bad command line (Typer/Click: unknown option, value out of range)
EXIT_IMAGE_FAILURES = 3    # eval finished and wrote its results, but some images could not be read
EXIT_INTERRUPTED = 130     # stopped by Ctrl-C / SIGINT (128 + 2, the shell convention)


class VMambaError(Exception):
    """Base of every error meant for the user; ``str(err)`` is one line."""

    exit_code = EXIT_ERROR


class PathError(VMambaError):
    """A problem with one file or folder: ``path`` and ``problem``, shown as ``path: problem``."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class CheckpointError(PathError):
    """A weights file that cannot be used (missing, unreadable, wrong model, failed download)."""


class ImageError(PathError):
    """An input that is not a usable image (missing, unreadable, truncated, not an image)."""


class DataError(VMambaError, ValueError):
    """A dataset that cannot be used; the message names the path and the problem."""


class ResumeError(VMambaError, ValueError):
    """A training run that cannot be resumed or started as asked (state file, changed settings)."""


class TrainingDiverged(VMambaError, RuntimeError):
    """The training loss became NaN/inf; the message names the last good checkpoint."""


class InputError(VMambaError, ValueError):
    """A value given to a library function that it refuses (top-k of 0, labels that do not fit ...)."""


class ExportError(VMambaError, RuntimeError):
    """An export or an exported file that cannot be used (or a missing optional package)."""


class UnknownModelError(VMambaError, KeyError):
    """A model (or official weights) name that is not registered; the message lists close names.

    Also a KeyError: name lookups raised KeyError before this class existed, and callers and tests
    that catch KeyError (``pytest.raises(KeyError)``, ``except KeyError``) keep working.
    """

    def __str__(self) -> str:
        # KeyError's own __str__ quotes its argument like a dict key.
        return str(self.args[0]) if self.args else ""


__all__ = [
    "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_IMAGE_FAILURES", "EXIT_INTERRUPTED",
    "VMambaError", "PathError", "CheckpointError", "ImageError", "DataError", "ResumeError", "TrainingDiverged",
    "InputError", "ExportError", "UnknownModelError",
]
