"""The agent's cumulative counters and histograms (constant memory), shared by API, bench and telemetry."""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from ..metrics import BATCH_BOUNDS, LATENCY_BOUNDS_MS, Counters, Histogram

__all__ = ["AgentMetrics", "COUNTER_NAMES"]

COUNTER_NAMES = ("inferences", "batches", "requests", "errors", "rejected", "dropped", "overload_rejected",
                 "cache_hits", "cache_misses", "deadline_missed", "source_errors", "switches", "rollbacks")


class AgentMetrics:
    """Cumulative counters and fixed-bucket histograms (constant memory), shared by API, bench, telemetry."""

    def __init__(self) -> None:
        self.counters = Counters(COUNTER_NAMES)
        self.latency_ms = Histogram(LATENCY_BOUNDS_MS)     # request in -> result out, per sample
        self.inference_ms = Histogram(LATENCY_BOUNDS_MS)   # one model call, per batch
        self.batch_size = Histogram(BATCH_BOUNDS)
        self._lock = threading.Lock()
        self.queue_depth: Callable[[], int] = lambda: 0
        self.reject_reasons: dict[str, int] = {}
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
                    "batch_size": self.batch_size.to_dict(), "reject_reasons": dict(self.reject_reasons)}

