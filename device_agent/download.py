"""Resumable package download over HTTP(S), stdlib only.

``download(url, dest, sha256=..., size=...)`` writes into ``<dest>.part``
and resumes it with ``Range: bytes=<have>-`` (and ``If-Range: "<sha256>"``,
so a server holding other bytes sends the whole file instead of a mismatched
tail) after a cut, a timeout or a power loss. When the part file is complete
its size and sha256 are checked; only then is it renamed to ``dest`` (so
``dest`` is always whole and right). ``verify_package(dest, trusted_keys)``
then checks the signature and every member through :mod:`edgeship.package`.

Retries are bounded (``retries``) with capped exponential backoff
(:func:`edgeship.mqtt.backoff_delay`); a wrong sha256 deletes the part file
(the next try starts over) and raises :class:`IntegrityError` once retries
are spent. ``bandwidth_kbps`` throttles reading with a token bucket.
A progress bar (tqdm on stderr) shows when interactive and not ``quiet``.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .._files import file_sha256
from ..errors import DownloadError, EdgeshipError, IntegrityError

__all__ = ["download", "DownloadResult", "verify_package"]

log = logging.getLogger("edgeship.agent.download")

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size: int
    resumed_from: int       # bytes already on disk when this call started
    attempts: int


def _progress(total: int | None, initial: int, quiet: bool, desc: str):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def download(url: str, dest: str | os.PathLike, *, sha256: str | None = None, size: int | None = None,
             retries: int = 5, timeout: float = 10.0, bandwidth_kbps: float = 0.0, backoff_base: float = 0.5,
             backoff_cap: float = 10.0, stop: threading.Event | None = None, quiet: bool = True,
             on_progress: Callable[[int, int | None], None] | None = None) -> DownloadResult:
    """Download ``url`` to ``dest`` resumably; check ``size``/``sha256`` when given. Raises DownloadError."""
    from ..mqtt import backoff_delay

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    stop = stop or threading.Event()
    if dest.exists() and sha256 and file_sha256(dest) == sha256:
        return DownloadResult(dest, sha256, dest.stat().st_size, dest.stat().st_size, 0)
    start_have = part.stat().st_size if part.exists() else 0
    last_err = "no attempt"
    attempt = 0
    for attempt in range(1, retries + 2):
        if stop.is_set():
            raise DownloadError(f"download of {url} stopped")
        try:
            _fetch_once(url, part, sha256=sha256, size=size, timeout=timeout, bandwidth_kbps=bandwidth_kbps,
                        stop=stop, quiet=quiet, on_progress=on_progress)
            have = part.stat().st_size
            if size is not None and have < size:
                raise DownloadError(f"connection closed after {have} of {size} bytes")
            if size is not None and have > size:
                part.unlink()
                raise IntegrityError(f"{url} delivered {have} bytes, the plan says {size}; starting over")
            digest = file_sha256(part)
            if sha256 and digest != sha256:
                part.unlink()
                raise IntegrityError(f"{url} delivered bytes whose sha256 is {digest[:12]}, expected "
                                     f"{sha256[:12]} (corrupt or tampered package on the server)")
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
            return DownloadResult(dest, digest, have, start_have, attempt)
        except (DownloadError, IntegrityError, OSError) as exc:
            last_err = str(exc)
            if attempt > retries or stop.is_set():
                if isinstance(exc, IntegrityError):
                    raise
                raise DownloadError(f"download of {url} failed after {attempt} attempts: {last_err}") from exc
            delay = backoff_delay(attempt - 1, base=backoff_base, cap=backoff_cap)
            log.warning("download of %s: %s; retrying in %.1f s", url, last_err, delay)
            stop.wait(delay)
    raise DownloadError(f"download of {url} failed after {attempt} attempts: {last_err}")


def _fetch_once(url: str, part: Path, *, sha256: str | None, size: int | None, timeout: float,
                bandwidth_kbps: float, stop: threading.Event, quiet: bool,
                on_progress: Callable[[int, int | None], None] | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have >= size:
        return  # complete already (checked by the caller)
    req = urllib.request.Request(url, headers={"User-Agent": "edgeship-agent"})
    if have:
        req.add_header("Range", f"bytes={have}-")
        if sha256:
            req.add_header("If-Range", f'"{sha256}"')
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URLs from a signed plan
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # What we have is at least the whole file: let the caller's size/sha check decide.
            exc.close()
            return
        exc.close()
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise DownloadError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    with resp:
        if have and resp.status == 200:
            have = 0  # server ignored the range (or other bytes): start over
            mode = "wb"
        elif resp.status == 206:
            mode = "ab"
        else:
            mode = "wb"
            have = 0
        total = size
        bar = _progress(total, have, quiet, part.name.removesuffix(".part"))
        rate = bandwidth_kbps * 1000 / 8 if bandwidth_kbps > 0 else 0.0
        t0, got = time.monotonic(), 0
        try:
            with open(part, mode) as f:
                while not stop.is_set():
                    try:
                        chunk = resp.read(_CHUNK)
                    except (TimeoutError, ConnectionError, OSError) as exc:
                        raise DownloadError(f"{url}: connection lost ({exc})") from exc
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    if size is not None and have + got > size:
                        break  # more than promised: the caller's check refuses it
                    if bar is not None:
                        bar.update(len(chunk))
                    if on_progress is not None:
                        on_progress(have + got, total)
                    if rate:
                        ahead = got / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            stop.wait(ahead)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if bar is not None:
                bar.close()
    if stop.is_set():
        raise DownloadError(f"download of {url} stopped")


def verify_package(path: str | os.PathLike, trusted_keys) -> dict:
    """Signature and every member's hash (edgeship.package.verify); returns name/version/sha256."""
    from ..package import verify

    try:
        pkg = verify(path, trusted_keys=trusted_keys, require_signature=True)
    except EdgeshipError:
        raise
    return {"name": pkg.name, "version": pkg.version, "sha256": pkg.sha256}
