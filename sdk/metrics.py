"""Fixed-bucket histograms and counters (pure, constant memory).

Shared by the agent's ``/v1/metrics``, ``edgeship bench``, the telemetry
windows sent over MQTT and the fleet report, so every figure is computed the
same way everywhere.

A :class:`Histogram` keeps one count per bucket between fixed ``bounds``
(upper edges, ascending) plus one overflow bucket, and the exact min, max and
sum. ``percentile(q)`` interpolates linearly inside the bucket that holds the
q-th value, clamped to the observed min/max, so a histogram of a constant
reports that constant exactly. Histograms with the same bounds merge by
adding counts, which is what the fleet side does across devices and windows.
"""
from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "LATENCY_BOUNDS_MS",
    "BATCH_BOUNDS",
    "Histogram",
    "Counters",
    "percentiles",
]


def _latency_bounds() -> tuple[float, ...]:
    # 1-2-5 steps from 10 µs to 60 s, with two extra steps per decade below
    # 100 ms where on-device latencies live: ~6 % relative resolution is what
    # p95/p99 comparisons between canary and control need.
    out: list[float] = []
    for exp in range(-2, 5):
        for m in (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0):
            out.append(round(m * 10.0 ** exp, 6))
    out = [b for b in out if b < 60000.0]  # keep the edges ascending up to the 60 s top edge
    out.append(60000.0)
    return tuple(out)


#: Upper bucket edges for latencies in milliseconds (10 µs .. 60 s).
LATENCY_BOUNDS_MS: tuple[float, ...] = _latency_bounds()
#: Upper bucket edges for batch sizes (each size up to 8 exact, then powers of two).
BATCH_BOUNDS: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)


class Histogram:
    """Counts per fixed bucket; ``bounds`` are ascending upper edges (value <= edge)."""

    __slots__ = ("bounds", "counts", "count", "total", "min", "max", "_edges")

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError("histogram bounds must be a non-empty ascending sequence")
        self.bounds = b
        self._edges = np.asarray(b, dtype=np.float64)
        self.counts = [0] * (len(b) + 1)  # last bucket: above the highest bound
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- recording -----------------------------------------------------------
    def add(self, value: float) -> None:
        v = float(value)
        if v != v:  # NaN is a caller bug; never let it poison percentiles
            return
        self.counts[bisect_left(self.bounds, v)] += 1
        self.count += 1
        self.total += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    def add_many(self, values: Iterable[float] | np.ndarray) -> None:
        """Add many values at once (vectorised: one numpy call per batch)."""
        arr = np.asarray(values, dtype=np.float64).ravel()
        if arr.size == 0:
            return
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            return
        idx = np.searchsorted(self._edges, arr, side="left")
        binc = np.bincount(idx, minlength=len(self.counts))
        counts = self.counts
        for i in np.flatnonzero(binc):
            counts[i] += int(binc[i])
        self.count += int(arr.size)
        self.total += float(arr.sum())
        lo, hi = float(arr.min()), float(arr.max())
        if lo < self.min:
            self.min = lo
        if hi > self.max:
            self.max = hi

    def add_repeated(self, value: float, n: int) -> None:
        """Add ``value`` ``n`` times (a batch of n samples sharing one latency)."""
        if n <= 0:
            return
        v = float(value)
        if v != v:
            return
        self.counts[bisect_left(self.bounds, v)] += n
        self.count += n
        self.total += v * n
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram (same bounds); returns self."""
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bounds")
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def copy(self) -> "Histogram":
        h = Histogram.__new__(Histogram)
        h.bounds, h._edges = self.bounds, self._edges
        h.counts = list(self.counts)
        h.count, h.total, h.min, h.max = self.count, self.total, self.min, self.max
        return h

    def reset(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- reading -------------------------------------------------------------
    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), interpolated inside its bucket; None when empty."""
        if not 0 <= q <= 100:
            raise ValueError("percentile q must be within 0..100")
        if self.count == 0:
            return None
        rank = q / 100.0 * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if c == 0:
                continue
            if seen + c >= rank:
                lo = self.bounds[i - 1] if i > 0 else self.min
                hi = self.bounds[i] if i < len(self.bounds) else self.max
                lo, hi = max(lo, self.min), min(hi, self.max)
                frac = (rank - seen) / c
                value = lo + (hi - lo) * frac
                return float(min(max(value, self.min), self.max))
            seen += c
        return float(self.max)

    def to_dict(self) -> dict:
        """JSON-ready form; sparse counts keep MQTT messages small."""
        return {
            "bounds": list(self.bounds),
            "counts": {str(i): c for i, c in enumerate(self.counts) if c},
            "count": self.count,
            "sum": self.total,
            "min": None if self.count == 0 else self.min,
            "max": None if self.count == 0 else self.max,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Histogram":
        h = cls(data["bounds"])
        counts = data.get("counts", {})
        if isinstance(counts, Mapping):
            for k, c in counts.items():
                h.counts[int(k)] = int(c)
        else:  # a dense list is accepted too
            for i, c in enumerate(counts):
                h.counts[i] = int(c)
        h.count = int(data.get("count", sum(h.counts)))
        h.total = float(data.get("sum", 0.0))
        h.min = math.inf if data.get("min") is None else float(data["min"])
        h.max = -math.inf if data.get("max") is None else float(data["max"])
        return h

    def summary(self, qs: Sequence[float] = (50, 95, 99)) -> dict:
        out = {"count": self.count, "mean": self.mean}
        for q in qs:
            out[f"p{q:g}"] = self.percentile(q)
        return out

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, p50={self.percentile(50)}, max={self.max if self.count else None})"


def percentiles(hist: Mapping | Histogram, qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": .., "p95": .., "p99": ..}`` of a histogram or its ``to_dict()``."""
    h = hist if isinstance(hist, Histogram) else Histogram.from_dict(hist)
    return {f"p{q:g}": h.percentile(q) for q in qs}


class Counters:
    """Named monotonically increasing integer counters, safe across threads.

    ``inc`` takes a lock: counters are bumped once per batch or per rare event
    (drops, rejects), never per sample on the hot path, so the lock is cheap.
    """

    __slots__ = ("_values", "_lock")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._values: dict[str, int] = {n: 0 for n in names}
        self._lock = threading.Lock()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def __getitem__(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def delta(self, previous: Mapping[str, int]) -> dict[str, int]:
        """Counts since ``previous`` (a former snapshot): what a telemetry window reports."""
        now = self.snapshot()
        return {k: v - previous.get(k, 0) for k, v in now.items()}
