"""Prefetch: a bounded read-ahead stage per source, so the runner never waits on I/O.

Per source, a :class:`Prefetcher` owns one reader thread and ``workers``
preparing threads:

    source.read() ─► reader ─► bounded queue (read_ahead samples, read_ahead_bytes) ─► worker(s):
                                        decode → preprocess → validate → batcher.put

Block size (``block_size = 0``, the default: "auto"). A block is the unit a
worker decodes before anything of it reaches the model, so a fixed 256 made
one worker decode 256 JPEGs (150 MB of float32 rows) before the first batch,
while the other worker idled. Auto sizing (:func:`auto_block_size`, pure)
reads one sample first (the first result comes as soon as one sample is
ready), then sizes blocks from what the workers measured per sample: at most
``BLOCK_TARGET_BYTES`` of prepared rows and ``BLOCK_TARGET_S`` of preparing
per block, at most ``BLOCK_CAP`` samples. Sensor rows (hundreds of bytes,
microseconds) get 256-row blocks as before; 224x224 images get a few per
block, so every worker has work and the batcher fills early. ``workers = 0``
(auto) gives decoding sources (folder, camera) two workers and numeric ones one.

``prepare(raw_block)`` (given by the agent, which knows the model) turns a
raw block into a :class:`~edgeship.agent.batcher.Work` plus the rows it
rejected; the worker puts the work into the batcher, waiting for room under
the ``block`` policy (back-pressure reaches the source) but never past
``stop``. With more than one worker, blocks may reach the batcher out of
order (results still carry their source reference).

A source that raises is closed, and re-opened after an exponential backoff
(:func:`backoff_delay`, pure) up to ``max_restarts`` consecutive failures;
other sources never notice. A source stuck inside ``read`` cannot be
interrupted (Python threads cannot be killed): it is reported as
``stalled`` in the agent's health and its thread is abandoned at stop.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Callable

from ..errors import EdgeshipError, OverloadError
from .sources import RawBlock, Source

__all__ = ["Prefetcher", "backoff_delay", "auto_block_size", "auto_workers", "block_nbytes"]

log = logging.getLogger("edgeship.agent.prefetch")

_END = object()


BLOCK_CAP = 256                 # the former fixed default: numeric streams keep their big blocks
BLOCK_TARGET_BYTES = 2 << 20    # prepared rows per block
BLOCK_TARGET_S = 0.02           # preparing time per block (one worker)


def auto_block_size(sample_bytes: float | None, sample_s: float | None, *, cap: int = BLOCK_CAP,
                    target_bytes: int = BLOCK_TARGET_BYTES, target_s: float = BLOCK_TARGET_S) -> int:
    """Samples per source block from measured per-sample figures (None = nothing measured yet: 1)."""
    if sample_bytes is None or sample_s is None:
        return 1
    n = min(cap, target_bytes / max(sample_bytes, 1.0))
    if sample_s > 0:
        n = min(n, target_s / sample_s)
    return max(1, int(n))


def auto_workers(source: Source, cores: int | None = None) -> int:
    """Preparing threads for ``workers = 0``: two for decoding sources (images, frames), else one."""
    if not source.decodes:
        return 1
    return max(1, min(2, cores if cores is not None else (os.cpu_count() or 1)))


def block_nbytes(block: RawBlock) -> int:
    """Bytes a raw block holds in the read-ahead queue (arrays counted; paths as their length)."""
    if block.data is not None:
        return int(block.data.nbytes)
    total = 0
    for it in block.items or ():
        total += int(getattr(it, "nbytes", 0)) or len(str(it))
    return total


class _BlockQueue:
    """A FIFO of raw blocks bounded by samples and by bytes; a block alone may exceed both (no deadlock)."""

    def __init__(self, max_samples: int, max_bytes: int) -> None:
        self.max_samples, self.max_bytes = max(1, max_samples), max(1, max_bytes)
        self._items: collections.deque = collections.deque()
        self.samples = 0
        self.nbytes = 0
        self._cond = threading.Condition()

    def put(self, block, timeout: float, n: int = 0, nbytes: int = 0) -> bool:
        """Add ``block`` (``n`` samples, ``nbytes``); False when there was no room within ``timeout``."""
        with self._cond:
            def room():
                return not self._items or (self.samples + n <= self.max_samples and self.nbytes + nbytes <= self.max_bytes)
            if not self._cond.wait_for(room, timeout):
                return False
            self._items.append((block, n, nbytes))
            self.samples += n
            self.nbytes += nbytes
            self._cond.notify_all()
            return True

    def put_end(self, block) -> None:
        """The end marker goes in regardless of the bounds (it holds nothing)."""
        with self._cond:
            self._items.append((block, 0, 0))
            self._cond.notify_all()

    def get(self, timeout: float):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout):
                raise queue.Empty
            block, n, nbytes = self._items.popleft()
            self.samples -= n
            self.nbytes -= nbytes
            self._cond.notify_all()
            return block

    def qsize(self) -> int:
        return len(self._items)


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 10.0) -> float:
    """Seconds to wait before restart ``attempt`` (0-based): base * 2**attempt, capped."""
    return min(cap_s, base_s * (2 ** max(0, attempt)))


class Prefetcher:
    """Reads, prepares and queues one source's samples in its own threads."""

    def __init__(self, source: Source, prepare: Callable[[RawBlock, Source], tuple], put: Callable,
                 *, block_size: int = 0, read_ahead: int = 1024, workers: int = 0, restart: bool = True,
                 max_restarts: int = 10, backoff_base_s: float = 0.1, backoff_cap_s: float = 10.0,
                 read_timeout_s: float = 0.2, stall_s: float = 10.0,
                 on_reject: Callable[[str, list], None] | None = None,
                 read_ahead_bytes: int = 16 << 20) -> None:
        self.source = source
        self.prepare = prepare
        self.put = put
        self.block_size = block_size  # 0 = auto (see the module docstring)
        self.workers = workers or auto_workers(source)
        self.restart = restart
        self.max_restarts = max_restarts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.read_timeout_s = read_timeout_s
        self.stall_s = stall_s
        self.on_reject = on_reject
        self._q = _BlockQueue(read_ahead, read_ahead_bytes)
        # Per-sample figures the workers measured (EWMA), for auto block sizing.
        self.sample_bytes: float | None = None
        self.sample_s: float | None = None
        self.samples_read = 0
        self._measured = threading.Event()  # set once a worker prepared its first block (or failed to)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.state = "new"       # new | running | restarting | failed | done | stopped
        self.restarts = 0
        self.errors = 0
        self.samples = 0
        self.rejected = 0
        self.last_error: str | None = None
        self._in_read_since: float | None = None
        self._workers_left = 0
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Prefetcher":
        if self._threads:
            raise RuntimeError("Prefetcher already started")
        sid = self.source.id
        self._workers_left = self.workers
        self._threads.append(threading.Thread(target=self._read_loop, name=f"edgeship-src-{sid}", daemon=True))
        for i in range(self.workers):
            self._threads.append(threading.Thread(target=self._work_loop, name=f"edgeship-prep-{sid}-{i}", daemon=True))
        self.state = "running"
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop reading; True when every thread ended in time (False: a stalled source was left behind)."""
        self._stop.set()
        try:
            self.source.close()  # unblocks sources that wait on their own events or descriptors
        except Exception as exc:
            log.warning("source %s: close failed: %s", self.source.id, exc)
        deadline = time.monotonic() + timeout
        ok = True
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            ok = ok and not t.is_alive()
        if self.state not in ("failed", "done"):
            self.state = "stopped"
        return ok

    @property
    def finished(self) -> bool:
        """The source ended (or failed for good) and every read block was handed on."""
        return self.state in ("done", "failed") and self._workers_left == 0

    def health(self) -> dict:
        state = self.state
        since = self._in_read_since
        if state == "running" and since is not None and time.monotonic() - since > self.stall_s:
            state = "stalled"
        return {"id": self.source.id, "type": self.source.kind, "state": state, "samples": self.samples,
                "rejected": self.rejected, "errors": self.errors, "restarts": self.restarts,
                "last_error": self.last_error, "queued_blocks": self._q.qsize(), "queued_bytes": self._q.nbytes,
                "block_size": self.current_block_size()}

    def current_block_size(self) -> int:
        """The block size the next read asks for (the configured one, or the auto choice)."""
        if self.block_size:
            return self.block_size
        return auto_block_size(self.sample_bytes, self.sample_s)

    def _observe(self, n: int, nbytes: int, seconds: float) -> None:
        """A worker prepared ``n`` samples of ``nbytes`` in ``seconds``: update the per-sample EWMAs."""
        if n <= 0:
            return
        b, t = nbytes / n, seconds / n
        with self._lock:
            if self.sample_bytes is None:
                self.sample_bytes, self.sample_s = b, t
            else:
                self.sample_bytes = 0.7 * self.sample_bytes + 0.3 * b
                self.sample_s = 0.7 * self.sample_s + 0.3 * t
        self._measured.set()

    # -- threads --------------------------------------------------------------
    def _fail_once(self, exc: BaseException, attempt: int) -> bool:
        """Record a source failure; True when it should be restarted after the backoff."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        try:
            self.source.close()
        except Exception:  # closing a broken source may fail too; it is being replaced anyway
            pass
        if not self.restart or attempt >= self.max_restarts:
            log.error("source %s failed for good after %d restarts: %s", self.source.id, attempt, self.last_error)
            self.state = "failed"
            return False
        delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s)
        log.warning("source %s failed (%s); restarting in %.1f s", self.source.id, self.last_error, delay)
        self.state = "restarting"
        return not self._stop.wait(delay)

    def _read_loop(self) -> None:
        src = self.source
        attempt = 0
        opened = False
        try:
            while not self._stop.is_set():
                try:
                    if not opened:
                        src.open()
                        opened = True
                        self.state = "running"
                    if not self.block_size and self.samples_read and not self._measured.is_set():
                        # Auto size: the first block (one sample) is being prepared; its figures size
                        # the next blocks. Reading on now would queue one-sample blocks meanwhile.
                        self._measured.wait(0.5)
                    self._in_read_since = time.monotonic()
                    block = src.read(self.current_block_size(), self.read_timeout_s)
                    self._in_read_since = None
                except Exception as exc:
                    self._in_read_since = None
                    if self._stop.is_set():
                        break
                    opened = False
                    if not self._fail_once(exc, attempt):
                        break
                    attempt += 1
                    self.restarts += 1
                    continue
                if block is not None and len(block) + len(block.errors) > 0:
                    attempt = 0  # a good read resets the backoff
                    n, nbytes = len(block), block_nbytes(block)
                    self.samples_read += n
                    while not self._stop.is_set():
                        if self._q.put(block, 0.2, n, nbytes):
                            break
                if src.exhausted:
                    self.state = "done"
                    break
        finally:
            if self.state == "running":
                self.state = "stopped" if self._stop.is_set() else "done"
            for _ in range(self.workers):
                self._q.put_end(_END)  # after every block: the workers see the end once the data is handed on

    def _work_loop(self) -> None:
        src = self.source
        try:
            while True:
                try:
                    block = self._q.get(timeout=0.2)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                if block is _END:
                    return
                t_prep = time.perf_counter()
                try:
                    work, rejects = self.prepare(block, src)
                    if work is None:
                        self._measured.set()  # nothing to measure in this block; do not hold the reader
                except Exception as exc:  # one bad block must not stop the stream
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    n = len(block) + len(block.errors)
                    self.rejected += n
                    if self.on_reject is not None:
                        self.on_reject(src.id, [(None, self.last_error)] * n)
                    if not isinstance(exc, EdgeshipError):
                        log.exception("source %s: preparing a block failed", src.id)
                    self._measured.set()
                    continue
                if rejects:
                    with self._lock:
                        self.rejected += len(rejects)
                    if self.on_reject is not None:
                        self.on_reject(src.id, rejects)
                if work is None:
                    continue
                n = work.n
                self._observe(n, sum(int(x.nbytes) for x in work.xs), time.perf_counter() - t_prep)
                try:
                    self.put(work, self._stop)
                except OverloadError:
                    # Counted by the batcher policy (rejected/dropped); the stream goes on.
                    continue
                with self._lock:
                    self.samples += n
        finally:
            with self._lock:
                self._workers_left -= 1
