"""Micro-batching: a pure policy, a packer, and the thread that drives them.

Three layers, so the decisions can be tested without threads or models:

* :class:`BatchPolicy` (pure; time is passed in): the bounded pending queue,
  when to flush (``max_batch`` reached, ``max_delay`` elapsed for the oldest
  request, or the earliest deadline would be missed if we waited longer),
  what to take, and the overload policy when the queue is full:

  - ``block``: the producer waits (bounded by ``block_timeout``) for room,
    then is rejected;
  - ``drop_oldest``: the oldest pending samples are evicted to make room;
  - ``reject``: the new request is refused at once.

  Every sample is counted exactly once as ``accepted`` and later either
  taken (run) or ``dropped``; refused ones are counted as ``rejected``.

* :class:`Packer` (numpy only): copies the taken segments into preallocated
  batch buffers (one slice copy per request or per source *block*, never a
  Python call per sample), pads or splits to the batch the model accepts,
  runs models without a batch axis one by one, and hands back outputs whose
  row ``i`` belongs to packed sample ``i`` (order kept).

* :class:`MicroBatcher`: owns the batcher thread; producers call ``put``;
  the thread waits (``Condition.wait(timeout)``) for the policy's flush time,
  takes a batch and calls ``process(segments)``. ``process`` is where the
  agent reads its *current* runner, so a model swap happens between batches.

  ``process`` may return a *finish* step (a callable): the delivery of the
  batch's results (futures, sinks, hooks, metrics). When the model call
  takes clearly longer than that (``BatchPolicy.pipeline_pays``, measured), the
  thread hands it to a delivery thread (a bounded FIFO, so results leave in
  batch order) and starts the next batch's model call at once: the model
  call (which releases the GIL) hides the delivery. Measured with a small
  CNN and 4 client threads, the model went from busy 75 % of the time to
  ~90 %. Otherwise the thread delivers itself, as one extra hand-off and a
  second Python thread cost more than a short model call can hide.

  One batch runs at a time, whoever runs it: the "runner" token (``busy``)
  is taken under the lock. A request put with ``inline=True`` (the API path)
  that finds the runner free, nothing else queued, no overlap between
  requests lately and its batch due *now* (``next_flush == 0``) runs on the
  caller's own thread. That saves the two thread hand-offs (wake the batcher,
  wake the caller), which cost about as much as a small model's call on a
  Pi-class CPU. Under concurrent load the requests queue as usual and the
  batcher thread batches them.

A unit of work is a :class:`Work`: one API request (n = 1) or one block of
samples read by a source (n up to the source's block size), sharing a
timestamp, a source id and an optional deadline. Blocks keep the sensor path
free of per-sample objects: a block is split across batches by moving its
``start`` offset.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..errors import InputError, OverloadError

__all__ = ["Work", "Segment", "Offer", "BatchPolicy", "Packer", "MicroBatcher",
           "ACCEPTED", "REJECTED", "WAIT"]

log = logging.getLogger("edgeship.agent.batcher")

ACCEPTED, REJECTED, WAIT = "accepted", "rejected", "wait"
_seq = itertools.count  # one counter per policy instance (see BatchPolicy.__init__)


class Work:
    """One request or one source block: ``xs`` holds one array per model input, rows = samples."""

    __slots__ = ("xs", "n", "start", "t_in", "deadline", "source", "ts", "future", "keys", "done",
                 "dropped", "seq", "extra", "group", "stream", "row_bytes")

    def __init__(self, xs: Sequence[np.ndarray], n: int, *, t_in: float, deadline: float | None = None,
                 source: str = "api", ts: float | np.ndarray | None = None, future=None, keys=None,
                 extra=None, group=None, stream=None) -> None:
        self.xs = xs
        self.n = n
        self.start = 0          # rows before this were taken or dropped
        self.t_in = t_in        # monotonic time the work entered the agent
        self.deadline = deadline  # monotonic, or None
        self.source = source
        self.ts = time.time() if ts is None else ts  # wall clock for results
        self.future = future    # concurrent.futures.Future for API requests, None for source blocks
        self.keys = keys        # cache keys per row, or None
        self.done = False
        self.dropped = 0
        self.seq = 0
        self.extra = extra
        self.row_bytes = 0.0    # bytes one row holds (set at admission, for the queue's byte bound)
        # Only work of one group shares a batch (sample sizes, scalar inputs), and a stream of a
        # stateful model has at most one row per batch: its next row needs this row's state.
        self.group = group
        self.stream = stream

    @property
    def keyed(self) -> bool:
        return self.group is not None or self.stream is not None

    @property
    def remaining(self) -> int:
        return self.n - self.start


class Segment(NamedTuple):
    """Rows ``[start, start + count)`` of ``work`` packed into the batch at ``pos``.

    A NamedTuple, not a dataclass: one is made per request per batch, and
    tuple construction is several times cheaper.
    """

    work: Work
    start: int
    count: int
    pos: int


@dataclass(frozen=True)
class Offer:
    decision: str                        # ACCEPTED | REJECTED | WAIT
    evicted: tuple = ()                  # ((work, n_rows_dropped), ...) under drop_oldest
    reason: str = ""


class BatchPolicy:
    """Pure micro-batching policy. Times are ``time.monotonic()`` seconds passed in by the caller."""

    def __init__(self, max_batch: int = 32, max_delay_s: float = 0.002, queue_size: int = 4096,
                 overload: str = "block", margin_s: float = 0.001, max_bytes: int = 0) -> None:
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be >= 1")
        if overload not in ("block", "drop_oldest", "reject"):
            raise ValueError(f"unknown overload policy {overload!r}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.overload = overload
        self.margin_s = margin_s
        self.items: deque[Work] = deque()
        self.pending = 0  # samples waiting
        # Bytes of the samples waiting, bounded by max_bytes (0 = no bound) besides queue_size: a
        # queue of 4096 preprocessed 224x224 images is 2.4 GB. Work that alone exceeds the bound
        # is still admitted into an empty queue (else it could never run).
        self.max_bytes = max_bytes
        self.pending_bytes = 0.0
        self._deadlines: list[tuple[float, int, Work]] = []  # heap, lazily cleaned
        self._seq = _seq()
        self.est_run_s = 0.0  # EWMA of one batch's run time, learnt from observe_run
        self.est_finish_s = 0.0  # EWMA of one batch's delivery time, learnt from observe_finish
        self.keyed = 0  # pending works with a group or stream: take() then picks compatible ones
        self.counts = {"accepted": 0, "taken": 0, "dropped": 0, "rejected": 0, "batches": 0,
                       "flush_full": 0, "flush_delay": 0, "flush_deadline": 0, "flush_drain": 0}

    # -- admission ------------------------------------------------------------
    def offer(self, work: Work, now: float) -> Offer:
        """Admit ``work`` if the queue has room; otherwise apply the overload policy."""
        n = work.remaining
        if n <= 0:
            return Offer(ACCEPTED)
        xs = work.xs  # the API path offers one row at a time: no generator for the common single input
        nb = xs[0].nbytes if len(xs) == 1 else sum(x.nbytes for x in xs)
        work.row_bytes = nb / work.n if work.n > 1 else nb
        if self.max_bytes and self.pending and self.pending_bytes + n * work.row_bytes > self.max_bytes:
            over = self._over_bytes(work, n)
            if over is not None:
                return over
        free = self.queue_size - self.pending
        evicted: list[tuple[Work, int]] = []
        if n > free:
            if n > self.queue_size:
                # Can never fit: no policy can help, refuse with a reason.
                self.counts["rejected"] += n
                return Offer(REJECTED, reason=f"{n} samples exceed the whole queue ({self.queue_size})")
            if self.overload == "reject":
                self.counts["rejected"] += n
                return Offer(REJECTED, reason=f"queue full ({self.pending}/{self.queue_size} samples)")
            if self.overload == "block":
                return Offer(WAIT, reason=f"queue full ({self.pending}/{self.queue_size} samples)")
            need = n - free
            while need > 0:
                old = self.items[0]
                k = min(need, old.remaining)
                old.start += k
                old.dropped += k
                self.pending -= k
                self.pending_bytes -= k * old.row_bytes
                need -= k
                self.counts["dropped"] += k
                evicted.append((old, k))
                if old.remaining == 0:
                    old.done = True
                    self.keyed -= old.keyed
                    self.items.popleft()
        self._admit(work, n)
        return Offer(ACCEPTED, tuple(evicted))

    def _over_bytes(self, work: Work, n: int) -> Offer | None:
        """The byte bound is hit: the overload policy decides (None = room was made, admit)."""
        reason = f"queue full ({self.pending_bytes / 1e6:.1f}/{self.max_bytes / 1e6:.1f} MB in flight)"
        if self.overload == "reject":
            self.counts["rejected"] += n
            return Offer(REJECTED, reason=reason)
        if self.overload == "block":
            return Offer(WAIT, reason=reason)
        evicted = []
        while self.items and self.pending_bytes + n * work.row_bytes > self.max_bytes:
            old = self.items.popleft()  # drop_oldest: whole pieces of work until the new one fits
            k = old.remaining
            old.start += k
            old.dropped += k
            old.done = True
            self.keyed -= old.keyed
            self.pending -= k
            self.pending_bytes -= k * old.row_bytes
            self.counts["dropped"] += k
            evicted.append((old, k))
        self._admit(work, n)
        return Offer(ACCEPTED, tuple(evicted))

    def _admit(self, work: Work, n: int) -> None:
        work.seq = next(self._seq)
        self.keyed += work.keyed
        self.items.append(work)
        self.pending_bytes += n * work.row_bytes
        self.pending += n
        self.counts["accepted"] += n
        if work.deadline is not None:
            heapq.heappush(self._deadlines, (work.deadline, work.seq, work))

    def refuse(self, work: Work) -> None:
        """Count a producer that gave up waiting under ``block`` (its timeout elapsed)."""
        self.counts["rejected"] += work.remaining

    # -- flushing -------------------------------------------------------------
    def _earliest_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def next_flush(self, now: float) -> float | None:
        """Seconds to wait before flushing (0 = flush now); None when nothing is pending."""
        if self.pending == 0:
            return None
        if self.pending >= self.max_batch:
            return 0.0
        wait = self.items[0].t_in + self.max_delay_s - now
        dl = self._earliest_deadline()
        if dl is not None:
            # Flush early so the run itself still fits before the deadline.
            wait = min(wait, dl - self.est_run_s - self.margin_s - now)
        return max(0.0, wait)

    def flush_reason(self, now: float) -> str:
        if self.pending >= self.max_batch:
            return "flush_full"
        dl = self._earliest_deadline()
        if dl is not None and dl - self.est_run_s - self.margin_s - now <= 0 and \
                self.items[0].t_in + self.max_delay_s > now:
            return "flush_deadline"
        return "flush_delay"

    def take(self, now: float, reason: str | None = None) -> list[Segment]:
        """Pop up to ``max_batch`` samples in arrival order (splitting a block if needed)."""
        if self.pending == 0:
            return []
        self.counts[reason or self.flush_reason(now)] += 1
        if self.keyed:
            return self._take_compatible()
        out: list[Segment] = []
        pos = 0
        items = self.items
        while items and pos < self.max_batch:
            w = items[0]
            k = min(w.remaining, self.max_batch - pos)
            pos = self._cut(w, k, pos, out)
            if w.remaining == 0:
                w.done = True
                items.popleft()
        return self._taken(out, pos)

    def _cut(self, w: Work, k: int, pos: int, out: list[Segment]) -> int:
        """Take ``k`` rows of ``w`` into the batch at row ``pos``; returns the next free row."""
        out.append(Segment(w, w.start, k, pos))
        w.start += k
        self.pending_bytes -= k * w.row_bytes
        return pos + k

    def _taken(self, out: list[Segment], pos: int) -> list[Segment]:
        self.pending -= pos
        if self.pending == 0:
            self.pending_bytes = 0.0  # no float drift across millions of blocks
        self.counts["taken"] += pos
        self.counts["batches"] += 1
        return out

    def _take_compatible(self) -> list[Segment]:
        """``take`` when some work is keyed: the oldest work's group, at most one row per stream.

        Works left behind keep their order (a later batch takes them); the
        oldest work is always taken, so nothing starves.
        """
        out: list[Segment] = []
        pos = 0
        items = self.items
        group = items[0].group
        streams: set = set()
        skipped: list[Work] = []
        while items and pos < self.max_batch:
            w = items.popleft()
            if w.group != group or (w.stream is not None and w.stream in streams):
                skipped.append(w)
                continue
            k = min(w.remaining, self.max_batch - pos)
            if w.stream is not None:
                k = 1
                streams.add(w.stream)
            pos = self._cut(w, k, pos, out)
            if w.remaining == 0:
                w.done = True
                self.keyed -= w.keyed
            else:
                skipped.append(w)
        items.extendleft(reversed(skipped))
        return self._taken(out, pos)

    def drain_all(self) -> list[Work]:
        """Remove everything pending (on shutdown); the caller fails their futures."""
        left = list(self.items)
        for w in left:
            self.counts["dropped"] += w.remaining
            w.dropped += w.remaining
            w.start = w.n
            w.done = True
        self.items.clear()
        self._deadlines.clear()
        self.pending = 0
        self.keyed = 0
        self.pending_bytes = 0.0
        return left

    def observe_run(self, seconds: float) -> None:
        """Learn how long a batch takes (EWMA), for deadline-aware flushing."""
        self.est_run_s = seconds if self.est_run_s == 0.0 else 0.8 * self.est_run_s + 0.2 * seconds

    def observe_finish(self, seconds: float) -> None:
        """Learn how long delivering a batch's results takes (EWMA)."""
        self.est_finish_s = seconds if self.est_finish_s == 0.0 else 0.8 * self.est_finish_s + 0.2 * seconds

    def pipeline_pays(self) -> bool:
        """Hand a batch's delivery to the delivery thread only when the model call clearly dominates.

        Then the next model call (which releases the GIL) hides the delivery:
        a small CNN with 4 API clients went from 25 % over the raw model time to
        ~5 %. When delivery dominates (a sensor MLP writing 64 JSON lines per
        50 us model call), the overlap saves little and the hand-off and a
        second Python thread's GIL traffic cost more (3-5 % slower, measured).
        """
        return self.est_run_s > 2.0 * self.est_finish_s  # 2x: no flapping where both are close


class Packer:
    """Preallocated batch buffers for one model signature; pads/splits/one-by-one runs.

    ``sample_shapes``/``dtypes``: per model input, the shape of one sample
    (without the batch axis) and its dtype. ``model_batch``: None = the model
    takes any batch; an int k = exactly k rows per call (padded); 0 = the
    model has no batch axis (one call per sample, rows fed without a batch dim).
    """

    def __init__(self, sample_shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype], max_batch: int,
                 model_batch: int | None = None) -> None:
        self.sample_shapes = [tuple(s) for s in sample_shapes]
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.model_batch = model_batch
        cap = max_batch
        if model_batch:
            cap = max(max_batch, model_batch)
            cap = -(-cap // model_batch) * model_batch  # whole model batches
        self.capacity = cap
        self.buffers = [np.zeros((cap, *s), dtype=d) for s, d in zip(self.sample_shapes, self.dtypes)]

    def pack(self, segments: Sequence[Segment]) -> int:
        """Copy the segments' rows into the buffers; returns the number of rows."""
        n = 0
        bufs = self.buffers
        for seg in segments:
            w = seg.work
            a, b = seg.start, seg.start + seg.count
            for buf, x in zip(bufs, w.xs):
                buf[seg.pos:seg.pos + seg.count] = x[a:b]
            n = seg.pos + seg.count
        return n

    def run(self, run_fn: Callable[[list[np.ndarray]], list[np.ndarray]], n: int) -> list[np.ndarray]:
        """Run rows ``[0, n)`` of the buffers; outputs have exactly ``n`` rows, in order."""
        bufs = self.buffers
        mb = self.model_batch
        if mb is None:
            return run_fn([b[:n] for b in bufs])
        if mb == 0:  # no batch axis: one call per sample, then stack
            outs = [run_fn([b[i] for b in bufs]) for i in range(n)]
            return [np.stack([o[j] for o in outs]) for j in range(len(outs[0]))]
        if n % mb:
            pad = mb - n % mb
            for b in bufs:  # zero the padding so a NaN check inside the model never trips on stale rows
                b[n:n + pad] = 0
        chunks = [run_fn([b[i:i + mb] for b in bufs]) for i in range(0, n, mb)]
        if len(chunks) == 1:
            return [o[:n] for o in chunks[0]]
        return [np.concatenate([c[j] for c in chunks])[:n] for j in range(len(chunks[0]))]


def _fine_timer_slack() -> None:
    """Let this thread's short sleeps end on time (Linux; elsewhere a no-op).

    The default timer slack (50 us) would make every poll of the delivery
    thread oversleep by up to a third of a small model's call.
    """
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 us
    except (OSError, AttributeError):
        pass


class MicroBatcher:
    """The batcher thread: producers ``put`` work, the thread flushes batches into ``process``.

    ``process(segments)`` runs one batch and either delivers its results
    itself or returns a finish step that delivers them (run on the delivery
    thread, at most ``max_deliveries`` queued: the runner waits for room, so
    a slow sink slows the batcher instead of piling up results). An
    exception in either fails that batch's requests
    (``on_error(segments, exc)``) and the loop goes on. ``on_evicted(work, n)`` is told about rows dropped
    under ``drop_oldest`` (outside the lock). ``on_tick()`` runs at least
    every ``tick_s`` from the loop (the systemd watchdog ping).
    """

    def __init__(self, policy: BatchPolicy, process: Callable[[list[Segment]], None], *,
                 block_timeout_s: float = 1.0, on_error: Callable | None = None,
                 on_evicted: Callable | None = None, on_tick: Callable[[], None] | None = None,
                 tick_s: float = 1.0, name: str = "edgeship-batcher", max_deliveries: int = 2,
                 pipeline: bool | None = None) -> None:
        self.policy = policy
        self.process = process
        self.block_timeout_s = block_timeout_s
        self.on_error = on_error
        self.on_evicted = on_evicted
        self.on_tick = on_tick
        self.tick_s = tick_s
        self.name = name
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._running = False
        self._drain_deadline: float | None = None
        self._busy = False  # the runner token: a batch is being processed (any thread); under _lock
        self._idle = threading.Condition(self._lock)
        self.last_batch_at = 0.0
        self.inline_batches = 0  # batches run on a caller's thread (see the module docstring)
        self.pipelined_batches = 0  # batches delivered by the delivery thread
        self.inline_quiet_s = 0.1  # no inline runs this long after requests last overlapped
        self._contended_at = -1e9
        # Finish steps waiting for the delivery thread, oldest first; ``_delivering``
        # counts those plus the one being run (all under _lock).
        self.max_deliveries = max(1, max_deliveries)
        self.pipeline = pipeline  # None: when BatchPolicy.pipeline_pays; True/False: always/never
        self._deliveries: deque[tuple[list[Segment], Callable[[], None]]] = deque()
        self._delivering = 0
        self._delivery_ready = threading.Condition(self._lock)
        self._delivery_on = False
        self._deliverer: threading.Thread | None = None
        # While results flow, the delivery thread polls (short sleeps) instead of
        # waiting to be woken, for this long after its last delivery. Waking a
        # sleeping thread costs the waker 25-45 us on a virtualised CPU (an IPI to
        # an idle core), and the waker here is the runner, between two model calls.
        self.delivery_poll_s = 0.02
        self._deliverer_polling = False
        self._run_started = 0.0  # monotonic start of the batch being run (the deliverer's alarm)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "MicroBatcher":
        if self._thread is not None:
            raise RuntimeError("MicroBatcher already started")
        self._accepting = self._running = self._delivery_on = True
        self._deliverer = threading.Thread(target=self._deliver_loop, name=self.name + "-deliver", daemon=True)
        self._deliverer.start()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> int:
        """Stop accepting, run what is pending for at most ``timeout`` s, fail the rest.

        Returns the number of samples that could not be run in time.
        """
        with self._lock:
            self._accepting = False
            self._drain_deadline = time.monotonic() + max(0.0, timeout)
            self._not_empty.notify_all()
            self._not_full.notify_all()
        t = self._thread
        if t is not None:
            t.join(timeout + 1.0)
        with self._lock:
            # A caller may still be running an inline batch, and run batches may still
            # be waiting for delivery: let them finish (bounded), so the runner is not
            # closed under them and no computed result is lost.
            limit = time.monotonic() + max(0.0, timeout) + 1.0
            while (self._busy or self._delivering) and time.monotonic() < limit:
                self._idle.wait(0.05)
            self._running = False
            left = self.policy.drain_all()
            self._not_empty.notify_all()
            self._delivery_on = False
            self._delivery_ready.notify_all()
        if t is not None:
            t.join(2.0)
        if self._deliverer is not None:
            self._deliverer.join(2.0)
        self._thread = self._deliverer = None
        lost = 0
        for w in left:
            lost += w.dropped
            self._fail(w, OverloadError("the agent stopped before this request ran; send it again"))
        return lost

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self.policy.pending

    @property
    def busy(self) -> bool:
        """A batch is being run or its results delivered right now (on any thread)."""
        return self._busy or self._delivering > 0

    def ran_since(self, t: float) -> bool:
        """No batch that started before monotonic time ``t`` is still running.

        What a model swap waits for before closing the old runner: busy as a
        whole (a run or a delivery) can stay true for as long as the load lasts.
        """
        return not self._busy or self._run_started > t

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no batch is running or being delivered; True when idle within ``timeout``."""
        limit = time.monotonic() + timeout
        with self._lock:
            while self._busy or self._delivering:
                left = limit - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # -- producers ------------------------------------------------------------
    def put(self, work: Work, timeout: float | None = None, stop: threading.Event | None = None,
            inline: bool = False) -> None:
        """Queue ``work``; raises :class:`OverloadError` when the overload policy refuses it.

        Under ``block`` the caller waits for room at most ``timeout`` (default
        ``block_timeout_s``); with ``stop`` (a source's prefetcher) it waits
        until there is room or ``stop`` is set: back-pressure, not loss.
        ``inline``: when the runner is free and a batch is due now, run it on
        this thread before returning (the work's future is then resolved).
        Sources leave it off: their reader thread keeps reading while the
        model runs.
        """
        evicted: tuple = ()
        segments: list[Segment] = []
        with self._lock:
            if not self._accepting:
                raise OverloadError("the agent is stopping and accepts no new requests")
            policy = self.policy
            offer = policy.offer(work, time.monotonic())
            if offer.decision == WAIT:
                wait_s = self.block_timeout_s if timeout is None else timeout
                limit = time.monotonic() + wait_s
                while offer.decision == WAIT:
                    left = limit - time.monotonic()
                    if stop is not None:
                        left = 0.0 if stop.is_set() else 0.2
                    if left <= 0 or not self._accepting:
                        policy.refuse(work)
                        raise OverloadError(f"{offer.reason}: waited {wait_s:g} s for room; "
                                            "slow down, or raise [batcher] queue_size")
                    self._not_full.wait(left)
                    offer = policy.offer(work, time.monotonic())
            if offer.decision == REJECTED:
                raise OverloadError(f"{offer.reason}: request rejected (overload policy "
                                    f"'{policy.overload}'); slow down, or raise [batcher] queue_size")
            evicted = offer.evicted
            now = time.monotonic()
            # Inline only while requests come one at a time. Under concurrent load
            # (any request met a busy runner or a queue within the last
            # ``inline_quiet_s``) the batcher thread batches them: a caller that ran
            # everyone's batch would answer itself first and the rest late (measured:
            # p99/p50 from 1.5 to 2.6, and less throughput, with 4 client threads).
            if inline:
                # A delivery still queued would be overtaken by this caller's own one.
                lone = not self._busy and not self._delivering and policy.pending == work.remaining
                if not lone:
                    self._contended_at = now
            if inline and lone and self._running and now - self._contended_at > self.inline_quiet_s and \
                    policy.next_flush(now) == 0.0:
                segments = policy.take(now)
                self._busy = True
                self._not_full.notify_all()
            # Wake the thread only when the flush time may have moved earlier:
            # first pending work, a full batch, or a deadline.
            elif policy.pending == work.remaining or policy.pending >= policy.max_batch or work.deadline is not None:
                self._not_empty.notify()
        if segments:
            self.inline_batches += 1
            self._run_batch(segments, inline=True)
        for w, k in evicted:
            if self.on_evicted is not None:
                self.on_evicted(w, k)
            if w.future is not None and w.remaining == 0:
                self._fail(w, OverloadError("dropped by the overload policy 'drop_oldest': newer requests "
                                            "took its place; slow down, or raise [batcher] queue_size"))

    @staticmethod
    def _fail(work: Work, exc: BaseException) -> None:
        f = work.future
        if f is not None and not f.done():
            try:
                f.set_exception(exc)
            except Exception:  # already resolved by a racing path (cancel): nothing to do
                pass

    # -- the loop -------------------------------------------------------------
    def _loop(self) -> None:
        policy = self.policy
        next_tick = 0.0
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if now >= next_tick and self.on_tick is not None:
                        break
                    if self._busy:  # a caller runs a batch inline; it notifies when done
                        self._not_empty.wait(self.tick_s)
                        continue
                    wait = policy.next_flush(now)
                    if not self._accepting:
                        if wait is None or (self._drain_deadline is not None and now >= self._drain_deadline):
                            return
                        wait = 0.0  # draining: flush without waiting for a fuller batch
                    if wait is None:
                        self._not_empty.wait(self.tick_s)
                        continue
                    if wait > 0:
                        self._not_empty.wait(min(wait, self.tick_s))
                        continue
                    segments = policy.take(now, None if self._accepting else "flush_drain")
                    self._busy = True
                    self._not_full.notify_all()
                    break
            if now >= next_tick and self.on_tick is not None:
                next_tick = now + self.tick_s
                try:
                    self.on_tick()
                except Exception:
                    log.exception("batcher tick hook failed")
                continue
            if not segments:
                continue
            self._run_batch(segments)

    def _run_batch(self, segments: list[Segment], inline: bool = False) -> None:
        """Run one taken batch (the caller holds the runner token), then free the runner.

        A finish step is queued for the delivery thread; an inline caller runs
        it itself, before freeing the runner, so batches still deliver in order.
        """
        t0 = self._run_started = time.monotonic()
        finish = None
        try:
            finish = self.process(segments)
        except Exception as exc:
            self._failed(segments, exc)
        t1 = time.monotonic()
        self.last_batch_at = t1
        if finish is not None and not self._delivering:  # (only this thread adds deliveries: no race)
            if inline or not self._pipelining() or not self._delivery_on:
                self._finish(segments, finish)
                finish = None
        with self._lock:
            self.policy.observe_run(t1 - t0)
            if finish is not None:
                while len(self._deliveries) >= self.max_deliveries and self._delivery_on:
                    self._idle.wait(self.tick_s)  # back-pressure from a slow sink
                if self._delivery_on:
                    self._deliveries.append((segments, finish))
                    self._delivering += 1
                    self.pipelined_batches += 1
                    if not self._deliverer_polling:
                        self._delivery_ready.notify()
                    finish = None
            if finish is None:
                self._busy = False
                self._idle.notify_all()
                if self.policy.pending:
                    self._not_empty.notify()  # work queued behind this batch: the thread takes it
        if finish is not None:  # the delivery thread stopped meanwhile (stop() timed out): deliver here
            self._finish(segments, finish)
            with self._lock:
                self._busy = False
                self._idle.notify_all()

    def _pipelining(self) -> bool:
        """Whether run batches go to the delivery thread now (``pipeline``, else measured)."""
        return self.policy.pipeline_pays() if self.pipeline is None else self.pipeline

    def _failed(self, segments: list[Segment], exc: Exception) -> None:
        if not isinstance(exc, InputError):
            log.exception("batch of %d failed", sum(s.count for s in segments))
        if self.on_error is not None:
            try:
                self.on_error(segments, exc)
            except Exception:
                log.exception("batch error hook failed")
        for s in segments:
            if s.work.future is not None:
                self._fail(s.work, exc)

    def _finish(self, segments: list[Segment], finish: Callable[[], None]) -> None:
        t0 = time.monotonic()
        try:
            finish()
        except Exception as exc:
            self._failed(segments, exc)
        self.policy.observe_finish(time.monotonic() - t0)  # one writer at a time: the runner or the deliverer

    def _deliver_loop(self) -> None:
        _fine_timer_slack()
        last = -1e9  # when the last delivery ended
        while True:
            if not self._deliveries:  # (a deque's length reads atomically; the lock is hot)
                now = time.monotonic()
                if self._pipelining() and self._delivery_on and now - last < self.delivery_poll_s:
                    # Poll, without the lock: the runner then never has to wake us, and the
                    # callers' puts never queue behind us. Sleep until the running batch is
                    # due (its start + the learnt run time), then in short steps.
                    self._deliverer_polling = True
                    est = self.policy.est_run_s
                    due = self._run_started + est - now if self._busy else est * 0.5
                    time.sleep(min(max(due, 2e-5), 1e-3))
                    continue
                with self._lock:
                    # Off polling under the lock, then check again: the runner notifies
                    # whenever it sees polling off, so no delivery waits for the tick.
                    self._deliverer_polling = False
                    while not self._deliveries:
                        if not self._delivery_on:
                            return
                        self._delivery_ready.wait(self.tick_s)
            with self._lock:
                segments, finish = self._deliveries.popleft()
                self._idle.notify_all()  # room in the queue for the runner
            self._finish(segments, finish)
            with self._lock:
                self._delivering -= 1
                self._idle.notify_all()
            last = time.monotonic()
