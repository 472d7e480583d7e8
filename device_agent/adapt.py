"""Adapting to the device: run the most accurate package variant that meets a latency budget.

Given ``[adapt] latency_budget_ms``, :class:`AdaptController` (an agent
component) measures every variant of the active package at start-up and
switches to the most accurate one expected to meet the budget; then its
check thread estimates the p95 latency requests see (request p95 + CPU
wait p95), asks the pure :class:`~edgeship.agent.adapt_policy.AdaptPolicy`
whether to move, and moves through the agent's zero-drop swap. What is
measured, why, and the figures behind each choice: ``docs/adapt.md``.

Three layers: :mod:`~edgeship.agent.adapt_policy` (pure decisions),
:mod:`~edgeship.agent.adapt_probes` (reading the device) and this module
(the component, its thread and the swap). Every public name of the three is
importable from here. Without a budget the start-up choice is
:mod:`~edgeship.agent.adapt_choice`'s (the fastest variant within the
accuracy budget); with one, this controller's, which stops a chooser still
timing: one choice, reported the same way.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeshipError
from ..lifecycle import STOP_TIMEOUT_S, Loop
from ..metrics import Histogram
from .adapt_choice import example_feed, machine_info, publish_choice, stop_choice
from .adapt_policy import (
    AdaptPolicy,
    Decision,
    Rung,
    accuracy_budget,
    accuracy_drops,
    choose_batch_delay,
    choose_fastest,
    choose_threads,
    choose_variant,
    eligible_variants,
    request_estimate,
    variant_accuracy,
)
from .adapt_probes import (
    CpuPressure,
    measure_call_ms,
    measure_interleaved,
    others_wait,
    parse_loadavg,
    parse_psi,
    probe_cpu_wait,
    psi_fraction,
    read_thermal,
    tick_lateness,
)

__all__ = ["Rung", "Decision", "AdaptPolicy", "choose_variant", "choose_threads", "choose_batch_delay",
           "variant_accuracy", "request_estimate", "read_thermal", "measure_call_ms", "measure_interleaved",
           "tick_lateness", "probe_cpu_wait", "parse_psi", "parse_loadavg", "psi_fraction", "others_wait",
           "CpuPressure", "AdaptController", "accuracy_drops", "accuracy_budget", "eligible_variants",
           "choose_fastest"]

log = logging.getLogger("edgeship.agent.adapt")


def _explicit(config: Any, section: str, key: str) -> bool:
    """Whether the agent's config *file* sets ``[section] key`` (defaults cannot tell "unset" from "set")."""
    path = getattr(config, "source_path", None)
    if not path:
        return True  # a programmatic config: treat every value as chosen
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return key in (data.get(section) or {})


# --------------------------------------------------------------------------- the component

class AdaptController(Loop):
    """Agent component: variant choice at start-up, then the policy loop on its own thread.

    ``agent`` is the running :class:`~edgeship.agent.Agent` (its ``store``,
    ``handle``, ``metrics``, ``load_candidate``, ``switch_to``). Settings come
    from ``[adapt]``; keyword arguments override them (tests, benchmarks).
    ``thermal_root`` and ``clock`` exist for tests.
    """

    def __init__(self, agent: Any, *, budget_ms: float | None = None, check_s: float | None = None,
                 sustain_s: float | None = None, headroom_s: float | None = None, headroom: float | None = None,
                 cooldown_s: float | None = None, min_samples: int | None = None, hot_c: float | None = None,
                 measure_s: float | None = None, tune: bool | None = None, min_checks: int = 3,
                 probe_ms: float | None = None, pressure_max: float | None = None,
                 thermal_root: str | os.PathLike = "/sys/class/thermal", psi_path: str | os.PathLike =
                 "/proc/pressure/cpu", loadavg_path: str | os.PathLike = "/proc/loadavg",
                 clock=time.monotonic) -> None:
        super().__init__("edgeship-adapt")
        self.agent = agent
        cfg = getattr(getattr(agent, "config", None), "adapt", None)

        def pick(value, name, default):
            if value is not None:
                return value
            v = getattr(cfg, name, None) if cfg is not None else None
            return default if v is None else v

        self.budget_ms = pick(budget_ms, "latency_budget_ms", None)
        self.check_s = float(pick(check_s, "check_s", 1.0))
        self.sustain_s = float(pick(sustain_s, "sustain_s", 10.0))
        self.headroom_s = float(pick(headroom_s, "headroom_s", 30.0))
        self.headroom = float(pick(headroom, "headroom", 0.8))
        self.cooldown_s = pick(cooldown_s, "cooldown_s", None)
        self.min_samples = int(pick(min_samples, "min_samples", 20))
        self.hot_c = float(pick(hot_c, "hot_c", 80.0))
        self.measure_s = float(pick(measure_s, "measure_s", 1.0))
        # The CPU-wait probe's sleep: ~1000/probe_ms wake-ups a second on the check thread.
        self.probe_ms = float(pick(probe_ms, "probe_ms", 10.0))
        # No step up while tasks waited for a CPU in more than this share of a check window (see CpuPressure).
        self.pressure_max = float(pick(pressure_max, "pressure_max", 0.2))
        self.psi_path, self.loadavg_path = psi_path, loadavg_path
        self._cpu: CpuPressure | None = None  # made at start(): the source is probed once
        self.tune = bool(pick(tune, "tune", True))
        self.min_checks = int(min_checks)
        self.thermal_root = thermal_root
        self.clock = clock
        self.policy: AdaptPolicy | None = None
        self.rungs: list[Rung] = []
        self.measurements: dict[str, dict] = {}
        self.choice_reason: str | None = None
        self.threads: int | None = None
        self.thread_p95: dict[int, float] = {}
        self.max_delay_ms: float | None = None
        self.base_ms: float | None = None           # start-up CPU wait p95 + batch delay (see choose_variant)
        self.startup_wait_ms: float | None = None
        self.last: dict = {}
        self._sha: str | None = None
        self._events: collections.deque = collections.deque(maxlen=50)   # all recent changes (health)
        self._unsent: collections.deque = collections.deque(maxlen=50)   # changes not yet in a telemetry window
        self._lock = threading.Lock()
        self._prev_hist: dict | None = None
        self._wait = Histogram()  # CPU-wait probe samples since the last judged check; under _lock
        # The fastest variant, loaded and warm beside the running one: under a heavy load the step down goes
        # there ("none fits: the fastest"), and loading it then costs seconds (the runtime re-verifies the
        # whole package on load; ~4 s for 80 MB under 6 busy processes on 2 cores). One small extra runner,
        # like the agent's previous model kept for an instant rollback. Owned by the check thread.
        self._standby: Any = None
        self.ready = threading.Event()

    # -- start-up measurement -------------------------------------------------
    def _example(self, handle: Any) -> list[np.ndarray]:
        fed = example_feed(handle)
        if fed is None:  # a variable size and no example: the smallest the shape allows
            return [np.zeros((1, *(max(1, d) for d in s)), t) for s, t in zip(handle.sample_shapes, handle.dtypes)]
        return fed[0]

    def _time(self, handle: Any, batch: int = 1) -> dict:
        feed = self._example(handle)
        if batch > 1:
            feed = [np.ascontiguousarray(np.repeat(f, batch, axis=0)) for f in feed]
        packer_run = handle.run_fn()
        return measure_call_ms(packer_run, feed, seconds=self.measure_s)

    def _with_threads(self, threads: int | None) -> None:
        # The measured thread count becomes the agent's runtime setting, so later loads (rollouts) use it too.
        self.agent.config = self.agent.config.replace(runtime={"threads": threads})

    def _select(self) -> None:
        """Measure the active package's variants (and threads, batch delay) and switch to the best one."""
        agent = self.agent
        stop_choice(agent)  # the start-up choice is this one under a budget: a chooser still timing stands down
        handle = agent.handle
        sha = handle.sha256
        manifest = handle.manifest
        variants = [v for v in manifest.get("variants") or [] if v.get("id")]
        backend = agent.config.runtime.backend
        if backend:
            variants = [v for v in variants if v.get("runtime") == backend] or variants
        t0 = time.monotonic()
        if self.tune and agent.config.runtime.threads is None:
            ncpu = max(1, min(4, os.cpu_count() or 1))
            for t in range(1, ncpu + 1):
                self._with_threads(t)
                h = agent.load_candidate(sha, variant=handle.variant)
                try:
                    self.thread_p95[t] = self._time(h)["p95"]
                finally:
                    h.close()
            self.threads = choose_threads(self.thread_p95)
            self._with_threads(self.threads)
        rungs, loaded = [], {}
        for v in variants:
            try:
                loaded[v["id"]] = agent.load_candidate(sha, variant=v["id"])
            except EdgeshipError as exc:  # a variant this device cannot run (e.g. no TFLite runtime) is skipped
                self.measurements[v["id"]] = {"error": str(exc)}
        if loaded:
            measured = measure_interleaved({vid: h.run_fn() for vid, h in loaded.items()},
                                           {vid: self._example(h) for vid, h in loaded.items()},
                                           seconds=self.measure_s * len(loaded))
            for v in variants:
                m = measured.get(v["id"])
                if m is not None:
                    self.measurements[v["id"]] = m
                    rungs.append(Rung(v["id"], variant_accuracy(v), m["p95"], m["p50"]))
        if not rungs:
            log.warning("adapt: no variant could be measured; keeping %s", handle.variant)
            return
        # What the device adds to any variant's call for a request: the CPU wait now, and the batch delay a
        # lone request waits for company (the agent's own path, tens of µs, is left to the check loop).
        wait = probe_cpu_wait(min(1.0, max(0.2, self.measure_s)), self.probe_ms / 1000.0, self._stopping)
        self.startup_wait_ms = wait.percentile(95) if wait.count else 0.0
        delay_ms = agent.batcher.policy.max_delay_s * 1000.0 if agent.batcher is not None else 0.0
        self.base_ms = float(self.startup_wait_ms + delay_ms)
        best, reason = choose_variant(rungs, self.budget_ms, self.base_ms)
        self.rungs = rungs
        self.choice_reason = reason
        self._drop_standby()
        fastest = min(rungs, key=lambda r: r.p95_ms)
        for vid, h in loaded.items():
            if vid == fastest.id and vid != best.id and self.budget_ms is not None:
                self._standby = h  # the step down under heavy load needs no load (see _standby)
            elif vid != best.id:
                h.close()
        previous = handle.variant
        agent.switch_to(loaded[best.id])
        self._sha = sha
        now = self.clock()
        if self.budget_ms is not None:
            self.policy = AdaptPolicy(rungs, self.budget_ms, best.id, sustain_s=self.sustain_s,
                                      headroom_s=self.headroom_s, headroom=self.headroom, cooldown_s=self.cooldown_s,
                                      min_samples=self.min_samples, hot_c=self.hot_c, min_checks=self.min_checks,
                                      base_ms=self.base_ms or 0.0, pressure_max=self.pressure_max)
            self.policy.started(best.id, now)  # a trial: a quiet step down from it backs off (AdaptPolicy)
        if self.tune and not _explicit(agent.config, "batcher", "max_delay_ms") and agent.batcher is not None:
            mb = agent.config.batcher.max_batch
            b1 = self.measurements[best.id]["p50"]
            bn = self._time(agent.handle, batch=mb)["p50"] if mb > 1 else b1
            self.max_delay_ms = choose_batch_delay(b1, bn, mb, self.budget_ms)
            agent.batcher.policy.max_delay_s = self.max_delay_ms / 1000.0
        default = next((v["id"] for v in variants if v.get("default")), variants[0]["id"] if variants else None)
        publish_choice(agent, {"mode": "latency_budget", "default": default, "variant": best.id, "reason": reason,
                               "budget_ms": self.budget_ms, "at": time.time(), "machine": machine_info(),
                               "excluded": {k: v["error"] for k, v in self.measurements.items() if "error" in v},
                               "measured": {r.id: {"b1_ms": round(r.p50_ms or r.p95_ms, 4), "bn_ms": None,
                                                   "batch": 1, "p95_ms": round(r.p95_ms, 4)} for r in rungs},
                               "measure_s": round(time.monotonic() - t0, 3)})
        self._record({"action": "start", "from_id": previous, "to_id": best.id, "reason": reason, "at": time.time(),
                      "p95_ms": best.p95_ms, "base_ms": self.base_ms,
                      "pressure_source": self._cpu.source if self._cpu is not None else None,
                      "temp_c": (read_thermal(self.thermal_root) or {}).get("max_c"),
                      "measure_s": round(time.monotonic() - t0, 2)})
        self._reset_windows()

    def _reset_windows(self) -> None:
        """Start the next check window now: request latencies, CPU-wait samples and CPU pressure from here on."""
        self._prev_hist = self.agent.metrics.snapshot().get("latency_ms")
        if self._cpu is not None:
            self._cpu.read()
        with self._lock:
            self._wait.reset()

    def _record(self, event: dict) -> None:
        with self._lock:
            self._events.append(event)
            self._unsent.append(event)
        log.info("adapt: %s %s -> %s: %s", event["action"], event.get("from_id"), event["to_id"], event["reason"])

    # -- lifecycle ------------------------------------------------------------
    def _on_start(self) -> bool:
        """Measure and choose (``start()`` blocks, bounded by ``measure_s`` per variant); a check loop with a budget."""
        if self._cpu is None:
            self._cpu = CpuPressure(self.psi_path, self.loadavg_path)
        if self.agent.handle is not None:
            try:
                self._select()
            except EdgeshipError as exc:  # adapting is an optimisation: serve the configured variant instead
                log.warning("adapt: start-up selection failed, keeping the configured variant: %s", exc)
        self.ready.set()
        return self.policy is not None  # no budget: nothing to check, no thread

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        stopped = super().stop(timeout)
        self._drop_standby()
        return stopped

    def _drop_standby(self) -> None:
        h, self._standby = self._standby, None
        if h is not None:
            h.close()

    def _refill_standby(self, sha: str) -> None:
        """Load the fastest variant again after the standby was used and the agent moved up (quiet times)."""
        if self._standby is not None or not self.rungs or self.policy is None:
            return
        fastest = min(self.rungs, key=lambda r: r.p95_ms)
        if fastest.id == self.policy.current:
            return
        try:
            self._standby = self.agent.load_candidate(sha, variant=fastest.id)
        except EdgeshipError as exc:
            log.warning("adapt: could not keep %s ready: %s", fastest.id, exc)

    def run(self) -> None:
        # Between checks this thread is the CPU-wait probe: it wakes on a probe_ms tick grid and records how
        # late each tick was served (see docs/adapt.md). One thread, so the probe costs no extra thread.
        interval = self.probe_ms / 1000.0
        next_check = time.monotonic() + self.check_s
        due = time.monotonic() + interval  # the probe's tick grid (see tick_lateness)
        while True:
            if self.wait(min(due, next_check) - time.monotonic()):
                return
            t1 = time.monotonic()
            if t1 >= due:
                late, due = tick_lateness(due, t1, interval)
                with self._lock:
                    for ms in late:  # usually one: a plain add is cheaper than a vectorised one
                        self._wait.add(ms)
                if self._cpu is not None:
                    self._cpu.tick()  # the loadavg pressure source samples here (a no-op with PSI)
            if t1 >= next_check:
                next_check = t1 + self.check_s
                try:
                    self.check()
                except Exception as exc:  # noqa: BLE001 - one failed check (e.g. a load error) must not end adapting
                    log.warning("adapt check failed: %s", exc)
                # Restart the grid: the time this thread spent checking (a swap takes ~1 s) is not CPU wait.
                due = time.monotonic() + interval

    def check(self) -> Decision | None:
        """One check: request p95 + CPU-wait p95 since the last judged check → policy → maybe switch."""
        from .telemetry import hist_delta

        agent = self.agent
        handle = agent.handle
        if handle is None or self.policy is None:
            return None
        if handle.sha256 != self._sha:  # a rollout installed another package: measure its variants
            self._select()
            return None
        if handle.variant != self.policy.current and handle.variant in {r.id for r in self.rungs}:
            self.policy.switched(handle.variant, self.clock())  # someone else switched: follow
        now_hist = agent.metrics.snapshot().get("latency_ms")
        window = hist_delta(now_hist, self._prev_hist)
        h = Histogram.from_dict(window) if window else None
        request_p95 = h.percentile(95) if h is not None and h.count else None
        samples = h.count if h is not None else 0
        with self._lock:
            wait_p95 = self._wait.percentile(95) if self._wait.count else None
            probes = self._wait.count
        p95 = request_estimate(request_p95, wait_p95)
        thermal = read_thermal(self.thermal_root)
        temp = thermal["max_c"] if thermal else None
        self.last = {"p95_ms": p95, "request_p95_ms": request_p95, "cpu_wait_p95_ms": wait_p95, "requests": samples,
                     "probes": probes, "temp_c": temp, "variant": self.policy.current, "at": time.time(),
                     "cpu_pressure": self.last.get("cpu_pressure"),
                     "pressure_source": self._cpu.source if self._cpu is not None else None}
        if samples < self.min_samples and not (wait_p95 is not None and wait_p95 > self.policy.budget_ms
                                               and probes >= self.min_samples):
            # Too few requests to judge (idle): keep accumulating into the next check instead of judging a
            # p95 of three requests. Starved by load is judged: the CPU wait alone is over the budget.
            return None
        # The pressure over the same window as the request and probe figures (read here, not in _reset_windows:
        # a window that was not judged accumulates into the next one, the pressure too).
        pressure = self._cpu.read() if self._cpu is not None else None
        self.last["cpu_pressure"] = pressure
        self._reset_windows()
        d = self.policy.observe(self.clock(), p95, samples, temp, cpu_wait_ms=wait_p95, pressure=pressure)
        self.last["up_outlook"] = self.policy.outlook  # why the agent does (not) step up: both figures
        if d is None:
            return None
        decided = time.time()
        t0 = time.monotonic()
        standby = self._standby
        use_standby = standby is not None and standby.sha256 == handle.sha256 and standby.variant == d.to_id
        try:
            if use_standby:
                self._standby = None  # the agent owns it from here (it closes replaced models)
                new = standby
            else:
                new = agent.load_candidate(handle.sha256, variant=d.to_id)
            agent.switch_to(new)
        except EdgeshipError as exc:
            log.warning("adapt: switching to %s failed, staying on %s: %s", d.to_id, d.from_id, exc)
            if use_standby:
                standby.close()  # not adopted by the agent (e.g. the device is pinned): ours to close
            self.policy.switched(d.from_id, self.clock())
            return None
        self._reset_windows()  # judge the new variant on its own requests
        # The swap (verify + load + warm the new variant beside the old) is part of the time to adapt: report it.
        self._record({**d.to_dict(), "at": time.time(), "decided_at": decided,
                      "swap_s": round(time.monotonic() - t0, 3), "standby": use_standby})
        if d.action == "up":
            self._refill_standby(handle.sha256)
        return d

    # -- reporting ------------------------------------------------------------
    def telemetry_fields(self) -> dict:
        """The ``adapt`` field of one telemetry window: current variant, budget, last p95, temperature, changes."""
        with self._lock:
            events = list(self._unsent)
            self._unsent.clear()
        return {"adapt": {"variant": getattr(self.agent.handle, "variant", None), "budget_ms": self.budget_ms,
                          "p95_ms": self.last.get("p95_ms"), "request_p95_ms": self.last.get("request_p95_ms"),
                          "cpu_wait_p95_ms": self.last.get("cpu_wait_p95_ms"), "temp_c": self.last.get("temp_c"),
                          "cpu_pressure": self.last.get("cpu_pressure"),
                          "threads": self.threads, "max_delay_ms": self.max_delay_ms,
                          "measured_p95_ms": {k: round(v["p95"], 4) for k, v in self.measurements.items()
                                              if "p95" in v},
                          "served_p95_ms": self._served(),
                          "changes": events}}

    def _served(self) -> dict:
        """Each variant's served figure (request p95 in quiet times, see AdaptPolicy), rounded, for reports."""
        policy = self.policy
        if policy is None:
            return {}
        return {k: round(v["p95_ms"], 4) for k, v in dict(policy.served).items()}

    def health(self) -> dict:
        with self._lock:
            events = list(self._events)[-5:]
        return {"adapt": {"variant": getattr(self.agent.handle, "variant", None), "budget_ms": self.budget_ms,
                          "choice": self.choice_reason, "base_ms": self.base_ms, "last": dict(self.last),
                          "pressure_source": self._cpu.source if self._cpu is not None else None,
                          "pressure_max": self.pressure_max,
                          "standby": getattr(self._standby, "variant", None),
                          "threads": self.threads,
                          "thread_p95_ms": dict(self.thread_p95), "max_delay_ms": self.max_delay_ms,
                          "measurements": dict(self.measurements), "served_p95_ms": self._served(),
                          "recent_changes": events}}
