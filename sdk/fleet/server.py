"""HTTP package server: ``.edgepkg`` files by name and by sha256, with ranged GET.

``PackageServer(directory, host="127.0.0.1", port=0)`` serves every
``*.edgepkg`` in ``directory`` (and files added by :meth:`add`) at

    /packages/<file name>            e.g. /packages/digits-2.0.0.edgepkg
    /packages/sha256/<hex digest>    the same bytes, addressed by content

with ``ETag: "<sha256>"``, ``Accept-Ranges: bytes``, single ``Range:
bytes=a-b`` requests answered ``206`` with ``Content-Range`` (several reads
resume a download), ``416`` for a range outside the file, ``304`` for a
matching ``If-None-Match``, ``HEAD`` and ``404``. Stdlib ``http.server``,
one thread per connection (:class:`ThreadingHTTPServer`); the server owns its
thread: ``start()`` / ``stop(timeout)`` / context manager.

The sha256 of each file is computed once per (path, size, mtime), so a file
replaced on disk is re-hashed and never served under a stale ETag.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import ConfigError, TransportError

__all__ = ["PackageServer", "parse_range"]

log = logging.getLogger("edgeship.fleet.server")

_CHUNK = 64 * 1024


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``Range`` header -> (first, last) inclusive, None (no/ignored range) or "unsatisfiable". Pure."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: RFC 9110 lets us ignore it and send 200
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, min(last, size - 1)


class _Index:
    """File name / sha256 -> path, hashing each file once per (size, mtime)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.extra: dict[str, Path] = {}
        self._hashes: dict[Path, tuple[int, int, str]] = {}
        self._lock = threading.Lock()

    def files(self) -> dict[str, Path]:
        out = {}
        if self.directory is not None and self.directory.is_dir():
            out.update({p.name: p for p in self.directory.glob("*.edgepkg") if p.is_file()})
        out.update(self.extra)
        return out

    def sha256(self, path: Path) -> str:
        st = path.stat()
        with self._lock:
            cached = self._hashes.get(path)
            if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
                return cached[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._hashes[path] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def find(self, url_path: str) -> Path | None:
        parts = [urllib.parse.unquote(p) for p in url_path.split("?", 1)[0].split("/") if p]
        if len(parts) == 2 and parts[0] == "packages":
            p = self.files().get(parts[1])
            return p if p is not None and "/" not in parts[1] else None
        if len(parts) == 3 and parts[:2] == ["packages", "sha256"] and re.fullmatch(r"[0-9a-f]{64}", parts[2]):
            for p in self.files().values():
                try:
                    if self.sha256(p) == parts[2]:
                        return p
                except OSError:
                    continue
        return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgeship-packages/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # quiet: one debug line per request
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server API
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _plain(self, status: int, text: str, headers: dict | None = None) -> None:
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        index: _Index = self.server.index  # type: ignore[attr-defined]
        path = index.find(self.path)
        if path is None:
            self._plain(HTTPStatus.NOT_FOUND, "no such package; GET /packages/<file> or /packages/sha256/<hex>")
            return
        try:
            size = path.stat().st_size
            etag = f'"{index.sha256(path)}"'
            f = open(path, "rb")
        except OSError:
            self._plain(HTTPStatus.NOT_FOUND, "package vanished")
            return
        with f:
            if self.headers.get("If-None-Match") == etag:
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            rng = parse_range(self.headers.get("Range"), size)
            if_range = self.headers.get("If-Range")
            if rng is not None and if_range is not None and if_range != etag:
                rng = None  # the client's partial copy is of other bytes: send all
            if rng == "unsatisfiable":
                self._plain(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "range outside the file",
                            {"Content-Range": f"bytes */{size}", "ETag": etag})
                return
            first, last = rng if rng is not None else (0, size - 1)
            self.server.owner._count("partial" if rng is not None else "full")  # type: ignore[attr-defined]
            length = max(0, last - first + 1)
            self.send_response(HTTPStatus.PARTIAL_CONTENT if rng is not None else HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            if rng is not None:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            if not body:
                return
            f.seek(first)
            left = length
            limit = self.server.limit_bps  # type: ignore[attr-defined]
            # Fault injection cuts fresh downloads only, so the resumed ones can complete.
            cut = self.server.owner._take_cut() if first == 0 else None  # type: ignore[attr-defined]
            sent = 0
            stop = self.server.stopping  # type: ignore[attr-defined]
            try:
                while left > 0 and not stop.is_set():
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    if cut is not None and sent + len(chunk) > cut:
                        self.server.owner._count("cut")  # type: ignore[attr-defined]
                        # Test hook: drop the connection mid-body, as a flaky link would.
                        self.wfile.write(chunk[: max(0, cut - sent)])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    left -= len(chunk)
                    if limit:
                        stop.wait(len(chunk) / limit)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True


class PackageServer:
    """Serve ``directory``'s packages over HTTP. ``url`` is the base (``http://host:port``)."""

    def __init__(self, directory: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 limit_bps: float = 0) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise ConfigError(f"package directory {self.directory} does not exist")
        self.host, self.port = host, port
        self.index = _Index(self.directory)
        self.limit_bps = limit_bps
        self._cuts: list[int] = []  # tests: cut the next responses after so many body bytes
        self._cut_lock = threading.Lock()
        self.counters: dict[str, int] = {"full": 0, "partial": 0, "cut": 0}  # bodies sent (GET and HEAD)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, path: str | os.PathLike) -> str:
        """Serve one more file (by its name and sha256); returns its URL by sha256."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"package {p} does not exist")
        self.index.extra[p.name] = p
        return self.url_for(p)

    def url_for(self, path: str | os.PathLike) -> str:
        return f"{self.url}/packages/sha256/{self.index.sha256(Path(path))}"

    def _count(self, key: str) -> None:
        with self._cut_lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def cut_next(self, after_bytes: int, responses: int = 1) -> None:
        """Fault injection: the next ``responses`` bodies from byte 0 stop after ``after_bytes`` (connection closed)."""
        with self._cut_lock:
            self._cuts.extend([int(after_bytes)] * responses)

    def _take_cut(self) -> int | None:
        with self._cut_lock:
            return self._cuts.pop(0) if self._cuts else None

    def start(self) -> "PackageServer":
        if self._httpd is not None:
            return self
        try:
            httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        except OSError as exc:
            raise TransportError(f"cannot serve packages on {self.host}:{self.port}: {exc.strerror or exc}") from exc
        httpd.daemon_threads = True
        httpd.index = self.index  # type: ignore[attr-defined]
        httpd.limit_bps = self.limit_bps  # type: ignore[attr-defined]
        httpd.owner = self  # type: ignore[attr-defined]
        httpd.stopping = self._stopping  # type: ignore[attr-defined]
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgeship-package-server", daemon=True)
        self._thread.start()
        log.info("serving packages from %s at %s", self.directory, self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._httpd = None
        self._thread = None
        self._stopping.clear()

    def __enter__(self) -> "PackageServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
