"""The one cache root of the package: downloaded checkpoints and compiled kernels live under it.

``$VMAMBA_HOME`` when set, else ``$XDG_CACHE_HOME/vmamba``, else ``~/.cache/vmamba``. It sits in the
kernels package, the lowest layer, so the native CPU scan (``<root>/kernels``) and the weights
registry (``<root>/checkpoints``) read the same function. Read on every call: tests and users may
change the environment between calls.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "VMAMBA_HOME"


def cache_root() -> Path:
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vmamba"


__all__ = ["HOME_ENV", "cache_root"]
