"""Usage telemetry (one aggregated window at a time) and the device ``state`` message.

Never one message per inference: :class:`WindowAggregator` (pure, constant
memory) folds every result into the current window; :class:`Telemetry` (a
component with its own thread) closes a window every ``window_s`` seconds,
builds one ``telemetry`` message with :func:`build_telemetry_body` and puts
it in the outbox. The network never sees the inference path: the outbox put
happens on the telemetry thread.

Telemetry body (``rev`` 1; later fields are added, never renamed, and the
collector keeps the whole body, so old collectors keep working)::

    {"rev": 1, "window_s": 60.0, "window_start": t0,
     "counts": {"inferences", "errors", "rejected", "dropped", "outbox_dropped",
                "cache_hits", "cache_misses"},
     "latency_ms": {"p50", "p95", "p99", "hist": Histogram.to_dict()},
     "batch_size": {"hist": ...} | null, "queue_depth": int | null,
     "cache_hit_rate": float | null, "cpu_percent": float | null, "rss_bytes": int | null,
     "model": {"name", "version", "sha256"} | null, "classes": {"label": n, ...},
     ...fields added by extra providers (e.g. "drift": {...})}

:class:`StateReporter` keeps the retained ``state`` topic true: it stamps
every MQTT connection with a ``session`` (the connect time) used both in
that connection's last will (``online: false``) and in the ``online: true``
message it sends once connected, so the collector can order them (a late
will from an old connection never marks a reconnected device offline).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping

from .. import protocol
from ..lifecycle import STOP_TIMEOUT_S, Loop
from ..metrics import LATENCY_BOUNDS_MS, Histogram
from ..mqtt import Will

__all__ = ["WindowAggregator", "WindowData", "build_telemetry_body", "counter_delta", "hist_delta",
           "ProcessSampler", "Telemetry", "StateReporter", "TELEMETRY_REV"]

log = logging.getLogger("edgeship.agent.telemetry")

TELEMETRY_REV = 1
MAX_CLASSES = 256  # distinct labels kept per window; the rest count under "_other"


class WindowData:
    __slots__ = ("start", "inferences", "latency", "classes", "model")

    def __init__(self, start: float) -> None:
        self.start = start
        self.inferences = 0
        self.latency = Histogram(LATENCY_BOUNDS_MS)
        self.classes: dict[str, int] = {}
        self.model: dict | None = None


class WindowAggregator:
    """Folds results into the current window; :meth:`take` closes it. Thread-safe, O(1) memory."""

    def __init__(self, now: float | None = None, max_classes: int = MAX_CLASSES) -> None:
        self.max_classes = max_classes
        self._lock = threading.Lock()
        self._w = WindowData(time.time() if now is None else now)

    def record(self, latency_ms: float | None, label: Any = None, model: Mapping | None = None) -> None:
        with self._lock:
            w = self._w
            w.inferences += 1
            if latency_ms is not None:
                w.latency.add(latency_ms)
            if label is not None:
                key = str(label)[:64]
                if key not in w.classes and len(w.classes) >= self.max_classes:
                    key = "_other"
                w.classes[key] = w.classes.get(key, 0) + 1
            if model is not None:
                w.model = dict(model)

    def record_batch(self, n: int, latency_ms: Any, labels: list | None = None,
                     model: Mapping | None = None, class_counts: Mapping[str, int] | None = None) -> None:
        """One batch of ``n`` results; ``latency_ms`` is one value for all or one per row.

        Classes come either as one label per row (``labels``) or already counted (``class_counts``).
        """
        if labels and class_counts is None:
            counted: dict[str, int] = {}
            for lab in labels:
                counted[str(lab)] = counted.get(str(lab), 0) + 1
            class_counts = counted
        with self._lock:
            w = self._w
            w.inferences += n
            if isinstance(latency_ms, (int, float)):
                w.latency.add_repeated(latency_ms, n)
            elif latency_ms is not None:
                w.latency.add_many(latency_ms)
            for lab, c in (class_counts or {}).items():
                key = lab[:64]
                if key not in w.classes and len(w.classes) >= self.max_classes:
                    key = "_other"
                w.classes[key] = w.classes.get(key, 0) + c
            if model is not None:
                w.model = model  # the agent's model dict is fixed per loaded model: no copy per batch

    def take(self, now: float) -> WindowData:
        with self._lock:
            w, self._w = self._w, WindowData(now)
            self._w.model = w.model  # the model stays active into the next window
            return w


def counter_delta(now: Mapping[str, Any], prev: Mapping[str, Any]) -> dict[str, int]:
    """Per-window counts from cumulative counters; a reset (agent restart) counts from zero."""
    out = {}
    for k, v in now.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        p = prev.get(k, 0)
        out[k] = int(v - p) if v >= p else int(v)
    return out


def hist_delta(now: Mapping | None, prev: Mapping | None) -> dict | None:
    """Histogram of the window from two cumulative ``to_dict()`` snapshots (same bounds)."""
    if not now:
        return None
    h = Histogram.from_dict(now)
    if prev and list(prev.get("bounds", [])) == list(h.bounds):
        p = Histogram.from_dict(prev)
        if p.count <= h.count:
            h.counts = [a - b for a, b in zip(h.counts, p.counts)]
            h.count -= p.count
            h.total -= p.total
            # min/max of the window are unknown from cumulative snapshots: bucket edges bound them.
            nz = [i for i, c in enumerate(h.counts) if c]
            if not nz:
                h.min, h.max = float("inf"), float("-inf")
            else:
                lo_i, hi_i = nz[0], nz[-1]
                h.min = max(h.min, h.bounds[lo_i - 1] if lo_i > 0 else h.min)
                h.max = min(h.max, h.bounds[hi_i] if hi_i < len(h.bounds) else h.max)
    return h.to_dict()


def build_telemetry_body(w: WindowData, *, now: float, counters: Mapping[str, int] | None = None,
                         outbox_dropped: int = 0, queue_depth: int | None = None,
                         batch_hist: Mapping | None = None, cpu_percent: float | None = None,
                         rss_bytes: int | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """The telemetry message body of one closed window (pure)."""
    c = dict(counters or {})
    counts = {
        "inferences": int(w.inferences),
        "errors": int(c.get("errors", 0)),
        "rejected": int(c.get("rejected", 0)),
        "dropped": int(c.get("dropped", 0)),
        "outbox_dropped": int(outbox_dropped),
        "cache_hits": int(c.get("cache_hits", 0)),
        "cache_misses": int(c.get("cache_misses", 0)),
    }
    for k, v in c.items():  # other agent counters (batches, overload_rejected, ...) ride along
        if k not in counts and k != "inferences" and isinstance(v, int) and v >= 0:
            counts[k] = v
    lookups = counts["cache_hits"] + counts["cache_misses"]
    lat = w.latency
    body: dict[str, Any] = {
        "rev": TELEMETRY_REV,
        "window_s": max(0.0, float(now - w.start)),
        "window_start": float(w.start),
        "counts": counts,
        "latency_ms": {"p50": lat.percentile(50), "p95": lat.percentile(95), "p99": lat.percentile(99),
                       "hist": lat.to_dict()},
        "batch_size": {"hist": dict(batch_hist)} if batch_hist else None,
        "queue_depth": queue_depth,
        "cache_hit_rate": (counts["cache_hits"] / lookups) if lookups else None,
        "cpu_percent": cpu_percent,
        "rss_bytes": rss_bytes,
        "model": w.model,
        "classes": dict(w.classes),
    }
    for k, v in (extra or {}).items():
        if k not in body:  # extras add fields; they never overwrite the core ones
            body[k] = v
    return body


class ProcessSampler:
    """CPU % (since the previous sample) and RSS of this process: psutil when installed, else /proc."""

    def __init__(self) -> None:
        self._prev: tuple[float, float] | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def _cpu_seconds(self) -> float:
        t = os.times()
        return t.user + t.system

    def _rss(self) -> int | None:
        if self._proc is not None:
            return int(self._proc.memory_info().rss)
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def sample(self) -> tuple[float | None, int | None]:
        now, cpu = time.monotonic(), self._cpu_seconds()
        pct = None
        if self._prev is not None and now > self._prev[0]:
            pct = round(100.0 * (cpu - self._prev[1]) / (now - self._prev[0]), 2)
        self._prev = (now, cpu)
        return pct, self._rss()


class Telemetry(Loop):
    """Agent component: ``on_result`` folds results in; its thread sends a window every ``window_s``.

    ``metrics_snapshot()`` (optional) returns the agent's cumulative figures:
    ``{"counters": {"errors", "rejected", "dropped", "cache_hits", "cache_misses", ...},
    "queue_depth": n, "batch_size": Histogram.to_dict()}``; the window reports their deltas.
    ``add_fields(fn)`` registers a provider whose dict is merged into each window (drift scores).
    """

    def __init__(self, outbox: Any, fleet: str, device: str, *, window_s: float = 60.0,
                 metrics_snapshot: Callable[[], Mapping[str, Any]] | None = None) -> None:
        super().__init__("telemetry")
        self.outbox = outbox
        self.fleet = fleet
        self.device = device
        self.topic = protocol.device_topic(fleet, device, "telemetry")
        self.window_s = float(window_s)
        self.metrics_snapshot = metrics_snapshot
        self.agg = WindowAggregator()
        self.sampler = ProcessSampler()
        self.sampler.sample()
        self._providers: list[Callable[[], Mapping[str, Any]]] = []
        self._prev_counters: dict[str, Any] = {}
        self._prev_batch: Mapping | None = None
        self._flush_lock = threading.Lock()
        self.windows_sent = 0
        self._prime()

    def _prime(self) -> None:
        snap = self._snapshot()
        self._prev_counters = dict(snap.get("counters") or {})
        self._prev_batch = snap.get("batch_size")

    def _snapshot(self) -> Mapping[str, Any]:
        if self.metrics_snapshot is None:
            return {}
        try:
            return self.metrics_snapshot() or {}
        except Exception as exc:  # noqa: BLE001 - telemetry must not die with a metrics bug
            log.warning("telemetry: metrics snapshot failed: %s", exc)
            return {}

    def add_fields(self, provider: Callable[[], Mapping[str, Any]]) -> None:
        self._providers.append(provider)

    # agent component hooks
    def on_batch(self, batch: Any) -> None:
        counts = None
        idx = getattr(batch, "top_idx", None)
        if idx is not None:
            # One bincount per batch instead of a Python loop per row (this runs on the batcher thread).
            import numpy as np

            from .results import label_name

            bc = np.bincount(np.asarray(idx), minlength=0)
            labels = batch.labels
            counts = {label_name(labels, i): int(c) for i, c in enumerate(bc.tolist()) if c}
        self.agg.record_batch(batch.n, batch.latency_ms, None, batch.model, class_counts=counts)

    def on_result(self, result: Any) -> None:
        self.agg.record(getattr(result, "latency_ms", None), getattr(result, "label", None),
                        getattr(result, "model", None))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        was_running = self.alive
        stopped = super().stop(timeout)
        if was_running:
            self.flush()  # the partial last window is still worth sending
        return stopped

    def run(self) -> None:
        while not self.wait(self.window_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - one bad window must not stop telemetry
                log.warning("telemetry window not stored: %s", exc)

    def flush(self, now: float | None = None) -> dict | None:
        """Close the current window and put it in the outbox; returns the message."""
        with self._flush_lock:
            now = time.time() if now is None else now
            w = self.agg.take(now)
            snap = self._snapshot()
            counters = dict(snap.get("counters") or {})
            delta = counter_delta(counters, self._prev_counters)
            self._prev_counters = counters
            bh = snap.get("batch_size")
            batch = hist_delta(bh, self._prev_batch)
            self._prev_batch = bh
            extra: dict[str, Any] = {}
            for p in self._providers:
                try:
                    extra.update(p() or {})
                except Exception as exc:  # noqa: BLE001 - a provider bug must not lose the window
                    log.warning("telemetry field provider failed: %s", exc)
            if snap.get("memory"):
                extra.setdefault("memory", dict(snap["memory"]))  # bytes in flight and their bounds
            if snap.get("variant_choice"):
                extra.setdefault("variant_choice", dict(snap["variant_choice"]))  # which variant, why, measured where
            cpu, rss = self.sampler.sample()
            dropped = self.outbox.take_dropped()
            body = build_telemetry_body(w, now=now, counters=delta, outbox_dropped=dropped,
                                        queue_depth=snap.get("queue_depth"), batch_hist=batch,
                                        cpu_percent=cpu, rss_bytes=rss, extra=extra)
            msg = protocol.make_message("telemetry", self.device, body, ts=now)
            try:
                self.outbox.put("telemetry", self.topic, protocol.encode(msg))
            except Exception:
                self.outbox.restore_dropped(dropped)  # report them in the next window instead
                raise
            self.windows_sent += 1
            return msg


class StateReporter(Loop):
    """Keeps the retained ``state`` topic true; provides the link's per-connection last will.

    Pass :meth:`will` as ``LinkOptions.will_factory``. Its thread notices each
    new connection (link generation) and puts ``online: true`` for it; a model
    change (seen in ``on_result`` or via :meth:`update`) puts a new state.
    """

    def __init__(self, outbox: Any, fleet: str, device: str, *, agent_version: str = "",
                 model_fn: Callable[[], Mapping | None] | None = None, started_at: float | None = None) -> None:
        super().__init__("state-reporter")
        self.outbox = outbox
        self.device = device
        self.topic = protocol.device_topic(fleet, device, "state")
        self.agent_version = agent_version
        self.model_fn = model_fn
        self.started_at = time.time() if started_at is None else started_at
        self.link: Any = None
        self.session = 0.0
        self._model: dict | None = None
        self._gen_seen = 0
        self._model_changed = False
        self._lock = threading.Lock()

    def will(self) -> Will:
        """Called by the link's network thread before each connect."""
        self.session = time.time()
        body = self._body(False, will=True)
        return Will(self.topic, protocol.encode(protocol.make_message("state", self.device, body)), qos=1, retain=True)

    def _body(self, online: bool, will: bool = False) -> dict:
        model = self._model
        if model is None and self.model_fn is not None:
            try:
                model = self.model_fn()
            except Exception:  # noqa: BLE001 - state without a model is still a state
                model = None
        body: dict[str, Any] = {"online": online, "session": self.session, "agent_version": self.agent_version,
                                "started_at": self.started_at, "model": dict(model) if model else None}
        if will:
            body["will"] = True
        return body

    def put_state(self, online: bool) -> None:
        with self._lock:
            msg = protocol.make_message("state", self.device, self._body(online))
            self.outbox.put("state", self.topic, protocol.encode(msg), retain=True)

    def update(self, model: Mapping | None) -> None:
        self._model = dict(model) if model else None
        self.put_state(True)

    def on_batch(self, batch: Any) -> None:
        self._see_model(batch.model)

    def on_result(self, result: Any) -> None:
        self._see_model(getattr(result, "model", None))

    def _see_model(self, m: Mapping | None) -> None:
        if m and (self._model is None or m.get("sha256") != self._model.get("sha256")
                  or m.get("version") != self._model.get("version")):
            self._model = dict(m)
            # Off the inference thread: the state thread puts it.
            self._model_changed = True

    def _on_start(self) -> None:
        self._model_changed = False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        stopped = super().stop(timeout)
        try:
            self.put_state(False)  # graceful: the broker will not send the will after a clean DISCONNECT
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            log.warning("could not store the offline state: %s", exc)
        return stopped

    def run(self) -> None:
        while not self.wait(0.1):
            try:
                link = self.link
                if self.model_fn is not None:
                    # A switch with no traffic after it is reported too: the fleet
                    # compares each device's model with what its rollouts want.
                    self._see_model(self.model_fn())
                if link is not None and link.connected and link.generation != self._gen_seen:
                    self._gen_seen = link.generation
                    self.put_state(True)
                elif self._model_changed:
                    self._model_changed = False
                    self.put_state(True)
            except Exception as exc:  # noqa: BLE001 - keep reporting
                log.warning("state reporter: %s", exc)
