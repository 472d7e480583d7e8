"""Prefetch: a bounded read-ahead stage per source, so the runner never waits on I/O.

Per source, a :class:`Prefetcher` owns one reader thread and ``workers``
preparing threads:

    source.read() ─► reader ─► bounded queue (read_ahead samples) ─► worker(s):
                                        decode → preprocess → validate → batcher.put

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

import logging
import queue
import threading
import time
from typing import Callable

from ..errors import EdgeshipError, OverloadError
from .sources import RawBlock, Source

__all__ = ["Prefetcher", "backoff_delay"]

log = logging.getLogger("edgeship.agent.prefetch")

_END = object()


def backoff_delay(attempt: int, base_s: float = 0.1, cap_s: float = 10.0) -> float:
    """Seconds to wait before restart ``attempt`` (0-based): base * 2**attempt, capped."""
    return min(cap_s, base_s * (2 ** max(0, attempt)))


class Prefetcher:
    """Reads, prepares and queues one source's samples in its own threads."""

    def __init__(self, source: Source, prepare: Callable[[RawBlock, Source], tuple], put: Callable,
                 *, block_size: int = 256, read_ahead: int = 1024, workers: int = 1, restart: bool = True,
                 max_restarts: int = 10, backoff_base_s: float = 0.1, backoff_cap_s: float = 10.0,
                 read_timeout_s: float = 0.2, stall_s: float = 10.0,
                 on_reject: Callable[[str, list], None] | None = None) -> None:
        self.source = source
        self.prepare = prepare
        self.put = put
        self.block_size = block_size
        self.workers = workers
        self.restart = restart
        self.max_restarts = max_restarts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.read_timeout_s = read_timeout_s
        self.stall_s = stall_s
        self.on_reject = on_reject
        self._q: queue.Queue = queue.Queue(maxsize=max(1, read_ahead // max(1, block_size)))
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
                "last_error": self.last_error, "queued_blocks": self._q.qsize()}

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
                    self._in_read_since = time.monotonic()
                    block = src.read(self.block_size, self.read_timeout_s)
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
                    while not self._stop.is_set():
                        try:
                            self._q.put(block, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                if src.exhausted:
                    self.state = "done"
                    break
        finally:
            if self.state == "running":
                self.state = "stopped" if self._stop.is_set() else "done"
            for _ in range(self.workers):
                # The workers must see the end even when the queue is full: wait, but never past stop.
                while True:
                    try:
                        self._q.put(_END, timeout=0.2)
                        break
                    except queue.Full:
                        if self._stop.is_set():
                            break

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
                try:
                    work, rejects = self.prepare(block, src)
                except Exception as exc:  # one bad block must not stop the stream
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    n = len(block) + len(block.errors)
                    self.rejected += n
                    if self.on_reject is not None:
                        self.on_reject(src.id, [(None, self.last_error)] * n)
                    if not isinstance(exc, EdgeshipError):
                        log.exception("source %s: preparing a block failed", src.id)
                    continue
                if rejects:
                    with self._lock:
                        self.rejected += len(rejects)
                    if self.on_reject is not None:
                        self.on_reject(src.id, rejects)
                if work is None:
                    continue
                n = work.n
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
