"""A numeric source read and parsed in a child process (``[[sources]] reader = "process"``).

Why: parsing text numbers is the one CPU-heavy step of a sensor stream, and
NumPy's text parser holds the GIL for all of it (~60 ns a number here, about
4 us per 64-feature row). In the agent's process that time is taken from the
batcher and the sinks, whatever the core count. A child process parses on
another core and hands over finished float arrays, so the agent's process only
copies bytes off a pipe (which releases the GIL) while the child parses the
next block.

Cost: one more Python process with NumPy (~30 MB RSS, ~0.2 s to start), so
it is off by default; turn it on for fast streams on a multi-core board
(a Raspberry Pi 4/5 has 4 cores). Only numeric line sources (``jsonl``,
``csv``, ``stream``) on a path qualify: stdin stays with the agent's process,
and decoding sources (``folder``, ``camera``) already decode in the prefetch
workers.

The child runs the very same source class (``python -m
edgeship.agent.procsource``) and writes length-prefixed frames to its stdout:
a pickled :class:`RawBlock` per block, then an end or an error frame. The
pipe is the bound: when the agent falls behind the child blocks on write
(back-pressure, nothing dropped). The child exits when the pipe closes, when
its parent goes away, or on SIGTERM from :meth:`ProcessSource.close`.
Pickle is safe here: both ends are this package, over a private pipe.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from ..errors import ConfigError, InputError
from .sources import RawBlock, Source, make_source

__all__ = ["ProcessSource", "SourceProcessError"]

_HEADER = struct.Struct("<cI")  # kind (b"B" block, b"E" end, b"X" error), payload length
_MAX_FRAME = 256 << 20
_PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size for unprivileged processes


class SourceProcessError(InputError):
    """The child process of a ``reader = "process"`` source failed; the prefetcher restarts it."""


class ProcessSource(Source):
    """Runs ``make_source(kind, source_id, **options)`` in a child process; same interface."""

    def __init__(self, kind: str, source_id: str, options: dict | None = None, *, block_size: int = 256) -> None:
        super().__init__(source_id)
        options = dict(options or {})
        inner = make_source(kind, source_id, **options)  # validates the options here, in the agent
        if inner.decodes:
            raise ConfigError(f"[[sources]] reader: 'process' is for numeric sources (jsonl, csv, stream); "
                              f"{source_id!r} is a {kind} source, which decodes in the prefetch workers already")
        if options.get("path", "-") in ("-", "", None):
            raise ConfigError(f"[[sources]] reader: 'process' needs a path; source {source_id!r} reads stdin, "
                              "which stays with the agent's process (use reader = \"thread\")")
        self.kind = kind  # the inner source's kind: what the child runs
        self.options = options
        self.block_size = int(block_size)
        self._proc: subprocess.Popen | None = None
        self._fd: int | None = None
        self._buf = bytearray()
        self._pending: RawBlock | None = None

    # -- lifecycle -------------------------------------------------------------
    def open(self) -> None:
        super().open()
        self.close()
        # The child reads bigger blocks than the agent takes (fewer frames); read() splits them.
        spec = json.dumps({"kind": self.kind, "id": self.id, "options": self.options,
                           "block_size": max(self.block_size, 1024), "parent": os.getpid()})
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "edgeship.agent.procsource", spec],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=None,
                                          close_fds=True)
        except OSError as exc:
            raise SourceProcessError(f"source {self.id!r}: cannot start its reader process: {exc}") from exc
        self._fd = self._proc.stdout.fileno()
        # A bigger pipe lets the child parse a few blocks ahead instead of waiting
        # for every read (the default 64 KiB is a quarter of one block of floats).
        try:
            import fcntl  # noqa: PLC0415 - Linux only; elsewhere the default size stays

            fcntl.fcntl(self._fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
        except (ImportError, OSError):
            pass
        self._buf = bytearray()
        self._pending = None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        self._fd = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2.0)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- reading ---------------------------------------------------------------
    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        if self._pending is not None:
            return self._take(self._pending, max_n)
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is not None:
                return self._handle(frame, max_n)
            if self.exhausted:
                return None
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                return None

    def _fill(self, timeout: float) -> bool:
        """Read what the child has written (waiting at most ``timeout``); False when nothing came."""
        fd = self._fd
        if fd is None:
            raise SourceProcessError(f"source {self.id!r} is not open")
        r, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not r:
            return False
        data = os.read(fd, 1 << 20)
        if not data:
            code = self._proc.wait(2.0) if self._proc is not None else None
            raise SourceProcessError(f"source {self.id!r}: its reader process ended without a word "
                                     f"(exit code {code}); see the log above")
        self._buf += data
        return True

    def _frame(self) -> tuple[bytes, bytes] | None:
        buf = self._buf
        if len(buf) < _HEADER.size:
            return None
        kind, length = _HEADER.unpack_from(buf)
        if length > _MAX_FRAME:
            raise SourceProcessError(f"source {self.id!r}: garbled frame from its reader process ({length} bytes)")
        end = _HEADER.size + length
        if len(buf) < end:
            return None
        payload = bytes(buf[_HEADER.size:end])
        del buf[:end]
        return kind, payload

    def _handle(self, frame: tuple[bytes, bytes], max_n: int) -> RawBlock | None:
        kind, payload = frame
        if kind == b"E":
            self.exhausted = True
            return None
        if kind == b"X":
            raise SourceProcessError(f"source {self.id!r}: {payload.decode('utf-8', 'replace')}")
        return self._take(pickle.loads(payload), max_n)

    def _take(self, block: RawBlock, max_n: int) -> RawBlock:
        """At most ``max_n`` rows; the rest waits for the next read (a child's block may be larger)."""
        self._pending = None
        if block.data is None or len(block.data) <= max_n:
            return block
        ts, refs = block.ts, block.refs
        per_row_ts = hasattr(ts, "__len__")
        self._pending = RawBlock(data=block.data[max_n:], ts=ts[max_n:] if per_row_ts else ts,
                                 refs=refs[max_n:] if refs is not None else None)
        return RawBlock(data=block.data[:max_n], ts=ts[:max_n] if per_row_ts else ts,
                        refs=refs[:max_n] if refs is not None else None, errors=block.errors)


# -- the child ------------------------------------------------------------------------

def _write(out, kind: bytes, payload: bytes) -> None:
    out.write(_HEADER.pack(kind, len(payload)))
    out.write(payload)
    out.flush()


def _child(spec: dict[str, Any]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops us; a Ctrl-C goes to it first
    out = os.fdopen(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
    parent = int(spec.get("parent") or 0)
    try:
        src = make_source(spec["kind"], spec["id"], **spec["options"])
        src.open()
        n = int(spec["block_size"])
        while True:
            block = src.read(n, 0.2)
            if block is not None and len(block) + len(block.errors) > 0:
                _write(out, b"B", pickle.dumps(block, protocol=pickle.HIGHEST_PROTOCOL))
            if src.exhausted:
                _write(out, b"E", b"")
                return 0
            if parent and os.getppid() != parent:
                return 0  # the agent is gone: nobody reads us any more
    except BrokenPipeError:
        return 0
    except Exception as exc:  # sent to the agent, which counts it and restarts the source
        try:
            _write(out, b"X", f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:2000])
        except BrokenPipeError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
