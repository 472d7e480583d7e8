"""Adapting to the device: run the most accurate package variant that meets a latency budget.

A package may hold several variants of one model (an int8 student, an fp32
student, a larger fp32 model, ...) with their measured accuracy. Given
``[adapt] latency_budget_ms``, :class:`AdaptController` (an agent component):

1. at start-up measures every variant on *this* device (load, warm, time
   batch-1 model calls for ``measure_s``; p95) and the device's CPU wait
   (below), and switches to the most accurate variant whose expected request
   latency meets the budget (:func:`choose_variant`);
2. then every ``check_s`` seconds estimates the p95 latency requests see now
   (below) and asks the pure :class:`AdaptPolicy` whether to move: over
   budget in most checks of the last ``sustain_s`` → step down to the most
   accurate faster variant expected to fit; headroom for the next more
   accurate variant in nearly every check of the last ``headroom_s``, with
   the CPU pressure low (below) and the SoC not hot → step up one rung. A
   variant is judged on the larger of its start-up figure and what it
   served the last time it ran at low CPU pressure (below). After a switch
   nothing moves for ``cooldown_s`` (with the asymmetric windows, the
   hysteresis that stops flapping);
3. switches through the agent's zero-drop swap (``load_candidate`` +
   ``switch_to``: the new variant is loaded and warmed beside the running
   one and takes over between two batches), and reports every change and
   its reason in the telemetry window's ``adapt`` field and in ``health()``.

What the budget is about, and what is measured
----------------------------------------------
``latency_budget_ms`` is the p95 latency the *application* sees for one
request on this device, not the model's compute time. Under CPU contention
(other processes, a throttled SoC) the model call itself barely moves when
it is short: it rarely spans a scheduler time slice. What grows is the wall
time around it, in two places:

* inside the agent, from ``submit`` to the result: queueing in front of the
  batcher, the batch delay, the hand-off to the batcher thread and its wait
  for a CPU. The agent already records this per request
  (``agent.metrics.latency_ms``, submit → model output, model-served and
  cache hits alike); its p95 over the check window is the **request** part;
* before the request reaches the agent: the application's thread (a camera
  callback, an HTTP handler, a timer) becomes runnable when its event comes
  and then waits for a CPU. With inline execution (the API caller runs the
  batch itself when the runner is free) this is the *only* place a CPU load
  shows, and no span inside the agent can see it. The controller's own
  thread measures it as any such thread meets it: it sleeps ``probe_ms`` at
  a time on a fixed tick grid and records how late it wakes for each tick (a
  ``cyclictest``-style probe, 1000/``probe_ms`` wake-ups per second, a few
  µs of CPU each). Ticks that fell due while it waited all count, as events
  arriving at a steady rate would each have waited (:func:`tick_lateness`);
  the window p95 is the **CPU wait** part.

The estimate checked against the budget is ``request p95 + CPU wait p95``
(the two waits happen one after the other for one request; adding the p95s
errs on the side of stepping down). The benchmark (``benchmarks/adapt.py``)
compares it with the latency its steady-rate client measures from each
request's scheduled send time to its result. The bare model-call time
(``agent.metrics.inference_ms``) was the previous signal; under 6 busy
processes on 2 cores it did not move (~0.1 ms), while the client saw
milliseconds. Queueing caused by the request rate itself (more requests than
the variant can serve) shows in the request part, and stepping down is the
right answer to it too.

Why the estimate cannot tell that a load is gone: the CPU pressure gate
----------------------------------------------------------------------
Under a steady load the probe under-reads, erratically. Measured on a 2-core
VM (Linux 6.18, EEVDF scheduler) with 6 busy processes, threads ticking
every 5 ms in separate processes, p95 lateness per 2.5 s window: a tick that
does no work (the probe) read 0.13-2.4 ms, jumping between windows (0.13 ms
in the middle of the load); ticks doing 0.05 / 0.3 / 1 ms of work per
wake-up read 1.7-3.2 / 3.5-4.7 / 6-9 ms in every window; all read
0.13-0.3 ms quiet. How long a waking thread waits for a CPU depends on how
much CPU it uses per wake-up: a thread that ran a few µs since it last
slept is owed CPU time and preempts the busy processes almost at once; one
that does real work per wake-up (serving a request) waits behind their
slices. A probe cheap enough to run all the time is of the first kind, the
threads that serve requests are of the second, so no such probe can stand
for them: in the benchmark it read ~0.1-0.2 ms for seconds while the client
saw 3-4 ms, and the agent stepped up into the load (2 runs of 7). At the
onset the probe reads high and the request part grows, so the step *down*
stays on the estimate.

A step *up* needs, in the same checks that have room, the window's CPU
pressure at most ``pressure_max`` (``[adapt]``, default 0.2): the share of
the time runnable tasks waited for a CPU (:class:`CpuPressure`: PSI,
``/proc/pressure/cpu``, where the kernel has it; else sampled from
``/proc/loadavg`` at each probe tick). It does not depend on how much work
anyone does per wake-up: 0-2 % quiet and 100 % in every check under 6 busy
processes on 2 cores, from either source. Without either (no Linux /proc)
the policy goes by the estimate alone, as before. A device whose own work
keeps the pressure above ``pressure_max`` does not step up: a more accurate
variant would wait for a CPU there too. The back-off (below) still covers
what the pressure cannot see (a throttled SoC is slow, not contended).

Learning from what was served
-----------------------------
The start-up figures can be wrong for the whole run: measured in a quiet
moment of a shared device, in a tight loop that serving at a steady rate
does not reproduce, and without the queueing a slower variant causes at the
device's request rate. On the benchmark's 2-core VM the agent once measured
the fp32 variant 30 % faster than the benchmark had seconds before (2.93 vs
4.23 ms), chose it, served it at ~3.9 ms against a 3.3 ms budget, stepped
down (quiet, CPU pressure 1 %) and, 10 s later, stepped up to it again on
the same start-up figure. So the policy keeps, per variant, the request
estimate it saw while serving it at low (known) CPU pressure — its *served*
figure — and a step up needs that within the budget as well as the start-up
expectation within the headroom; the start-up choice counts as a trial, so
a quiet step down from it doubles the time before it is tried again (the
back-off). Both are remembered for 4 x ``headroom_s`` x the back-off, then
the variant gets a new trial.

The start-up timing stays the median of the chunks' p95s
(:func:`measure_interleaved`); a more cautious statistic (the larger of the
medians of two rounds of chunks) was tried and dropped. A start-up figure
that is too *high* is never corrected — served figures only ever add
caution — and can keep the agent below a variant that fits; one too low is
what serving corrects. On the shared VM both statistics at times read a
burst of other work as the int8 variant's speed (1.6-2.1 ms where it serves
at 1.0-1.4 ms: the cautious one in 3 of 18 measurements, the median in 1 of
12), and the agent's and the benchmark's figures for one variant, taken
seconds apart, differed by -31 % to +23 %: no start-up statistic sees a
device that changes speed after it measured.

At start-up there are no requests yet: a variant's expected latency is its
model-call p95 plus a *base*: the CPU wait p95 measured then and the
batcher's ``max_delay_ms`` (a lone request waits that long for company).
The agent's own per-request path (tens of µs) is not in it; when it matters
the check loop corrects the choice within ``sustain_s`` (down) or
``headroom_s`` (up). A Raspberry Pi slows down when hot: the SoC temperature
(``/sys/class/thermal``, where present) is read at each check, reported,
named in the reasons, and blocks stepping up while at or above ``hot_c``.

Bounds: under a load that pushes the estimate over the budget the agent steps
down within ``sustain_s`` + ``check_s`` + one swap; once the load is gone it
steps back up within ``cooldown_s`` (if it had just switched) + ``headroom_s``
+ ``check_s`` + one swap, the headroom doubled per recent failed step-up (the
back-off in :class:`AdaptPolicy`), to the variant it served before the load
(one whose served figure is over the budget is not stepped up to). A swap
loads, verifies and warms the new variant beside the running one; the
runtime re-verifies the whole package on every load, which under a heavy CPU
load takes seconds for a large package. So the fastest variant, where a
heavy load sends the agent, is kept loaded and warm (one small extra runner, like the agent's previous model kept for
an instant rollback): the urgent step down costs no load; the step back up
(in quiet times) loads as usual, and then the standby is loaded again.

Threads and batch delay are measured too, when the config leaves them open:
``[runtime] threads`` unset → the variant is timed with 1..min(4, cores)
threads and :func:`choose_threads` keeps the fewest within 5 % of the best;
``[batcher] max_delay_ms`` not in the config file → :func:`choose_batch_delay`
picks it from the measured batch-1 and full-batch call times.

Pure parts (no threads, no clocks — time is passed in): :func:`choose_variant`,
:class:`AdaptPolicy`, :func:`choose_threads`, :func:`choose_batch_delay`,
:func:`variant_accuracy`, :func:`request_estimate`, :func:`tick_lateness`,
:func:`parse_psi`, :func:`psi_fraction`, :func:`parse_loadavg`, :func:`others_wait`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import EdgeshipError
from ..metrics import Histogram

__all__ = ["Rung", "Decision", "AdaptPolicy", "choose_variant", "choose_threads", "choose_batch_delay",
           "variant_accuracy", "request_estimate", "read_thermal", "measure_call_ms", "measure_interleaved",
           "tick_lateness", "probe_cpu_wait", "parse_psi", "parse_loadavg", "psi_fraction", "others_wait",
           "CpuPressure", "AdaptController"]

log = logging.getLogger("edgeship.agent.adapt")

_PRECISION_RANK = {"fp64": 4, "fp32": 3, "float32": 3, "fp16": 2, "float16": 2, "int8": 1, "uint8": 1}
_METRIC_KEYS = ("points", "top1", "agreement", "cosine", "accuracy")


# --------------------------------------------------------------------------- pure choices

def variant_accuracy(variant: Mapping) -> tuple:
    """A sort key, higher = more accurate: measured points/metric first, then precision, then file size."""
    m = variant.get("metrics") or {}
    acc = next((float(m[k]) for k in _METRIC_KEYS if isinstance(m.get(k), (int, float))), None)
    if acc is not None and "points" not in m and acc <= 1.0:
        acc *= 100.0  # a 0..1 metric on the points scale, so variants with either compare
    return (acc if acc is not None else float("-inf"), _PRECISION_RANK.get(str(variant.get("precision")), 0),
            float(m.get("size") or 0))


@dataclasses.dataclass(frozen=True)
class Rung:
    """One variant on the ladder: its id, accuracy key and start-up p95 (ms) on this device."""

    id: str
    accuracy: tuple
    p95_ms: float
    p50_ms: float | None = None


def choose_variant(rungs: Sequence[Rung], budget_ms: float | None, base_ms: float = 0.0) -> tuple[Rung, str]:
    """The most accurate rung whose expected request p95 meets the budget, else the fastest; with the reason.

    A rung's expected request p95 is its model-call p95 plus ``base_ms``: what
    the device adds to every request whatever the variant (the CPU wait and
    the batch delay measured at start-up, see the module docstring).
    """
    if not rungs:
        raise ValueError("no variant to choose from")
    ordered = sorted(rungs, key=lambda r: r.accuracy, reverse=True)
    if budget_ms is None:
        return ordered[0], "no latency budget: the most accurate variant"
    base = max(0.0, float(base_ms))
    base_txt = f" + {base:.3f} ms CPU wait and batch delay" if base else ""
    fits = [r for r in ordered if r.p95_ms + base <= budget_ms]
    if fits:
        r = fits[0]
        slower = [o.id for o in ordered[:ordered.index(r)]]
        extra = f"; more accurate {', '.join(slower)} over budget" if slower else ""
        return r, f"most accurate variant within {budget_ms:g} ms (model p95 {r.p95_ms:.3f} ms{base_txt}){extra}"
    r = min(ordered, key=lambda o: o.p95_ms)
    return r, f"no variant meets {budget_ms:g} ms; the fastest (model p95 {r.p95_ms:.3f} ms{base_txt})"


def request_estimate(request_p95_ms: float | None, cpu_wait_p95_ms: float | None) -> float | None:
    """The p95 latency an application sees now: the agent's submit → result p95 plus the CPU wait p95.

    The two happen one after the other for one request (its thread waits for
    a CPU, then the agent serves it); adding the p95s errs towards stepping
    down. None without request figures (nothing to judge).
    """
    if request_p95_ms is None:
        return None
    return float(request_p95_ms) + max(0.0, float(cpu_wait_p95_ms or 0.0))


def choose_threads(p95_by_threads: Mapping[int, float], tolerance: float = 0.05) -> int:
    """The fewest threads whose p95 is within ``tolerance`` of the best (more threads cost CPU others need)."""
    if not p95_by_threads:
        raise ValueError("no thread measurement")
    best = min(p95_by_threads.values())
    return min(t for t, v in p95_by_threads.items() if v <= best * (1.0 + tolerance))


def choose_batch_delay(call_ms_b1: float, call_ms_bn: float, max_batch: int, budget_ms: float | None = None,
                       min_gain: float = 0.2) -> float:
    """Batcher ``max_delay_ms`` from measured call times at batch 1 and at ``max_batch``.

    When a full batch saves less than ``min_gain`` of the per-sample time,
    waiting buys nothing: 0 (answer at once). Otherwise wait about one
    full-batch call (a batch fills while the previous one runs), and never so
    long that waiting plus that call exceeds the budget.
    """
    if max_batch <= 1 or call_ms_b1 <= 0:
        return 0.0
    gain = 1.0 - (call_ms_bn / max_batch) / call_ms_b1
    if gain < min_gain:
        return 0.0
    delay = call_ms_bn
    if budget_ms is not None:
        delay = min(delay, max(0.0, budget_ms - call_ms_bn))
    return round(float(delay), 3)


@dataclasses.dataclass(frozen=True)
class Decision:
    """A move on the ladder: ``action`` is "down" or "up"."""

    action: str
    from_id: str
    to_id: str
    reason: str
    at: float
    p95_ms: float | None
    temp_c: float | None
    cpu_wait_ms: float | None = None  # the CPU-wait part of p95_ms (median over the deciding checks)
    cpu_pressure: float | None = None  # share of the time tasks waited for a CPU (median over the deciding checks)
    expected_ms: float | None = None  # what the policy expected of to_id: the larger of the figures below
    basis: str | None = None          # which figure that was: "start-up" or "served" (see AdaptPolicy)
    backoff: float | None = None      # a down that is a failed step up: the headroom multiple from_id needs next

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AdaptPolicy:
    """When to change variant, with hysteresis. Pure: ``observe`` gets the time and the figures.

    ``rungs``: the measured variants (any order); ``current``: the id running.
    ``observe`` gets the request-latency estimate of a check window
    (:func:`request_estimate`: what the application sees, CPU wait included).
    A rung's start-up estimate is its model-call p95 plus ``base_ms`` (the
    start-up CPU wait and batch delay, as in :func:`choose_variant`). The
    observed p95 over the current rung's estimate is the device's *slowdown*
    right now (load, heat): stepping down picks the most accurate faster rung
    whose estimate times that slowdown fits; stepping up expects the better
    rung at its model-call p95 plus the time the device adds now (observed
    minus the current rung's model-call p95).

    Each check is classified ``over`` (p95 above the budget), ``room`` (the
    next more accurate variant is expected within ``headroom`` x budget, the
    CPU ``pressure`` is at most ``pressure_max`` or unknown, and the SoC is
    below ``hot_c``), ``ok`` or not judged (fewer than
    ``min_samples`` requests, unless the CPU wait alone is over budget: then
    ``over``). One check's p95 is noisy on a busy device, so a
    move needs a window of checks: **down** when at least ``over_fraction``
    of the judged checks of the last ``sustain_s`` were over budget; **up**
    (one rung) when at least ``room_fraction`` of those of the last
    ``headroom_s`` had room. Quick to step down, slow and strict to step up,
    and nothing moves for ``cooldown_s`` after a switch: that asymmetry is
    the hysteresis that keeps a device hovering near its budget from flapping.

    **Back-off.** A rung left again soon after stepping up to it needs twice
    the headroom time next time (at most :attr:`MAX_BACKOFF` x), forgiven once
    it holds. The start-up choice is such a trial too (:meth:`started`): it
    was made on start-up figures alone. A step down that the CPU pressure
    explains (median of the deciding checks above ``pressure_max``: a load
    came) is not a failed step up: loads are the pressure gate's business.

    **Served figures: learning from what a rung actually served.** The
    start-up figures can be optimistic: measured in a quiet moment, in a
    tight loop that serving at a steady rate does not reproduce, and without
    the queueing a slower variant causes at the device's request rate. On
    the benchmark's shared 2-core VM the agent once measured the fp32
    variant 30 % faster than it then served, chose it, stepped down from it
    (quiet, over budget), and 10 s later stepped up to it again on the same
    figure. So at every judged check with the CPU pressure *known* and at
    most ``pressure_max`` and the SoC not hot, the current rung's estimate is
    kept; the median of those of its last ``max(sustain_s, headroom_s)``,
    once there are ``min_checks``, is the rung's *served* figure
    (:attr:`served`: the request p95 the application saw on it, queueing
    included, in quiet times). A rung is then judged on the larger of
    its start-up expectation and its served figure: a step up needs the
    start-up expectation within ``headroom`` x budget (an estimate: the
    margin is for its error) *and* the served figure within the budget itself
    (it was observed); a step down expects each faster rung at no less than
    its served figure. The checks that led to a step down the CPU pressure
    explains are the load's, not the rung's: they are taken out of its
    served figure again. A served figure is kept while a failed step up to
    the rung would be remembered (4 x ``headroom_s`` x its back-off, counted
    from its last quiet check); then the rung gets a new trial on its
    start-up figures. Where the pressure is unknown nothing is learnt (a
    figure taken under a load would bar the rung for no reason): there the
    back-off alone learns.
    """

    MAX_BACKOFF = 8.0

    def __init__(self, rungs: Sequence[Rung], budget_ms: float, current: str, *, sustain_s: float = 10.0,
                 headroom_s: float = 30.0, headroom: float = 0.8, cooldown_s: float | None = None,
                 min_samples: int = 20, hot_c: float = 80.0, over_fraction: float = 0.6,
                 room_fraction: float = 0.9, min_checks: int = 3, base_ms: float = 0.0,
                 pressure_max: float = 0.2) -> None:
        if budget_ms <= 0:
            raise ValueError("budget_ms must be > 0")
        self.ladder = sorted(rungs, key=lambda r: r.accuracy, reverse=True)  # most accurate first
        ids = [r.id for r in self.ladder]
        if current not in ids:
            raise ValueError(f"current variant {current!r} is not on the ladder {ids}")
        self.budget_ms = float(budget_ms)
        self.current = current
        self.sustain_s = float(sustain_s)
        self.headroom_s = float(headroom_s)
        self.headroom = float(headroom)
        self.cooldown_s = float(sustain_s if cooldown_s is None else cooldown_s)
        self.min_samples = int(min_samples)
        self.hot_c = float(hot_c)
        self.over_fraction = float(over_fraction)
        self.room_fraction = float(room_fraction)
        self.min_checks = int(min_checks)
        self.base_ms = max(0.0, float(base_ms))  # start-up CPU wait + batch delay: in every rung's request p95
        self.pressure_max = float(pressure_max)  # a check with more CPU pressure than this has no room
        # (time, state, p95, cpu wait, pressure): bounded, and pruned to the longest window at every check
        self._obs: collections.deque = collections.deque(maxlen=4096)
        self._first: float | None = None   # first check since the last switch
        self._quiet_until = float("-inf")
        # Back-off: leaving a rung soon after stepping up to it doubles the headroom time that rung needs
        # next time (up to MAX_BACKOFF x): a load the start-up figures cannot predict is learnt by trying.
        self._backoff: dict[str, float] = {}
        self._last_up: tuple[str, float, str] | None = None  # (rung, when, "start-up" | "step up")
        self._since = float("-inf")         # when the current rung became active
        # (time, p95) of the current rung's quiet judged checks; their median is its served figure
        self._stint: collections.deque = collections.deque(maxlen=4096)
        self.served: dict[str, dict] = {}   # rung id -> {"p95_ms", "checks", "at"} (see the class docstring)
        self._prior: dict | None = None
        self.outlook: dict | None = None    # the last judged check's view of the next step up (for health)

    def _index(self, vid: str) -> int:
        return next(i for i, r in enumerate(self.ladder) if r.id == vid)

    def switched(self, to_id: str, now: float) -> None:
        """Record a switch made (by this policy or anyone else): evidence restarts, cooldown begins."""
        self.current = to_id
        self._obs.clear()
        self._stint.clear()
        self._prior = self.served.get(to_id)  # its served figure from before this stint (see _unlearn_onset)
        self.outlook = None                   # the next judged check on to_id says what is above it
        self._first = None
        self._quiet_until = now + self.cooldown_s
        self._since = now

    def started(self, to_id: str, now: float) -> None:
        """The start-up choice: a switch, and a trial like a step up (it was made on start-up figures alone)."""
        self.switched(to_id, now)
        self._last_up = (to_id, now, "start-up")

    def _memory_s(self, vid: str) -> float:
        """How long a failed step up to ``vid`` is remembered: its back-off, and its served figure."""
        return 4 * self.headroom_s * self._backoff.get(vid, 1.0)

    def served_ms(self, vid: str, now: float) -> float | None:
        """``vid``'s served figure (the class docstring), or None: never served quietly, or too long ago."""
        s = self.served.get(vid)
        if s is None or now - s["at"] > self._memory_s(vid):
            return None
        return s["p95_ms"]

    def _learn(self, now: float, p95_ms: float) -> None:
        """One quiet judged check of the current rung: its served figure is the median of the recent ones."""
        self._stint.append((now, float(p95_ms)))
        horizon = now - max(self.sustain_s, self.headroom_s)
        while self._stint and self._stint[0][0] < horizon:
            self._stint.popleft()
        if len(self._stint) >= self.min_checks:
            self.served[self.current] = self._served_entry(self._stint, now)

    @staticmethod
    def _served_entry(checks, at: float) -> dict:
        """A served figure from quiet checks ``(time, p95)``: their median, how many, and when."""
        return {"p95_ms": float(np.median([o[1] for o in checks])), "checks": len(checks), "at": at}

    def _unlearn_onset(self, now: float) -> None:
        """A load sent the current rung down: its last ``sustain_s`` of checks belong to the load, not to it.

        A check window in which a load started can read a low pressure (the
        load held it for its last few hundred ms) and a high p95: learnt, it
        would bar the rung after the load for no reason. So the served figure
        goes back to the checks before the deciding window, or to the figure
        the rung had before this stint.
        """
        keep = [o for o in self._stint if o[0] < now - self.sustain_s]
        if len(keep) >= self.min_checks:
            self.served[self.current] = self._served_entry(keep, keep[-1][0])
        elif self._prior is not None:
            self.served[self.current] = self._prior
        else:
            self.served.pop(self.current, None)

    def _up_index(self, i: int) -> int | None:
        """The rung one step up from ``i``: the least accurate of the more accurate rungs worth running.

        A rung that a more accurate one beats on speed too (an fp32 variant
        whose int8 twin measured as accurate on the eval set) is never worth
        stepping up to: skipped, or the agent would sit below it for good.
        """
        worth = [j for j in range(i) if not any(self.ladder[k].p95_ms <= self.ladder[j].p95_ms for k in range(j))]
        return max(worth) if worth else None

    def _expected_up(self, i: int, p95_ms: float, now: float) -> tuple[Rung, float, float | None] | None:
        """The rung one step up, its start-up expectation now (ms) and its served figure (None: none kept)."""
        # The start-up expectation: the time the device adds right now (observed minus start-up p95 of the
        # current variant) added to the better variant's start-up p95. Stepping down scales by the ratio
        # instead, which is the more pessimistic model: quick to find a variant that surely fits,
        # careful (headroom, room_fraction, served figures) before trying a slower one.
        j = self._up_index(i)
        if j is None:
            return None
        up = self.ladder[j]
        return up, up.p95_ms + max(0.0, p95_ms - self.ladder[i].p95_ms), self.served_ms(up.id, now)

    def _fits_up(self, expected_ms: float, served_ms: float | None) -> bool:
        # The start-up expectation is an estimate: held to the headroom margin. A served figure was observed
        # on that very rung: held to the budget itself (a variant that served at 90 % of it is fine to return to).
        return expected_ms <= self.budget_ms * self.headroom and (served_ms is None or served_ms <= self.budget_ms)

    def _window(self, now: float, span: float) -> list[tuple] | None:
        """Judged checks of the last ``span`` seconds, or None when not observed that long yet."""
        if self._first is None or now - self._first < span:
            return None
        judged = [o for o in self._obs if o[0] >= now - span and o[1] != "none"]
        return judged if len(judged) >= self.min_checks else None

    def observe(self, now: float, p95_ms: float | None, samples: int, temp_c: float | None = None, *,
                cpu_wait_ms: float | None = None, pressure: float | None = None) -> Decision | None:
        """One check: ``p95_ms`` the window's request-latency estimate from ``samples`` requests.

        ``cpu_wait_ms`` is the CPU-wait part of ``p95_ms``. A check with fewer
        than ``min_samples`` requests is not judged, except when the CPU wait
        alone is over the budget: then no request can meet it, and an agent
        starved of CPU (its clients slowed down too) must not go unjudged.
        ``pressure`` is the window's CPU pressure (:class:`CpuPressure`; None
        where the device cannot tell): above ``pressure_max`` the check has no
        room, whatever the estimate says (the estimate under-reads the CPU
        wait of busy threads under a load: see the module docstring). A judged
        check with the pressure known and low (and the SoC not hot) also
        feeds the current rung's served figure (see the class docstring).
        """
        if now < self._quiet_until:
            return None
        i = self._index(self.current)
        cur = self.ladder[i]
        hot = temp_c is not None and temp_c >= self.hot_c
        judged = p95_ms is not None and samples >= self.min_samples
        low = pressure is not None and pressure <= self.pressure_max
        view = self._expected_up(i, p95_ms, now) if judged else None
        if not judged:
            starved = cpu_wait_ms is not None and cpu_wait_ms > self.budget_ms
            state = "over" if starved else "none"
            p95_ms = max(p95_ms or 0.0, cpu_wait_ms or 0.0) if starved else p95_ms
        elif p95_ms > self.budget_ms:
            state = "over"
        elif not hot and (pressure is None or low) and view is not None and self._fits_up(view[1], view[2]):
            state = "room"
        else:
            state = "ok"
        if judged:  # None on the top rung (or one nothing above is worth stepping up to)
            self.outlook = None if view is None else {
                "to_id": view[0].id, "start_up_ms": round(view[1], 4),
                "served_ms": None if view[2] is None else round(view[2], 4),
                "fits": self._fits_up(view[1], view[2]), "at": now}
        if judged and low and not hot:
            self._learn(now, p95_ms)
        if self._first is None:
            self._first = now
        self._obs.append((now, state, p95_ms, cpu_wait_ms, pressure))
        if now - self._since > self._memory_s(self.current):
            self._backoff.pop(self.current, None)  # stayed up long enough: forgive
        horizon = now - max(self.sustain_s, self.headroom_s * self.MAX_BACKOFF)
        while self._obs and self._obs[0][0] < horizon:
            self._obs.popleft()
        temp_txt = f", SoC {temp_c:.0f} °C" if temp_c is not None else ""

        def median_of(obs: list, k: int, text: str) -> tuple[float | None, str]:
            """The median of field ``k`` over the checks that have it, and ``text`` formatted with it."""
            vals = [o[k] for o in obs if o[k] is not None]
            if not vals:
                return None, ""
            v = float(np.median(vals))
            return v, text.format(v)

        def wait_of(obs: list) -> tuple[float | None, str]:
            return median_of(obs, 3, ", of which CPU wait {:.3f} ms")

        def pressure_of(obs: list) -> tuple[float | None, str]:
            return median_of(obs, 4, "; CPU pressure {:.0%}")
        win = self._window(now, self.sustain_s)
        if i < len(self.ladder) - 1 and win is not None:
            over = [o for o in win if o[1] == "over"]
            if len(over) >= self.over_fraction * len(win):
                p95 = float(np.median([o[2] for o in over]))
                base = self.base_ms
                slowdown = p95 / (cur.p95_ms + base) if cur.p95_ms + base > 0 else 1.0
                faster = [r for r in self.ladder[i + 1:] if r.p95_ms < cur.p95_ms] or self.ladder[i + 1:]

                def down_ms(r: Rung) -> tuple[float, str]:
                    # the start-up estimate times the slowdown now, or what r served in quiet times if more
                    est, served = (r.p95_ms + base) * slowdown, self.served_ms(r.id, now)
                    return (served, "served") if served is not None and served > est else (est, "start-up")
                fit = next((r for r in faster if down_ms(r)[0] <= self.budget_ms), None)
                to = fit or min(faster, key=lambda r: r.p95_ms)
                to_ms, basis = down_ms(to)
                wait, wait_txt = wait_of(over)
                press, press_txt = pressure_of(over)
                backoff, tried_txt = None, ""
                if press is not None and press > self.pressure_max:
                    self._unlearn_onset(now)
                last = self._last_up
                if last is not None and last[0] == cur.id and now - last[1] < self._memory_s(cur.id):
                    if press is None or press <= self.pressure_max:  # not a load: the figures misjudged cur
                        backoff = self._backoff[cur.id] = min(self.MAX_BACKOFF, 2.0 * self._backoff.get(cur.id, 1.0))
                        what = "the start-up choice" if last[2] == "start-up" else "a step up"
                        tried_txt = (f"; {cur.id} failed as {what} {now - last[1]:.0f} s ago: stepping up to it "
                                     f"needs {backoff:g} x the headroom time")
                d = Decision("down", cur.id, to.id,
                             f"request p95 over the {self.budget_ms:g} ms budget in {len(over)} of {len(win)} checks "
                             f"over {self.sustain_s:g} s (median {p95:.3f} ms{wait_txt}, x{slowdown:.2f} the start-up "
                             f"estimate{temp_txt}{press_txt}); {to.id} expected at {to_ms:.3f} ms"
                             + (" (its request p95 when last served at low CPU pressure)" if basis == "served" else "")
                             + ("" if fit is not None else " (none fits: the fastest)") + tried_txt,
                             now, p95, temp_c, wait, press, to_ms, basis, backoff)
                self.switched(to.id, now)
                return d
        j = self._up_index(i)
        if j is None or hot:
            return None
        up = self.ladder[j]
        span = self.headroom_s * self._backoff.get(up.id, 1.0)
        win = self._window(now, span)
        if win is None:
            return None
        room = [o for o in win if o[1] == "room"]
        if len(room) < self.room_fraction * len(win):
            return None
        p95 = float(np.median([o[2] for o in room]))
        _, expected, served = self._expected_up(i, p95, now)
        wait, wait_txt = wait_of(room)
        press, _ = pressure_of(room)
        press_txt = "" if press is None else f"; CPU pressure {press:.0%} <= {self.pressure_max:.0%}"
        if served is not None:
            ago = now - self.served[up.id]["at"]
            served_txt = (f"; served at {served:.3f} ms <= the budget when last run at low CPU pressure "
                          f"({ago:.0f} s ago)")
        elif up.id in self.served:
            old = self.served[up.id]
            served_txt = (f"; its served figure ({old['p95_ms']:.3f} ms, {now - old['at']:.0f} s ago) is older "
                          f"than the {self._memory_s(up.id):g} s it counts: a new trial")
        else:
            served_txt = "; not served at low CPU pressure yet: a trial"
        d = Decision("up", cur.id, up.id,
                     f"headroom in {len(room)} of {len(win)} checks over {span:g} s: {up.id} expected at "
                     f"{expected:.3f} ms from its start-up figure <= {self.headroom:.0%} of the {self.budget_ms:g} ms "
                     f"budget{served_txt} (median request p95 {p95:.3f} ms{wait_txt}{temp_txt}{press_txt})",
                     now, p95, temp_c, wait, press, max(expected, served or 0.0),
                     "served" if served is not None and served > expected else "start-up")
        self.switched(up.id, now)
        self._last_up = (up.id, now, "step up")
        return d


# --------------------------------------------------------------------------- device readings

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
      goes by the latency estimate alone, see the module docstring).

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

class AdaptController:
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
        ex = None
        pkg = getattr(handle.runner, "package", None)
        try:
            ex = pkg.example_input() if pkg is not None else None
        except EdgeshipError:
            ex = None
        feed = []
        for i, (name, shape, dtype) in enumerate(zip(handle.input_names, handle.sample_shapes, handle.dtypes)):
            arr = None
            if isinstance(ex, Mapping):
                arr = ex.get(name)
            elif ex is not None and i == 0:
                arr = ex
            arr = np.zeros((1, *shape), dtype) if arr is None else np.asarray(arr, dtype=dtype).reshape(-1, *shape)[:1]
            feed.append(np.ascontiguousarray(arr))
        return feed

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
        wait = probe_cpu_wait(min(1.0, max(0.2, self.measure_s)), self.probe_ms / 1000.0, self._stop)
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
    def start(self) -> "AdaptController":
        """Measure and choose (blocking, bounded by ``measure_s`` per variant), then start the check loop."""
        if self._thread is not None:
            return self
        if self._cpu is None:
            self._cpu = CpuPressure(self.psi_path, self.loadavg_path)
        if self.agent.handle is not None:
            try:
                self._select()
            except EdgeshipError as exc:  # adapting is an optimisation: serve the configured variant instead
                log.warning("adapt: start-up selection failed, keeping the configured variant: %s", exc)
        self.ready.set()
        if self.policy is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgeship-adapt", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drop_standby()

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

    def _run(self) -> None:
        # Between checks this thread is the CPU-wait probe: it wakes on a probe_ms tick grid and records how
        # late each tick was served (see the module docstring). One thread, so the probe costs no extra thread.
        interval = self.probe_ms / 1000.0
        next_check = time.monotonic() + self.check_s
        due = time.monotonic() + interval  # the probe's tick grid (see tick_lateness)
        while True:
            if self._stop.wait(max(0.0, min(due, next_check) - time.monotonic())):
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


def rungs_from(measurements: Mapping[str, Mapping], variants: Iterable[Mapping]) -> list[Rung]:
    """Rungs from ``{variant id: {"p95", "p50"}}`` and the manifest's variants (for tools that measure elsewhere)."""
    by_id = {v.get("id"): v for v in variants}
    return [Rung(vid, variant_accuracy(by_id.get(vid, {})), float(m["p95"]), m.get("p50"))
            for vid, m in measurements.items() if "p95" in m]
