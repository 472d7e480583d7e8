"""Adapting to the device, the reading layer: SoC temperature, CPU wait, CPU pressure, model-call timing.

What the agent measures and why (the ``cyclictest``-style CPU-wait probe,
PSI versus ``/proc/loadavg``, interleaved timing): ``docs/adapt.md``. The
parsers of what is read (:func:`tick_lateness`, :func:`parse_psi`,
:func:`psi_fraction`, :func:`parse_loadavg`, :func:`others_wait`) are pure
and sit beside the reader that uses them. No decisions here: those are in
:mod:`edgeship.agent.adapt_policy`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..metrics import Histogram

__all__ = ["read_thermal", "tick_lateness", "probe_cpu_wait", "parse_psi", "parse_loadavg", "others_wait",
           "psi_fraction", "CpuPressure", "measure_interleaved", "measure_call_ms"]

log = logging.getLogger("edgeship.agent.adapt")


def read_thermal(root: str | os.PathLike = "/sys/class/thermal") -> dict | None:
    """SoC temperatures in °C: ``{"max_c", "zones": {type: c}}``, or None where the kernel has no thermal zones."""
    base = Path(root)
    zones: dict[str, float] = {}
    try:
        entries = sorted(base.glob("thermal_zone*"))
    except OSError:
        return None
    for z in entries:
        try:
            milli = int((z / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            kind = (z / "type").read_text().strip() or z.name
        except OSError:
            kind = z.name
        zones[f"{kind}" if kind not in zones else f"{kind}:{z.name}"] = round(milli / 1000.0, 1)
    if not zones:
        return None
    return {"max_c": max(zones.values()), "zones": zones}


def tick_lateness(due: float, now: float, interval_s: float, max_ticks: int = 1000) -> tuple[list[float], float]:
    """The lateness (ms) of every tick of a fixed ``interval_s`` grid due by ``now``, and the next tick's time.

    Pure. A thread woken ``now`` for the tick ``due`` was late by ``now - due``;
    ticks that fell due while it waited for a CPU were late too (by less):
    each is counted, as events arriving at a steady rate (frames, sensor
    samples) would each have waited. One sample per wake-up would count a
    20 ms stall once where a 5 ms event stream sees four or five late events
    (coordinated omission). At most ``max_ticks`` are returned.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    late: list[float] = []
    while due <= now and len(late) < max_ticks:
        late.append((now - due) * 1000.0)
        due += interval_s
    if due <= now:  # a stall longer than max_ticks intervals: skip the rest of the grid
        due = now + interval_s
    return late, due


def probe_cpu_wait(seconds: float, interval_s: float = 0.005, stop: threading.Event | None = None) -> Histogram:
    """How late a thread of this process wakes for ticks every ``interval_s`` (ms), for ``seconds``.

    The lateness is the time a thread that became runnable waited for a CPU
    (plus the timer's slack, tens of µs): what an application thread meets
    when its event (a frame, a socket, a timer) arrives on a busy device.
    Ticks missed during a stall are counted too (:func:`tick_lateness`).
    """
    hist = Histogram()
    ev = stop if stop is not None else threading.Event()
    end = time.monotonic() + seconds
    due = time.monotonic() + interval_s
    while time.monotonic() < end:
        if ev.wait(max(0.0, due - time.monotonic())):
            break
        late, due = tick_lateness(due, time.monotonic(), interval_s)
        hist.add_many(late)
    return hist


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """``/proc/pressure/*`` text → ``{"some": {"avg10", "avg60", "avg300", "total"}, "full": {...}}``. Pure.

    ``total`` is the cumulative stall time in µs (the exact figure; the
    ``avg*`` are decaying averages in percent). Lines that do not parse are
    left out; a text with no line that parses raises ``ValueError``.
    """
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        fields: dict[str, float] = {}
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq:
                break
            try:
                fields[key] = float(value)
            except ValueError:
                break
        if kind in ("some", "full") and "total" in fields:
            out[kind] = fields
    if not out:
        raise ValueError(f"not a pressure file: {text[:80]!r}")
    return out


def parse_loadavg(text: str) -> tuple[int, int]:
    """``/proc/loadavg`` text → (runnable tasks now, tasks in all), from its 4th field ``running/total``. Pure."""
    parts = text.split()
    try:
        running, total = parts[3].split("/")
        return int(running), int(total)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"not a loadavg line: {text[:80]!r}") from exc


def others_wait(running: int, ncpu: int) -> bool:
    """Whether tasks wait for a CPU, from ``running`` (``/proc/loadavg``, counted by a task that is running). Pure.

    The reader is in the count, and it runs for a few µs per reading: the
    question is whether the *other* runnable tasks outnumber the CPUs. With
    the reader counted, a device whose every core has one busy task would read
    "waiting" at every sample (the reader preempts one of them for those µs),
    where PSI reads ~1 %.
    """
    return running - 1 > max(1, ncpu)


def psi_fraction(prev_total_us: float, now_total_us: float, seconds: float) -> float | None:
    """The fraction of ``seconds`` in which some runnable task waited for a CPU, from two PSI ``total``s. Pure.

    None when the window is empty or the counter went backwards (nothing to judge).
    """
    if seconds <= 0 or now_total_us < prev_total_us:
        return None
    return min(1.0, (now_total_us - prev_total_us) / (seconds * 1e6))


class CpuPressure:
    """How much of the time since the last :meth:`read` runnable tasks waited for a CPU (0..1), and from where.

    The sources, best first (chosen once, at construction):

    * ``"psi"``: ``/proc/pressure/cpu``, the ``some`` line's cumulative
      ``total`` (µs) over the window: the exact share of the time in which
      runnable tasks waited for a CPU (averaged over the CPUs). Linux >= 4.20
      with PSI on; some kernels (e.g. Raspberry Pi OS) need ``psi=1`` on the
      kernel command line, without it reading the file fails;
    * ``"loadavg"``: any Linux. The check thread calls :meth:`tick` at each
      probe wake-up (every ``probe_ms``); it reads the number of runnable
      tasks in ``/proc/loadavg`` (one ~10 µs read) and counts the wake-ups at
      which other tasks waited for a CPU (:func:`others_wait`). The share of
      such wake-ups stands in for PSI's figure (measured here: 0-2 % quiet,
      100 % with 3 or 6 busy processes on 2 cores, where PSI read 51 % and
      100 %; both 0-1 % with 1 or 2);
    * ``None``: neither readable; :meth:`read` returns None (the policy then
      goes by the latency estimate alone, see docs/adapt.md).

    The per-thread run-queue wait of this process (``/proc/self/task/*/
    schedstat``) was measured too and not kept: summed over our threads it
    read a median 9 % of the time under 6 busy processes (0-1 % quiet) with a
    client at 200 requests/s, and less at lower request rates: the mean wait
    is small, it is the tail that misses the budget.

    Not a thread: the controller's check thread calls :meth:`tick` and
    :meth:`read`; a lock covers tests that call :meth:`read` from another.
    """

    def __init__(self, psi_path: str | os.PathLike = "/proc/pressure/cpu",
                 loadavg_path: str | os.PathLike = "/proc/loadavg", ncpu: int | None = None,
                 clock=time.monotonic) -> None:
        self.psi_path = Path(psi_path)
        self.loadavg_path = Path(loadavg_path)
        self.ncpu = int(ncpu or os.cpu_count() or 1)  # runnable counts are device-wide: all CPUs, not our affinity
        self.clock = clock
        self.source: str | None = None
        self._lock = threading.Lock()
        self._total: float | None = None  # PSI: the "some" total at the last read
        self._at = clock()
        self._ticks = self._waited = 0    # loadavg: wake-ups sampled / with others waiting since the last read
        try:
            self._total = parse_psi(self.psi_path.read_text())["some"]["total"]
            self.source = "psi"
        except (OSError, ValueError, KeyError):
            try:
                parse_loadavg(self.loadavg_path.read_text())
                self.source = "loadavg"
            except (OSError, ValueError):
                self.source = None

    def tick(self) -> None:
        """One probe wake-up: with the loadavg source, sample whether other tasks wait for a CPU now."""
        if self.source != "loadavg":
            return
        try:
            running, _ = parse_loadavg(self.loadavg_path.read_text())
        except (OSError, ValueError):
            return
        with self._lock:
            self._ticks += 1
            self._waited += others_wait(running, self.ncpu)

    def read(self) -> float | None:
        """The pressure since the previous call (or construction); None without a source or figures."""
        if self.source is None:
            return None
        if self.source == "loadavg":
            with self._lock:
                ticks, waited, self._ticks, self._waited = self._ticks, self._waited, 0, 0
            return waited / ticks if ticks else None
        now = self.clock()
        try:
            total = parse_psi(self.psi_path.read_text())["some"]["total"]
        except (OSError, ValueError, KeyError) as exc:  # the next good read covers this window too
            log.debug("adapt: CPU pressure unreadable: %s", exc)
            return None
        with self._lock:
            prev, self._total = self._total, total
            seconds, self._at = now - self._at, now
        return psi_fraction(prev, total, seconds) if prev is not None else None


def measure_interleaved(runs: Mapping[str, Any], feeds: Mapping[str, list], *, seconds: float = 1.0,
                        min_runs: int = 20, max_runs: int = 5000, chunks: int = 5) -> dict[str, dict]:
    """Time several models round-robin (one call each per round) for about ``seconds`` in total.

    Interleaving is on purpose: each call then finds the caches as cold as
    serving leaves them (a tight loop of one model reads optimistic figures,
    2-3x for tiny models), and a burst of load from another process hits
    every variant alike instead of deciding the choice. The time is split
    into ``chunks``; ``p95`` is the median of the chunks' p95s.
    Returns ``{id: {"p50", "p95", "runs"}}`` in ms.
    """
    ids = list(runs)
    for vid in ids:
        for _ in range(3):
            runs[vid](feeds[vid])
    chunk_p95: dict[str, list[float]] = {v: [] for v in ids}
    all_t: dict[str, list[float]] = {v: [] for v in ids}
    for _c in range(max(1, chunks)):
        times: dict[str, list[float]] = {v: [] for v in ids}
        deadline = time.perf_counter() + seconds / max(1, chunks)
        n = 0
        while n < max_runs // max(1, chunks) and (n < min_runs or time.perf_counter() < deadline):
            for vid in ids:
                t0 = time.perf_counter()
                runs[vid](feeds[vid])
                times[vid].append((time.perf_counter() - t0) * 1000.0)
            n += 1
        for vid in ids:
            chunk_p95[vid].append(float(np.percentile(times[vid], 95)))
            all_t[vid] += times[vid]
    return {v: {"p50": float(np.percentile(all_t[v], 50)), "p95": float(np.median(chunk_p95[v])),
                "runs": len(all_t[v])} for v in ids}


def measure_call_ms(run, feed: list[np.ndarray], *, seconds: float = 1.0, min_runs: int = 20,
                    max_runs: int = 5000, chunks: int = 5) -> dict:
    """Time one ``run(feed)`` alone (see :func:`measure_interleaved`): ``{"p50", "p95", "runs"}``."""
    return measure_interleaved({"m": run}, {"m": feed}, seconds=seconds, min_runs=min_runs, max_runs=max_runs,
                               chunks=chunks)["m"]
