"""The official ImageNet-1k checkpoints: where they live, where they are cached, how they are fetched.

One ``WeightsEntry`` per released model of ``vmamba_cli.model.MODELS`` (read on every call, so the
registry never disagrees with the model list). Files are cached in ``$VMAMBA_HOME/checkpoints``
(default ``~/.cache/vmamba/checkpoints``; ``vmamba_cli.kernels.cache.cache_root``) under their release file name; ``sha256.json`` beside them
records each file's hash when it first arrives and every later use checks it.

``resolve`` is how ``load_model`` (weights/model_io.py) reads a ``weights`` argument that is not a
local file: a model name (``vmamba-tiny``), an official file name (``vssm1_tiny_0230s_ckpt_epoch_264.pth``)
or an http(s) URL becomes a cached local path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from vmamba_cli.errors import UnknownModelError
from vmamba_cli.kernels.cache import cache_root
from vmamba_cli.model import MODELS, VSSM, resolve_model_name

from .download import DownloadError, NetworkError, Sha256Store, download_file, sha256_of
from .loading import CheckpointError, check_state_dict, checkpoint_filter_fn, read_state_dict

if TYPE_CHECKING:
    from vmamba_cli.model import VMambaConfig

HASHES_FILE = "sha256.json"


@dataclass(frozen=True)
class WeightsEntry:
    """One released checkpoint."""

    name: str                  # registered model name (vmamba_cli.model.MODELS)
    file: str                  # release asset file name, also the cache file name
    url: str                   # GitHub release asset (tag "#v0cls" / "#v2cls" url-encoded)
    top1: float                # ImageNet-1k top-1 reported by the authors
    config: "VMambaConfig"
    entry: str = "model"       # checkpoint dict entry used (docs/design.md §2.3: published numbers come from it)
    sha256: str | None = None  # pinned hash; None for the official files (never downloaded here)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "url": self.url, "top1": self.top1,
                "entry": self.entry, "sha256": self.sha256}


def home_dir() -> Path:
    """The package's cache root (``vmamba_cli.kernels.cache.cache_root``: ``$VMAMBA_HOME``)."""
    return cache_root()


def cache_dir() -> Path:
    """Folder of downloaded checkpoints: ``$VMAMBA_HOME/checkpoints``."""
    return home_dir() / "checkpoints"


def _store() -> Sha256Store:
    return Sha256Store(cache_dir() / HASHES_FILE)


def list_entries() -> list[WeightsEntry]:
    return [WeightsEntry(spec.name, spec.checkpoint, spec.url, spec.top1, spec.config) for spec in MODELS.values()]


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def find_entry(text: str) -> WeightsEntry | None:
    """The entry for a model name or alias, an official file name, or an official URL (else None)."""
    entries = list_entries()
    for entry in entries:
        if text in (entry.file, entry.url):
            return entry
    if _is_url(text) or text.endswith((".pth", ".safetensors", ".pt", ".bin")):
        return None
    try:
        name = resolve_model_name(text)
    except UnknownModelError:
        return None
    return next((e for e in entries if e.name == name), None)


def get_entry(name: str) -> WeightsEntry:
    """Like ``find_entry`` but raises an UnknownModelError (a KeyError) that lists the known names."""
    entry = find_entry(name)
    if entry is None:
        known = ", ".join(e.name for e in list_entries())
        raise UnknownModelError(f"no official weights named {name!r} (known: {known}); `vmamba weights list` shows them")
    return entry


def model_for_file(file_name: str) -> str | None:
    """Registered model name of an official checkpoint file name, else None."""
    return next((e.name for e in list_entries() if e.file == Path(file_name).name), None)


def cached_path(entry: WeightsEntry) -> Path:
    return cache_dir() / entry.file


def _url_cache_key(url: str) -> str:
    """Cache location (relative to the cache folder) of a file downloaded from an arbitrary URL."""
    base = Path(unquote(urlparse(url).path)).name or "weights.pth"
    return f"urls/{hashlib.sha256(url.encode()).hexdigest()[:12]}/{base}"


def _entry_verifier(entry: WeightsEntry):
    def verify(path: Path) -> None:
        tensors, _ = read_state_dict(path)
        check_state_dict(VSSM(entry.config), checkpoint_filter_fn(tensors), path, entry.name)
    return verify


def _loadable(path: Path) -> None:
    read_state_dict(path)


def _fetch(key: str, url: str, *, label: str, verify, pinned: str | None, force: bool, progress: bool) -> Path:
    dest = cache_dir() / key
    store = _store()
    recorded = store.get(key)
    if dest.exists() and not force:
        if recorded is None:
            verify(dest)  # placed by hand: check it once, then trust it from now on
            store.record(key, sha256_of(dest), dest.stat().st_size, url)
            return dest
        actual = sha256_of(dest)
        if actual != recorded:
            raise CheckpointError(dest, f"changed since it was downloaded (SHA-256 {actual[:16]}..., recorded "
                                        f"{recorded[:16]}...); delete it or fetch it again with "
                                        f"`vmamba weights download {label} --force`")
        return dest
    expected = pinned or (None if force else recorded)
    try:
        sha256 = download_file(url, dest, verify=verify, expected_sha256=expected, progress=progress)
    except NetworkError as exc:
        raise NetworkError(exc.path, f"{exc.problem}; download it by hand and pass it with --weights PATH, "
                                     f"or save it as {dest}") from None
    store.record(key, sha256, dest.stat().st_size, url)
    return dest


def fetch_weights(name_or_url: str, *, force: bool = False, progress: bool = True) -> Path:
    """Local path of official weights (model name, alias or file name) or of a weights URL,
    downloading into the cache when missing. ``force`` downloads again even when cached."""
    entry = find_entry(name_or_url)
    if entry is not None:
        return _fetch(entry.file, entry.url, label=entry.name, verify=_entry_verifier(entry),
                      pinned=entry.sha256, force=force, progress=progress)
    if _is_url(name_or_url):
        return _fetch(_url_cache_key(name_or_url), name_or_url, label=name_or_url, verify=_loadable,
                      pinned=None, force=force, progress=progress)
    get_entry(name_or_url)  # raises the UnknownModelError listing the known names
    raise AssertionError("unreachable")


def weights_status() -> list[dict[str, Any]]:
    """One row per official checkpoint with its cache state (what `vmamba weights list` shows)."""
    recorded = _store().read()
    rows = []
    for entry in list_entries():
        path = cached_path(entry)
        cached = path.is_file()
        record = recorded.get(entry.file) if isinstance(recorded.get(entry.file), dict) else {}
        rows.append({**entry.to_dict(), "cached": cached, "path": str(path),
                     "size_bytes": path.stat().st_size if cached else None,
                     "recorded_sha256": record.get("sha256")})
    return rows


def resolve(weights: str, model_name: str | None = None) -> Path | None:
    """Weights resolver for ``load_model``: registry names, official file names and URLs."""
    entry = find_entry(weights)
    if entry is not None:
        if model_name is not None and model_name != entry.name:
            raise CheckpointError(weights, f"are the official weights of {entry.name}, not of {model_name}; "
                                           "drop --model or pick matching --weights")
        return fetch_weights(weights)
    if _is_url(weights):
        return fetch_weights(weights)
    return None

__all__ = ["WeightsEntry", "DownloadError", "NetworkError", "cache_dir", "cached_path", "fetch_weights",
           "find_entry", "get_entry", "home_dir", "list_entries", "model_for_file", "resolve", "weights_status"]
