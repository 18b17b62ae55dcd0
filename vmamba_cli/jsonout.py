"""Strict JSON for every document the commands print or write: no ``NaN`` / ``Infinity`` literals.

Python's ``json`` writes non-finite floats as ``NaN`` / ``Infinity``, which JSON parsers (``jq``,
JavaScript, ``json.loads(parse_constant=...)``) refuse. Here they become ``null``, and
``nonfinite_paths`` says where, so that a command can report them. Imports nothing of the package,
so every layer above the kernels may use it.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _walk(obj: Any, path: str, found: list[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(path or "(document)")
        return None
    if isinstance(obj, dict):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_walk(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def finite(obj: Any) -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float replaced by None, and the paths of those values
    (``predictions[2].top[0].probability``)."""
    found: list[str] = []
    return _walk(obj, "", found), found


def nonfinite_paths(obj: Any) -> list[str]:
    return finite(obj)[1]


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    """``json.dumps`` that writes non-finite numbers as null (strict JSON)."""
    return json.dumps(finite(obj)[0], indent=indent, allow_nan=False)


__all__ = ["dumps", "finite", "nonfinite_paths"]
