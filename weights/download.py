"""Downloading weights files safely: stream to a temporary file beside the target, check size, content
and SHA-256, and rename only then, so that an interrupted or corrupt download leaves nothing behind.

A download that stops making progress is ended by a ``StallRule`` (no data for a while, or too few
bytes over a window), so a trickling server cannot hold it open. Temporary files carry the id of the
process writing them; those of processes that are gone (killed hard) are removed on the next download.

``Sha256Store`` is the small JSON file (``sha256.json`` in the cache folder) that remembers the hash of
every file the first time it was downloaded, so a later download or a cached copy that differs is caught.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .loading import CheckpointError, atomic_write

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
_STALE_PART_AGE_S = 24 * 3600
_REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class StallRule:
    """When a download counts as stalled: no byte for ``idle_s`` seconds, or fewer than
    ``min_bytes_per_s`` on average over the last ``window_s`` seconds (checked once the download has
    run that long). A trickle of a few bytes per second passes every per-read timeout; the rate
    floor ends it."""

    idle_s: float = 30.0
    min_bytes_per_s: float = 1024.0
    window_s: float = 60.0


DEFAULT_STALL = StallRule()


class DownloadError(CheckpointError):
    """A download that failed or did not verify; ``str(err)`` is one line naming the file."""


class NetworkError(DownloadError):
    """The server could not be reached at all (no network, DNS failure, refused connection)."""


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = " ".join(str(reason).split()) or type(reason).__name__
    return text if len(text) <= 160 else text[:157] + "..."


class Sha256Store:
    """``{relative path: {sha256, size, url, recorded}}`` kept in a JSON file, rewritten atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.path, f"unreadable hash record ({_reason(exc)}); "
                                             "delete it to start afresh") from None
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        record = self.read().get(key)
        return record.get("sha256") if isinstance(record, dict) else None

    def record(self, key: str, sha256: str, size: int, url: str | None) -> None:
        data = self.read()
        data[key] = {"sha256": sha256, "size": size, "url": url,
                     "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))

    def forget(self, key: str) -> None:
        data = self.read()
        if data.pop(key, None) is not None:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _part_owner_gone(part: Path) -> bool:
    """True when the process id in a temporary file's name (``.<name>.<pid>.<random>.part``) is not running."""
    fields = part.name[: -len(".part")].rsplit(".", 2)
    if len(fields) != 3 or not fields[1].isdigit():
        return False
    pid = int(fields[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _remove_stale_parts(dest: Path) -> None:
    """Remove temporary files of earlier downloads of ``dest`` that were killed hard (SIGKILL, power
    loss): those whose writing process is gone, and any older than a day (another machine's, or
    written before file names carried the process id)."""
    now = time.time()
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        try:
            if _part_owner_gone(part) or now - part.stat().st_mtime > _STALE_PART_AGE_S:
                part.unlink()
        except OSError:
            pass


class _StallWatch:
    """Applies a StallRule to the byte counts of one download."""

    def __init__(self, rule: StallRule):
        self.rule = rule
        self.start = time.monotonic()
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(self.start, 0)])

    def check(self, received: int) -> str | None:
        """Why the download counts as stalled at ``received`` bytes, else None."""
        now = time.monotonic()
        self.samples.append((now, received))
        window = self.rule.window_s
        if now - self.start < window:
            return None
        while len(self.samples) > 1 and self.samples[1][0] <= now - window:
            self.samples.popleft()
        then, before = self.samples[0]
        span = now - then
        rate = (received - before) / span if span > 0 else float("inf")
        if rate < self.rule.min_bytes_per_s:
            return (f"too slow: {rate / 1024:.2f} KiB/s over the last {span:.0f} s, below the floor of "
                    f"{self.rule.min_bytes_per_s / 1024:.2f} KiB/s")
        return None


def _progress_bar(total: int | None, name: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: tqdm draws only when stderr is a terminal, so logs do not fill with bar updates.
    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=None if enabled else True, leave=False, dynamic_ncols=True)


def download_file(url: str, dest: str | os.PathLike, *, name: str | None = None,
                  verify: Callable[[Path], None] | None = None, expected_sha256: str | None = None,
                  progress: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                  stall: StallRule = DEFAULT_STALL) -> str:
    """Download ``url`` to ``dest`` and return its SHA-256.

    The bytes go to ``.<dest name>.<pid>.<random>.part`` in ``dest``'s folder; the file is renamed to ``dest``
    only after the byte count matches Content-Length, ``verify(tmp_path)`` passed (it raises
    ``CheckpointError`` for a file that cannot be used) and the hash equals ``expected_sha256`` (when
    given). On any failure, Ctrl-C included, the temporary file is removed and ``dest`` is untouched.
    ``stall`` ends a download that stops making progress (see ``StallRule``); ``timeout`` bounds the
    connection and each read. Errors are ``NetworkError`` (server unreachable) or ``DownloadError``
    (HTTP error, redirect loop, stall, interruption, bad content), one line naming ``name``.
    """
    dest = Path(dest)
    name = name or dest.name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(dest)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DownloadError(name, f"cannot write to the cache folder {dest.parent} ({_reason(exc)}); "
                                  "set VMAMBA_HOME to a writable folder") from None
    tmp = Path(tmp_name)
    try:
        from vmamba_cli.version import __version__

        request = urllib.request.Request(url, headers={"User-Agent": f"vmamba/{__version__}"})
        try:
            response = urllib.request.urlopen(request, timeout=min(timeout, stall.idle_s))
        except urllib.error.HTTPError as exc:
            # urllib gives up on a redirect chain that repeats a URL or grows too long with an
            # HTTPError whose several-line message says "infinite loop".
            if exc.code in _REDIRECT_CODES and "infinite loop" in str(exc.msg):
                target = exc.headers.get("Location") if exc.headers else None
                raise DownloadError(name, f"cannot download {url}: the server redirects in a loop (HTTP {exc.code}"
                                          f"{f', last to {target}' if target else ''})") from None
            raise DownloadError(name, f"cannot download {url}: the server answered HTTP {exc.code} "
                                      f"{_reason(exc)}") from None
        except TimeoutError:
            raise NetworkError(name, f"cannot download {url} (no answer within {min(timeout, stall.idle_s):g} s)") from None
        except (urllib.error.URLError, OSError) as exc:
            raise NetworkError(name, f"cannot download {url} (no connection: {_reason(exc)})") from None
        digest = hashlib.sha256()
        received = 0
        with response, os.fdopen(fd, "wb") as out:
            fd = None
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            watch = _StallWatch(stall)
            with _progress_bar(total, name, progress) as bar:
                try:
                    # read1 returns what one socket read brings, so the stall rule sees a trickle as
                    # it arrives (read(n) would wait for all n bytes).
                    while chunk := response.read1(CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                        stalled = watch.check(received)
                        if stalled:
                            raise DownloadError(name, f"download from {url} stalled after {_mb(received)} "
                                                      f"({stalled}); nothing was kept, try again")
                except TimeoutError:
                    raise DownloadError(name, f"download from {url} stalled after {_mb(received)} (no data for "
                                              f"{min(timeout, stall.idle_s):g} s); nothing was kept, try again") from None
                except (OSError, http.client.HTTPException, ValueError) as exc:  # reset, IncompleteRead
                    raise DownloadError(name, f"download from {url} interrupted after {_mb(received)} "
                                              f"({_reason(exc)}); nothing was kept, try again") from None
        if total is not None and received != total:
            raise DownloadError(name, f"download from {url} interrupted: got {received} of {total} bytes; "
                                      "nothing was kept, try again")
        if received == 0:
            raise DownloadError(name, f"download from {url} is empty; nothing was kept")
        sha256 = digest.hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise DownloadError(name, f"downloaded file from {url} has SHA-256 {sha256[:16]}..., expected "
                                      f"{expected_sha256[:16]}... (the file on the server changed or the "
                                      "download was altered); nothing was kept")
        if verify is not None:
            try:
                verify(tmp)
            except CheckpointError as exc:
                raise DownloadError(name, f"downloaded file from {url} is not usable ({exc.problem}); "
                                          "nothing was kept") from None
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a cache may be shared by several users
        os.replace(tmp, dest)
        return sha256
    finally:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
