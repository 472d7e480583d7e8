"""Adapting to the device, the pure layer: which variant to run, and when to move. No I/O, no threads, no clocks.

Time and every figure are passed in, so each decision is a plain function
(or :class:`AdaptPolicy`, a small state machine fed by ``observe``) tested
directly. Why the policy looks the way it does (the budget, the CPU
pressure gate, served figures): ``docs/adapt.md``. The device readings are
in :mod:`edgeship.agent.adapt_probes`; the agent component that runs them
is :class:`edgeship.agent.adapt.AdaptController`.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Rung", "Decision", "AdaptPolicy", "choose_variant", "choose_threads", "choose_batch_delay",
           "variant_accuracy", "request_estimate", "accuracy_drops", "accuracy_budget", "eligible_variants",
           "choose_fastest", "DEFAULT_MAX_DROP"]

_PRECISION_RANK = {"fp64": 4, "fp32": 3, "float32": 3, "fp16": 2, "float16": 2, "int8": 1, "uint8": 1}
_METRIC_KEYS = ("points", "top1", "agreement", "cosine", "accuracy")


def variant_accuracy(variant: Mapping) -> tuple:
    """A sort key, higher = more accurate: measured points/metric first, then precision, then file size."""
    m = variant.get("metrics") or {}
    acc = next((float(m[k]) for k in _METRIC_KEYS if isinstance(m.get(k), (int, float))), None)
    if acc is not None and "points" not in m and acc <= 1.0:
        acc *= 100.0  # a 0..1 metric on the points scale, so variants with either compare
    return (acc if acc is not None else float("-inf"), _PRECISION_RANK.get(str(variant.get("precision")), 0),
            float(m.get("size") or 0))


# --------------------------------------------------------------------------- the start-up choice (issue 18)

#: The accuracy budget (points below fp32) when neither the config nor the package records one:
#: ``edgeship convert quantize``'s default ``max_drop``.
DEFAULT_MAX_DROP = 1.0


def _points(variant: Mapping) -> float | None:
    acc = variant_accuracy(variant)[0]
    return None if acc == float("-inf") else acc


def accuracy_drops(variants: Sequence[Mapping]) -> dict[str, float | None]:
    """Each variant's accuracy drop in points below fp32, as its manifest entry records it. Pure.

    ``metrics.drop`` when the converter wrote it (``convert quantize`` does);
    else the variant's measured metric below the most accurate fp32 variant's
    (points, or a 0..1 metric on the points scale, as in
    :func:`variant_accuracy`). None: nothing recorded to compare, so the
    variant's accuracy is unknown.
    """
    fp32 = [_points(v) for v in variants if _PRECISION_RANK.get(str(v.get("precision")), 0) >= 3]
    ref = max((p for p in fp32 if p is not None), default=None)
    out: dict[str, float | None] = {}
    for v in variants:
        m = v.get("metrics") or {}
        drop = m.get("drop")
        if isinstance(drop, (int, float)) and not isinstance(drop, bool):
            out[str(v.get("id"))] = float(drop)
            continue
        pts = _points(v)
        out[str(v.get("id"))] = None if pts is None or ref is None else ref - pts
    return out


def accuracy_budget(manifest: Mapping, configured: float | None = None) -> tuple[float, str]:
    """The accuracy drop (points below fp32) a variant may have, and where that figure comes from. Pure.

    The config's ``[adapt] max_drop`` first; else the budget the package was
    quantized to (``provenance.quantization.<target>.max_drop``, the
    strictest over targets); else :data:`DEFAULT_MAX_DROP`.
    """
    if configured is not None:
        return float(configured), "[adapt] max_drop"
    quant = (manifest.get("provenance") or {}).get("quantization") or {}
    recorded = [float(q["max_drop"]) for q in quant.values() if isinstance(q, Mapping)
                and isinstance(q.get("max_drop"), (int, float))] if isinstance(quant, Mapping) else []
    if recorded:
        return min(recorded), "the package's quantization budget"
    return DEFAULT_MAX_DROP, "the default budget"


def eligible_variants(variants: Sequence[Mapping], default_id: str, max_drop: float,
                      backend: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Which variants may be served instead of the default: ``(ids, {excluded id: why})``. Pure.

    The default always may (it is what the package's author ships). Another
    variant must run on ``backend`` (when the config names one) and have a
    recorded accuracy drop (:func:`accuracy_drops`) within ``max_drop``: a
    variant beyond the budget, or of unknown accuracy, is never served by
    speed, however fast it is.
    """
    drops = accuracy_drops(variants)
    ok, excluded = [], {}
    for v in variants:
        vid = str(v.get("id"))
        drop = drops.get(vid)
        if vid == default_id:
            ok.append(vid)
        elif backend and v.get("runtime") != backend:
            excluded[vid] = f"runs on {v.get('runtime')}, the config asks for {backend}"
        elif drop is None:
            excluded[vid] = "no accuracy recorded in the manifest (metrics.drop or a metric to compare with fp32)"
        elif drop > max_drop:
            excluded[vid] = f"{drop:.2f} pt below fp32, over the {max_drop:g} pt budget"
        else:
            ok.append(vid)
    return ok, excluded


def _per_sample(fig: Mapping) -> list[float]:
    """A variant's measured times that decide: batch-1 call ms and, if measured, ms per sample in a batch."""
    out = [float(fig["b1_ms"])]
    if fig.get("bn_ms") is not None and int(fig.get("batch") or 1) > 1:
        out.append(float(fig["bn_ms"]) / int(fig["batch"]))
    return out


def choose_fastest(figures: Mapping[str, Mapping], default_id: str, margin: float = 0.1,
                   drops: Mapping[str, float | None] | None = None) -> tuple[str, str, dict]:
    """The variant to serve from measured figures: ``(id, reason, {id: time relative to the default})``. Pure.

    ``figures``: ``{id: {"b1_ms", "bn_ms", "batch"}}`` for the eligible
    variants measured on this device (``bn_ms``: one call at ``batch``, or
    None). A variant's score is the geometric mean of its batch-1 time and
    its time per sample at ``batch`` (both what serving does: a lone request,
    a full batch), taken relative to the default's. The fastest wins only
    when it beats the default by more than ``margin`` (0.1 = 10 %): within
    that, the difference is start-up measurement noise, and the default stays
    (the package's choice, and no swap) — unless a variant more accurate than
    the default (a smaller ``drops`` entry: fp32 beside an int8 default)
    measured faster at all: it loses nothing, so an int8 default that
    measured slower than fp32 here is never kept.
    """
    if default_id not in figures:
        raise ValueError(f"the default variant {default_id!r} was not measured")
    base = _per_sample(figures[default_id])
    rel: dict[str, float] = {}
    for vid, fig in figures.items():
        own = _per_sample(fig)
        k = min(len(own), len(base))  # a variant measured at batch 1 only is compared at batch 1
        rel[vid] = float(np.exp(np.mean([np.log(own[i] / base[i]) for i in range(k)])))
    best = min(rel, key=lambda v: (rel[v], v != default_id))
    what = "batch 1 and per sample at batch " + str(figures[default_id].get("batch")) \
        if len(base) > 1 else "batch 1"
    if best == default_id:
        return default_id, f"the default is the fastest ({what})", rel
    if rel[best] > 1.0 - margin:
        d = dict(drops or {})
        mine = d.get(default_id)
        better = [v for v in rel if v != default_id and rel[v] < 1.0 and d.get(v) is not None and mine is not None
                  and d[v] < mine]
        if better:
            b = min(better, key=lambda v: rel[v])
            return b, (f"{b} is more accurate than the default ({d[b]:.2f} vs {mine:.2f} pt below fp32) and "
                       f"measured faster ({rel[b]:.2f}x its time, {what})"), rel
        return default_id, (f"kept the default: {best} takes {rel[best]:.2f}x its time ({what}), within the "
                            f"{margin:.0%} noise margin"), rel
    return best, f"{best} is the fastest: {rel[best]:.2f}x the default's time ({what})", rel


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
    the batch delay measured at start-up, see docs/adapt.md).
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
        wait of busy threads under a load: see docs/adapt.md). A judged
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
