"""The agent's cumulative counters and histograms (constant memory), shared by API, bench and telemetry."""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..metrics import BATCH_BOUNDS, LATENCY_BOUNDS_MS, Counters, Histogram

__all__ = ["AgentMetrics", "COUNTER_NAMES", "rss_bytes", "batch_work_bytes", "batch_cap",
           "fixed_mmap_threshold",
           "heap_in_use", "memory_mark"]

COUNTER_NAMES = ("inferences", "batches", "requests", "errors", "rejected", "dropped", "overload_rejected",
                 "cache_hits", "cache_misses", "deadline_missed", "source_errors", "switches", "rollbacks")


def rss_bytes() -> int | None:
    """This process's resident set size from /proc (None where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def heap_in_use() -> int | None:
    """Bytes this process holds from malloc (glibc ``mallinfo2``: in-use heap chunks + mmapped blocks).

    Unlike RSS it grows when an allocation reuses memory freed earlier, so a
    model's working memory is seen in a process that already served (an app
    embedding the agent, a benchmark). None off glibc (or before 2.33).
    """
    try:
        import ctypes  # noqa: PLC0415

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        fn = ctypes.CDLL(None).mallinfo2
        fn.restype = _MallInfo2
        m = fn()
        return int(m.uordblks + m.hblkhd)
    except (OSError, AttributeError):
        return None


def memory_mark() -> tuple[int | None, int | None]:
    """(heap in use, RSS) now: the starting point of :func:`batch_work_bytes`."""
    return heap_in_use(), rss_bytes()


def batch_work_bytes(runner: Any, names: list[str], shapes, dtypes, before: tuple[int | None, int | None],
                     k: int = 2) -> float:
    """Working memory per sample in a batch: growth from ``before`` (a :func:`memory_mark` taken before
    the model's first run) to after a batch of ``k``, divided by ``k``.

    onnxruntime keeps its arena at the largest batch seen, so this is what
    every sample of ``max_batch`` costs for good: ~4.3 MB for a 224x224
    MobileNet-style CNN, so a batch of 32 held 150 MB. From the first run
    on, not from a batch-1 warm-up: the arena grows in steps and a small
    batch often fits in what the warm-up left (measured: 1.7 MB instead of
    4.3). It includes the fixed cost of a first run, so it errs towards a
    smaller batch. Heap in use where glibc tells it (RSS does not grow when
    freed memory is reused, e.g. in a process that served before), else RSS.
    Measured, not estimated from the graph (no onnx import on the device).
    """
    feed = {n: np.zeros((k, *s), d) for n, s, d in zip(names, shapes, dtypes)}
    for _ in range(2):  # twice: onnxruntime plans a new shape's memory on its first run, allocates on the second
        runner.run_unchecked(feed)
    heap0, rss0 = before
    if heap0 is not None:
        after = heap_in_use()
        if after is not None:
            return max(0.0, (after - heap0) / k)
    if rss0 is None:
        return 0.0
    return max(0.0, ((rss_bytes() or rss0) - rss0) / k)


MMAP_THRESHOLD = 128 << 10


def fixed_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Keep glibc's mmap threshold at ``nbytes`` (its initial value) in this process; True when set.

    glibc raises the threshold each time a mmapped block is freed (up to 32 MB),
    so after the first few, every decoded image (600 KB as float32) comes
    from the heap, and freed heap memory in the worker threads' arenas stays
    resident: 20 MB of a 224x224 folder run's peak RSS (measured, 142 -> 122
    MB). A fixed threshold gives big buffers back to the kernel when freed.
    Only for the agent's own process (``edgeship agent run``): the setting is
    process-wide. No-op off glibc.
    """
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, int(nbytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


QUEUE_MIN_BYTES = 4 << 20   # sensor rows keep their deep queue (4 MB = 16k 64-float rows > queue_size)
QUEUE_BATCHES = 2
# A third, not half: one more sample of batch cost the folder run of benchmarks/agent.py (224x224 CNN,
# `edgeship agent run`, 300 JPEGs) 5-8 MB of peak RSS (103 MB at batch 1, 113 at 3, 129 at 5), not the
# 2.8 MB its inputs and measured working memory count: its rows also sit in the queue, the packer and
# the hooks' copies while a batch is delivered, and the runtime's arena grows in steps.
BATCH_SHARE = 3


def batch_cap(max_batch: int, max_bytes: int, sample_bytes: float, work_bytes: float) -> tuple[int, int]:
    """(batch size, queue byte bound) within ``max_bytes`` in flight (0 = unbounded) (pure).

    The batch (inputs + measured working memory per sample) gets at most
    a third of the bound (``BATCH_SHARE``), never less than one sample; the
    queue holds the rest, at most ``QUEUE_BATCHES`` batches of inputs (or
    ``QUEUE_MIN_BYTES``), never less than one sample's inputs.
    """
    if not max_bytes:
        return max_batch, 0
    per = max(1.0, sample_bytes + work_bytes)
    b = max(1, min(max_batch, int((max_bytes // BATCH_SHARE) // per)))
    # Two batches queued keep the model busy through decode jitter (each worker also holds the
    # block it waits to put, so the model has ~3 batches ahead); more only holds memory: 2 workers
    # decode 224x224 JPEGs faster than the model runs, so the queue sits full (4 batches were 6 MB
    # of the folder run's peak RSS at batch 5).
    few = max(QUEUE_MIN_BYTES, QUEUE_BATCHES * b * sample_bytes)
    return b, int(max(sample_bytes, min(few, max_bytes - b * per)))


class AgentMetrics:
    """Cumulative counters and fixed-bucket histograms (constant memory), shared by API, bench, telemetry."""

    def __init__(self) -> None:
        self.counters = Counters(COUNTER_NAMES)
        self.latency_ms = Histogram(LATENCY_BOUNDS_MS)     # request in -> result out, per sample
        self.inference_ms = Histogram(LATENCY_BOUNDS_MS)   # one model call, per batch
        self.batch_size = Histogram(BATCH_BOUNDS)
        self._lock = threading.Lock()
        self.queue_depth: Callable[[], int] = lambda: 0
        # Memory figures (the agent sets it): rss_bytes, bytes_in_flight and its bound, the batch cap.
        self.memory: Callable[[], dict] = lambda: {"rss_bytes": rss_bytes()}
        self.reject_reasons: dict[str, int] = {}
        self.variant_choice: dict | None = None  # which variant serves and why, measured here (adapt_choice)
        self.recent_rejects: list[dict] = []

    def record_batch(self, n: int, run_ms: float, latencies: Sequence[tuple[float, int]]) -> None:
        with self._lock:
            self.batch_size.add(n)
            self.inference_ms.add(run_ms)
            for lat, k in latencies:
                self.latency_ms.add_repeated(lat, k)

    def record_rejects(self, source: str, rejects: Sequence[tuple[Any, str]]) -> None:
        self.counters.inc("rejected", len(rejects))
        with self._lock:
            for ref, reason in rejects:
                key = reason.split(":")[0][:80] if ref is not None else reason[:80]
                self.reject_reasons[key] = self.reject_reasons.get(key, 0) + 1
                if len(self.reject_reasons) > 50:  # bounded: keep the first 50 kinds
                    self.reject_reasons.pop(key, None)
            self.recent_rejects = (self.recent_rejects + [{"source": source, "ref": ref, "reason": reason}
                                                          for ref, reason in rejects[-5:]])[-20:]

    def snapshot(self) -> dict:
        """Cumulative figures: ``counters``, ``queue_depth``, histograms as ``to_dict()``."""
        with self._lock:
            return {"counters": self.counters.snapshot(), "queue_depth": self.queue_depth(),
                    "latency_ms": self.latency_ms.to_dict(), "inference_ms": self.inference_ms.to_dict(),
                    "batch_size": self.batch_size.to_dict(), "reject_reasons": dict(self.reject_reasons),
                    "memory": self.memory(),
                    **({"variant_choice": self.variant_choice} if self.variant_choice else {})}

