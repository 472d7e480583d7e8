"""Pure rollout logic: plans, cohort buckets, gate verdicts, the stage machine.

No I/O, no threads, no clock of its own: callers pass ``now``. The
controller (:mod:`edgeship.fleet.controller`) and the device's rollout client
(:mod:`edgeship.agent.rollout_client`) are thin shells around these.

Plan
    :class:`Plan` names a package (name, version, sha256, size, URL), cumulative
    stages with a soak time each, gates, a cohort salt, rate limits, and the
    live part: ``state`` (``running | paused | aborted | completed``),
    ``stage_index``, the ``percent`` published now (ramped up to the stage's
    target under the rate limit) and ``seq``, which grows with every change so
    a device ignores a replayed older plan. :func:`sign_plan` /
    :func:`verify_plan_message` wrap it in the signed MQTT body
    ``{"rollout_id", "plan", "signature", "key_id"}``; the signature is
    Ed25519 over :func:`canonical_json` of ``plan``.

Cohorts
    :func:`bucket` is a stable hash of (salt, device id) in [0, 100); a device
    is in the rollout once the published percent exceeds its bucket
    (:func:`in_stage`), and stays in as percentages only grow.

Gates (canary = devices on the new version, control = devices still on the old)
    ``failures``           canary only: failed devices / devices that reported; fail when the
                           Wilson lower bound exceeds ``threshold`` (a rate)
    ``error_rate``         inference errors / inferences; canary - control vs ``threshold``
    ``negative_feedback``  incorrect (and corrected) / all verdict feedback; canary - control
    ``latency_p95``        p95 ratio canary / control vs ``threshold`` (a ratio) and ``slack``
                           ms of absolute difference below which a ratio is noise
    ``metric:<path>``      a numeric telemetry field (dotted path), window means: canary vs
                           control * ``threshold`` + ``slack``
    ``drift``              predicted-class PSI, canary vs control (issue 10)
    ``drift_score``        the devices' input drift score (telemetry ``drift.score``, the figure that
                           raises the drift alarm), window means: canary vs control * ``threshold`` +
                           ``slack``, as ``metric:drift.score`` (issue 22: the field signal that
                           started a retrain gates its rollout)

    Verdicts: ``insufficient`` (fewer than ``min_samples`` on either side),
    ``fail`` (the canary is worse than allowed *with confidence*: the lower
    bound of a one-sided ``confidence`` interval — Newcombe's hybrid score
    interval for a difference of rates, Wilson for one rate, binomial order
    statistics for a p95 — is beyond the threshold), ``hold`` (the point
    estimate is beyond the threshold but not yet with confidence: keep
    soaking, do not promote), ``pass`` (the point estimate is within it).

Stage machine
    :func:`decide` returns what the controller should do now: ``wait``,
    ``promote``, ``complete``, ``abort`` or ``pause``. A stage is promoted
    only once its target percent is fully published, its soak time has
    passed and every gate passes (``insufficient`` counts as passing with
    ``on_insufficient = "promote"``, the default, as AWS IoT Jobs' abort
    criteria only apply past a minimum number of devices; ``"wait"`` blocks).
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from statistics import NormalDist
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import RolloutError, SignatureError

__all__ = [
    "PLAN_FORMAT", "PLAN_STATES", "ACTIVE_STATES", "GATE_VERDICTS", "DEFAULT_STAGES", "DEFAULT_GATES", "DRIFT_GATE",
    "DRIFT_SCORE_GATE", "DRIFT_SCORE_FIELD",
    "PackageRef", "Stage", "GateSpec", "HealthPolicy", "Plan", "GateResult", "Decision",
    "RateFigures", "LatencyFigures", "MeanFigures", "CohortFigures",
    "bucket", "in_stage", "will_reach", "canonical_json", "sign_plan", "verify_plan_message",
    "parse_stages", "parse_duration", "parse_gate", "default_gates",
    "wilson_interval", "newcombe_interval", "quantile_rank_bounds", "z_for",
    "evaluate_gate", "evaluate_gates", "decide", "ramp_percent", "count_in_range",
    "local_health",
]

PLAN_FORMAT = 1
PLAN_STATES = ("running", "paused", "aborted", "completed")
ACTIVE_STATES = ("running", "paused")
GATE_VERDICTS = ("pass", "hold", "fail", "insufficient")
DEFAULT_STAGES = (1.0, 10.0, 50.0, 100.0)
_GATE_NAME = re.compile(r"^(failures|error_rate|negative_feedback|latency_p95|drift|drift_score"
                        r"|metric:[A-Za-z0-9_.]{1,128})$")
#: The telemetry field the ``drift_score`` gate reads (edgeship.agent.drift puts it in every window).
DRIFT_SCORE_FIELD = "drift.score"


# ----------------------------------------------------------------- plan

@dataclass(frozen=True)
class PackageRef:
    name: str
    version: str
    sha256: str
    size: int
    url: str


@dataclass(frozen=True)
class Stage:
    percent: float
    soak_s: float


@dataclass(frozen=True)
class GateSpec:
    """One gate. ``threshold``: allowed increase of a rate (absolute), or allowed ratio (latency, metric)."""

    name: str
    threshold: float
    min_samples: int
    confidence: float = 0.95
    slack: float = 0.0

    @property
    def unit(self) -> str:
        if self.name == "drift":
            return "psi"
        return "ratio" if self.name in ("latency_p95", "drift_score") or self.name.startswith("metric:") else "rate"


@dataclass(frozen=True)
class HealthPolicy:
    """What a device checks during its local health window after switching."""

    window_s: float | None = None    # None: the device's own [rollout] health_window_s
    max_error_rate: float = 0.05      # errors / inferences in the window
    max_latency_ratio: float = 3.0    # new p95 / old p95
    latency_slack_ms: float = 20.0    # differences below this are not judged
    min_inferences: int = 20


def default_gates() -> tuple[GateSpec, ...]:
    return (
        GateSpec("failures", threshold=0.05, min_samples=1),
        GateSpec("error_rate", threshold=0.01, min_samples=500),
        GateSpec("latency_p95", threshold=1.5, min_samples=500, slack=5.0),
        GateSpec("negative_feedback", threshold=0.05, min_samples=100),
    )


DEFAULT_GATES = default_gates()
#: The optional prediction-drift gate (issue 10): PSI of the canary's predicted-class distribution against the
#: control's must stay within ``threshold`` (edgeship.drift.PSI_ALARM), with ``min_samples`` predictions a side.
DRIFT_GATE = GateSpec("drift", threshold=0.2, min_samples=200)
#: The input-drift gate (issue 22): the canary's mean drift score per window may exceed the control's by at
#: most ``slack`` (PSI units; threshold 1.0 = no worse than control), with ``min_samples`` windows a side.
DRIFT_SCORE_GATE = GateSpec("drift_score", threshold=1.0, min_samples=10, slack=0.05)


@dataclass(frozen=True)
class Plan:
    rollout_id: str
    fleet: str
    package: PackageRef
    stages: tuple[Stage, ...]
    gates: tuple[GateSpec, ...] = DEFAULT_GATES
    salt: str = ""
    max_new_per_min: int = 0          # devices newly assigned per minute; 0 = unlimited
    report_timeout_s: float = 600.0   # a device in an open stage silent this long counts as timed out
    timeouts_fail: bool = True        # timed-out devices count in the failures gate
    on_fail: str = "abort"            # or "pause"
    on_insufficient: str = "promote"  # or "wait"
    health: HealthPolicy = field(default_factory=HealthPolicy)
    state: str = "running"
    stage_index: int = 0
    percent: float = 0.0              # published now (ramps up to stages[stage_index].percent)
    seq: int = 1
    created: float = 0.0
    updated: float = 0.0
    reason: str = ""
    expires: float = 0.0              # 0: never; devices refuse a plan after this (the controller re-signs it first)
    format: int = PLAN_FORMAT

    def __post_init__(self) -> None:
        _check_plan(self)

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    @property
    def target_percent(self) -> float:
        """The percent devices must eventually reach under this plan (the last stage's, unless aborted)."""
        return self.stages[-1].percent

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if not isinstance(d, Mapping):
            raise RolloutError("rollout plan is not a JSON object")
        try:
            if int(d.get("format", 1)) > PLAN_FORMAT:
                raise RolloutError(f"rollout plan format {d.get('format')} is newer than this edgeship; upgrade")
            # Unknown keys (added by a newer controller within format 1) are ignored, not fatal.
            names = {f.name for f in fields(cls)}
            kw = {k: v for k, v in d.items() if k in names}
            kw["package"] = PackageRef(**d["package"])
            kw["stages"] = tuple(Stage(float(s["percent"]), float(s["soak_s"])) for s in d["stages"])
            kw["gates"] = tuple(GateSpec(**g) for g in d.get("gates", ()))
            kw["health"] = HealthPolicy(**d.get("health", {}))
            return cls(**kw)
        except RolloutError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"rollout plan is malformed: {type(exc).__name__}: {exc}") from exc

    def evolve(self, **changes: Any) -> "Plan":
        return replace(self, **changes)


def _check_plan(p: Plan) -> None:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", p.rollout_id or ""):
        raise RolloutError(f"rollout id {p.rollout_id!r} is not valid: use letters, digits and _.:- (max 128)")
    if not re.fullmatch(r"[0-9a-f]{64}", p.package.sha256 or ""):
        raise RolloutError("rollout plan: package sha256 must be 64 lowercase hex digits")
    if not p.stages:
        raise RolloutError("rollout plan needs at least one stage")
    last = 0.0
    for s in p.stages:
        if not (0 < s.percent <= 100) or s.percent <= last:
            raise RolloutError(f"stages must be increasing percentages in (0, 100], got "
                               f"{', '.join(f'{x.percent:g}' for x in p.stages)}")
        if s.soak_s < 0:
            raise RolloutError(f"stage {s.percent:g}%: soak time must be >= 0")
        last = s.percent
    for g in p.gates:
        if not _GATE_NAME.match(g.name):
            raise RolloutError(f"gate {g.name!r} is unknown; use failures, error_rate, negative_feedback, "
                               "latency_p95, metric:<telemetry field>, drift or drift_score")
        if not (0.5 <= g.confidence < 1) or g.min_samples < 0 or not math.isfinite(g.threshold):
            raise RolloutError(f"gate {g.name}: confidence must be in [0.5, 1), min_samples >= 0, threshold finite")
    if p.state not in PLAN_STATES:
        raise RolloutError(f"rollout state {p.state!r} is not one of {', '.join(PLAN_STATES)}")
    if not (0 <= p.stage_index < len(p.stages)):
        raise RolloutError(f"stage index {p.stage_index} is outside the plan's {len(p.stages)} stages")
    if p.on_fail not in ("abort", "pause") or p.on_insufficient not in ("promote", "wait"):
        raise RolloutError("on_fail must be abort or pause; on_insufficient promote or wait")
    if p.max_new_per_min < 0 or p.report_timeout_s <= 0:
        raise RolloutError("max_new_per_min must be >= 0 and report_timeout_s > 0")


def parse_duration(text: str | float | int) -> float:
    """``30m``, ``2h``, ``45s``, ``1d``, ``500ms`` or plain seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise RolloutError(f"duration {text} must be >= 0")
        return float(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", str(text))
    if not m:
        raise RolloutError(f"duration {text!r} is not understood; write e.g. 30m, 2h, 45s")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


def parse_stages(text: str | Sequence[float], soak: str | float | Sequence = 1800.0) -> tuple[Stage, ...]:
    """``"1,10,50,100"`` and one soak (or one per stage) -> stages."""
    try:
        pcts = [float(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()]
    except ValueError as exc:
        raise RolloutError(f"stages {text!r}: give percentages separated by commas, e.g. 1,10,50,100") from exc
    if isinstance(soak, (list, tuple)):
        soaks = [parse_duration(s) for s in soak]
    elif isinstance(soak, str) and "," in soak:
        soaks = [parse_duration(s) for s in soak.split(",")]
    else:
        soaks = [parse_duration(soak)] * len(pcts)
    if len(soaks) != len(pcts):
        raise RolloutError(f"{len(soaks)} soak times for {len(pcts)} stages; give one, or one per stage")
    return tuple(Stage(p, s) for p, s in zip(pcts, soaks))


def parse_gate(text: str) -> GateSpec:
    """``NAME:THRESHOLD[:MIN_SAMPLES[:CONFIDENCE[:SLACK]]]``, e.g. ``negative_feedback:0.05:100``."""
    base = {g.name: g for g in (*DEFAULT_GATES, DRIFT_GATE, DRIFT_SCORE_GATE)}
    parts = text.split(":")
    name = parts.pop(0)
    if name == "metric" and parts:
        name = f"metric:{parts.pop(0)}"
    if not _GATE_NAME.match(name):
        raise RolloutError(f"gate {text!r}: unknown gate {name!r}; use failures, error_rate, negative_feedback, "
                           "latency_p95, metric:FIELD, drift or drift_score")
    d = base.get(name, GateSpec(name, threshold=1.2, min_samples=20))
    try:
        vals = [float(x) for x in parts]
    except ValueError as exc:
        raise RolloutError(f"gate {text!r}: write NAME:THRESHOLD[:MIN_SAMPLES[:CONFIDENCE[:SLACK]]]") from exc
    fields_ = ["threshold", "min_samples", "confidence", "slack"]
    kw = {f: (int(v) if f == "min_samples" else v) for f, v in zip(fields_, vals)}
    return replace(d, **kw)


# ----------------------------------------------------------------- cohorts

def bucket(device_id: str, salt: str) -> float:
    """Stable position of a device in [0, 100) for one rollout (salt)."""
    h = hashlib.sha256(f"{salt}\x00{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 * 100.0


def in_stage(device_bucket: float, percent: float) -> bool:
    return device_bucket < percent


def will_reach(device_bucket: float, plan: Plan) -> bool:
    """Whether this plan will eventually ask the device to switch (so it prefetches)."""
    return plan.state in ACTIVE_STATES + ("completed",) and in_stage(device_bucket, plan.target_percent)


def version_mismatches(plan: Plan, devices: Iterable[Mapping[str, Any]],
                       reports: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Devices whose reported model differs from what a completed plan wants (the fleet-side reconcile).

    Pure. Only a *completed* plan states a desired model for every device it
    targets. A device is judged once it has told the fleet it runs the plan's
    model (its last report under the plan is ``active`` or ``healthy``) and a
    newer state of the device names another model: it went back after the
    rollout (a cleared retained plan, a hand install). A device that failed
    or rolled back under the plan, is pinned, or has not switched yet has said
    why it differs and is not an alert. ``reports``: the device's latest
    report under this plan, by device (``state``, ``ts``).
    """
    if plan.state != "completed":
        return []
    out = []
    for d in devices:
        dev, sha = d.get("device"), d.get("model_sha256")
        r = reports.get(dev) if dev else None
        if not sha or r is None or r.get("state") not in ("active", "healthy"):
            continue
        if sha != plan.package.sha256 and float(d.get("state_ts") or 0) > float(r.get("ts") or 0):
            out.append({"device": dev, "reported": d.get("model_version"), "reported_sha256": sha,
                        "desired": plan.package.version, "rollout_id": plan.rollout_id})
    return out


def count_in_range(buckets: Iterable[float], lo: float, hi: float) -> int:
    return sum(1 for b in buckets if lo <= b < hi)


def ramp_percent(buckets: Sequence[float], start_percent: float, target: float, max_new_per_min: int,
                 elapsed_s: float) -> float:
    """Percent to publish ``elapsed_s`` into a stage that ramps from ``start_percent`` to ``target``.

    AWS-IoT-Jobs-like rate limit: at most ``max_new_per_min`` devices newly
    assigned per minute (a first minute's worth at once). Only known devices
    (``buckets``) are counted. Never below ``start_percent``.
    """
    if max_new_per_min <= 0:
        return target
    allowed = int(max_new_per_min * (1 + max(0.0, elapsed_s) / 60.0))
    inside = sorted(b for b in buckets if start_percent <= b < target)
    if len(inside) <= allowed:
        return target
    return max(start_percent, inside[allowed])  # that device (and later ones) still out


# ----------------------------------------------------------------- signing

def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_plan(plan: Plan, private_key) -> dict:
    """The MQTT plan body (without envelope): plan + Ed25519 signature + signer key id."""
    from . import signing

    d = plan.to_dict()
    sig = signing.sign(canonical_json(d), private_key)
    key = private_key if not isinstance(private_key, (str, bytes)) and hasattr(private_key, "sign") else \
        signing.load_private_key(private_key)
    return {"rollout_id": plan.rollout_id, "plan": d, "signature": base64.b64encode(sig).decode("ascii"),
            "key_id": signing.key_id(key)}


def verify_plan_message(body: Mapping[str, Any], trust) -> Plan:
    """Check a plan body's signature with a :class:`edgeship.signing.TrustStore`; return the Plan."""
    if not isinstance(body, Mapping) or not isinstance(body.get("plan"), Mapping):
        raise RolloutError("rollout message carries no plan")
    sig_b64 = body.get("signature")
    if not isinstance(sig_b64, str):
        raise SignatureError("rollout plan is not signed; the controller must sign plans (--key)")
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except ValueError as exc:
        raise SignatureError("rollout plan signature is not valid base64") from exc
    trust.verify(canonical_json(body["plan"]), sig, what="rollout plan",
                 signer=body.get("key_id") if isinstance(body.get("key_id"), str) else None)
    plan = Plan.from_dict(body["plan"])
    if body.get("rollout_id") not in (None, plan.rollout_id):
        raise RolloutError("rollout id outside the signed plan differs from the one inside")
    return plan


# ----------------------------------------------------------------- statistics

def z_for(confidence: float) -> float:
    """One-sided z for a confidence level (0.95 -> 1.645)."""
    return NormalDist().inv_cdf(confidence)


def wilson_interval(x: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion x/n."""
    if n <= 0:
        return 0.0, 1.0
    p = x / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(x1: float, n1: float, x2: float, n2: float, z: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p1 - p2."""
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, z)
    l2, u2 = wilson_interval(x2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def quantile_rank_bounds(n: int, q: float, z: float) -> tuple[float, float]:
    """Percentiles (0..100) bracketing the q-quantile's confidence interval (binomial order statistics)."""
    if n <= 0:
        return 0.0, 100.0
    half = z * math.sqrt(n * q * (1 - q))
    lo = max(0.0, (n * q - half) / n)
    hi = min(1.0, (n * q + half + 1) / n)
    return 100 * lo, 100 * hi


@dataclass(frozen=True)
class RateFigures:
    events: float
    total: float

    @property
    def rate(self) -> float | None:
        return self.events / self.total if self.total else None


@dataclass(frozen=True)
class LatencyFigures:
    """p95 and the p95's confidence bounds (from merged histograms; see quantile_rank_bounds)."""

    count: int
    p95: float | None
    p95_lo: float | None = None
    p95_hi: float | None = None


@dataclass(frozen=True)
class MeanFigures:
    count: int
    mean: float | None
    var: float = 0.0


@dataclass(frozen=True)
class CohortFigures:
    """What one cohort (canary or control) measured; missing parts are None."""

    failures: RateFigures | None = None
    errors: RateFigures | None = None
    negative: RateFigures | None = None
    latency: LatencyFigures | None = None
    metrics: Mapping[str, MeanFigures] = field(default_factory=dict)
    classes: Mapping[str, float] = field(default_factory=dict)  # predicted label -> count (drift gate)


@dataclass(frozen=True)
class GateResult:
    name: str
    verdict: str
    canary: float | None
    control: float | None
    canary_n: int
    control_n: int
    threshold: float
    min_samples: int
    unit: str
    lower: float | None = None   # confidence bound of the compared quantity (difference or ratio)
    upper: float | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.verdict == "pass"


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.2f}%" if unit == "rate" else f"{v:.2f} ms" if unit == "ms" else f"{v:.3g}"


def _rate_gate(spec: GateSpec, c: RateFigures | None, k: RateFigures | None, *, canary_only: bool) -> GateResult:
    z = z_for(spec.confidence)
    cn = int(c.total) if c else 0
    kn = int(k.total) if k else 0
    base = dict(name=spec.name, canary=c.rate if c else None, control=k.rate if k else None, canary_n=cn,
                control_n=kn, threshold=spec.threshold, min_samples=spec.min_samples, unit="rate")
    if canary_only:
        if cn < max(1, spec.min_samples):
            return GateResult(verdict="insufficient", detail=f"{cn} of {spec.min_samples} samples", **base)
        lo, hi = wilson_interval(c.events, c.total, z)
        if lo > spec.threshold:
            v, why = "fail", (f"{int(c.events)} of {cn} failed ({_fmt(c.rate, 'rate')}, at least {_fmt(lo, 'rate')} "
                              f"with {spec.confidence:.0%} confidence) > {_fmt(spec.threshold, 'rate')}")
        elif c.rate > spec.threshold:
            v, why = "hold", f"{_fmt(c.rate, 'rate')} > {_fmt(spec.threshold, 'rate')}, not yet conclusive"
        else:
            v, why = "pass", f"{int(c.events)} of {cn} failed"
        return GateResult(verdict=v, lower=lo, upper=hi, detail=why, **base)
    if cn < max(1, spec.min_samples) or kn < max(1, spec.min_samples):
        return GateResult(verdict="insufficient", detail=f"canary {cn}, control {kn}, need {spec.min_samples} each",
                          **base)
    lo, hi = newcombe_interval(c.events, c.total, k.events, k.total, z)
    d = c.rate - k.rate
    if lo > spec.threshold:
        v = "fail"
        why = (f"canary {_fmt(c.rate, 'rate')} vs control {_fmt(k.rate, 'rate')}: worse by at least "
               f"{_fmt(lo, 'rate')} ({spec.confidence:.0%} confidence) > allowed {_fmt(spec.threshold, 'rate')}")
    elif d > spec.threshold:
        v, why = "hold", f"worse by {_fmt(d, 'rate')} > allowed {_fmt(spec.threshold, 'rate')}, not yet conclusive"
    else:
        v, why = "pass", f"difference {_fmt(d, 'rate')} within {_fmt(spec.threshold, 'rate')}"
    return GateResult(verdict=v, lower=lo, upper=hi, detail=why, **base)


def _latency_gate(spec: GateSpec, c: LatencyFigures | None, k: LatencyFigures | None) -> GateResult:
    cn = c.count if c else 0
    kn = k.count if k else 0
    base = dict(name=spec.name, canary=c.p95 if c else None, control=k.p95 if k else None, canary_n=cn,
                control_n=kn, threshold=spec.threshold, min_samples=spec.min_samples, unit="ratio")
    if cn < max(1, spec.min_samples) or kn < max(1, spec.min_samples) or not c.p95 or not k.p95:
        return GateResult(verdict="insufficient", detail=f"canary {cn}, control {kn}, need {spec.min_samples} each",
                          **base)
    ratio = c.p95 / k.p95
    c_lo = c.p95_lo if c.p95_lo is not None else c.p95
    k_hi = k.p95_hi if k.p95_hi is not None else k.p95
    lo = c_lo / k_hi if k_hi else ratio
    hi = (c.p95_hi or c.p95) / (k.p95_lo or k.p95) if (k.p95_lo or k.p95) else ratio
    if lo > spec.threshold and c_lo - k_hi > spec.slack:
        v = "fail"
        why = (f"p95 {c.p95:.2f} ms vs {k.p95:.2f} ms: ratio at least {lo:.2f} "
               f"({spec.confidence:.0%} confidence) > {spec.threshold:.2f}")
    elif ratio > spec.threshold and c.p95 - k.p95 > spec.slack:
        v, why = "hold", f"p95 ratio {ratio:.2f} > {spec.threshold:.2f}, not yet conclusive"
    else:
        v, why = "pass", f"p95 {c.p95:.2f} ms vs {k.p95:.2f} ms (ratio {ratio:.2f})"
    return GateResult(verdict=v, lower=lo, upper=hi, detail=why, **base)


def _metric_gate(spec: GateSpec, c: MeanFigures | None, k: MeanFigures | None) -> GateResult:
    cn = c.count if c else 0
    kn = k.count if k else 0
    base = dict(name=spec.name, canary=c.mean if c else None, control=k.mean if k else None, canary_n=cn,
                control_n=kn, threshold=spec.threshold, min_samples=spec.min_samples, unit="ratio")
    if cn < max(2, spec.min_samples) or kn < max(2, spec.min_samples) or c.mean is None or k.mean is None:
        return GateResult(verdict="insufficient", detail=f"canary {cn}, control {kn} windows", **base)
    limit = k.mean * spec.threshold + spec.slack
    se = math.sqrt(c.var / cn + (spec.threshold ** 2) * k.var / kn)
    margin = z_for(spec.confidence) * se
    lo, hi = c.mean - margin, c.mean + margin
    if lo > limit:
        v, why = "fail", f"mean {c.mean:.4g} (at least {lo:.4g}) > control {k.mean:.4g} x {spec.threshold:g} + {spec.slack:g}"
    elif c.mean > limit:
        v, why = "hold", f"mean {c.mean:.4g} > limit {limit:.4g}, not yet conclusive"
    else:
        v, why = "pass", f"mean {c.mean:.4g} within {limit:.4g}"
    return GateResult(verdict=v, lower=lo, upper=hi, detail=why, **base)


def _drift_gate(spec: GateSpec, c: Mapping[str, float], k: Mapping[str, float]) -> GateResult:
    """Prediction drift, canary vs control: PSI of the predicted-class distributions (issue 10)."""
    from .drift import psi_from_counts  # noqa: PLC0415 - numpy, only for plans that use this gate

    cn, kn = int(sum(c.values())), int(sum(k.values()))
    base = dict(name=spec.name, canary_n=cn, control_n=kn, threshold=spec.threshold, min_samples=spec.min_samples,
                unit=spec.unit)
    if cn < spec.min_samples or kn < spec.min_samples:
        return GateResult(verdict="insufficient", canary=None, control=0.0,
                          detail=f"needs {spec.min_samples} predictions a side (canary {cn}, control {kn})", **base)
    value = psi_from_counts(k, c)
    top = sorted(set(c) | set(k), key=lambda lbl: -abs(c.get(lbl, 0) / cn - k.get(lbl, 0) / kn))[:3]
    moved = ", ".join(f"{lbl} {100 * k.get(lbl, 0) / kn:.1f}%->{100 * c.get(lbl, 0) / cn:.1f}%" for lbl in top)
    if value is not None and value > spec.threshold:
        return GateResult(verdict="fail", canary=value, control=0.0,
                          detail=f"predicted classes drift: PSI {value:.3f} > {spec.threshold:g} ({moved})", **base)
    return GateResult(verdict="pass", canary=value, control=0.0,
                      detail=f"PSI {value:.3f} within {spec.threshold:g} ({moved})", **base)


GateHook = Callable[[GateSpec, CohortFigures, CohortFigures], GateResult]


def evaluate_gate(spec: GateSpec, canary: CohortFigures, control: CohortFigures,
                  hooks: Mapping[str, GateHook] | None = None) -> GateResult:
    """One gate's verdict; ``hooks`` evaluate gates computed elsewhere (``drift``)."""
    if hooks and spec.name in hooks:
        return hooks[spec.name](spec, canary, control)
    if spec.name == "failures":
        return _rate_gate(spec, canary.failures, None, canary_only=True)
    if spec.name == "error_rate":
        return _rate_gate(spec, canary.errors, control.errors, canary_only=False)
    if spec.name == "negative_feedback":
        return _rate_gate(spec, canary.negative, control.negative, canary_only=False)
    if spec.name == "latency_p95":
        return _latency_gate(spec, canary.latency, control.latency)
    if spec.name.startswith("metric:"):
        key = spec.name[len("metric:"):]
        return _metric_gate(spec, canary.metrics.get(key), control.metrics.get(key))
    if spec.name == "drift":
        return _drift_gate(spec, canary.classes, control.classes)
    if spec.name == "drift_score":
        return _metric_gate(spec, canary.metrics.get(DRIFT_SCORE_FIELD), control.metrics.get(DRIFT_SCORE_FIELD))
    return GateResult(spec.name, "insufficient", None, None, 0, 0, spec.threshold, spec.min_samples, spec.unit,
                      detail="no evaluator for this gate in this controller")


def evaluate_gates(gates: Iterable[GateSpec], canary: CohortFigures, control: CohortFigures,
                   hooks: Mapping[str, GateHook] | None = None) -> list[GateResult]:
    return [evaluate_gate(g, canary, control, hooks) for g in gates]


# ----------------------------------------------------------------- stage machine

@dataclass(frozen=True)
class Decision:
    action: str   # wait | promote | complete | abort | pause
    reason: str = ""


def decide(plan: Plan, results: Sequence[GateResult], *, now: float, stage_started: float | None) -> Decision:
    """What to do with a rollout now. ``stage_started``: when the stage's target percent was fully published."""
    if plan.state != "running":
        return Decision("wait", f"rollout is {plan.state}")
    failed = [r for r in results if r.verdict == "fail"]
    if failed:
        why = "; ".join(f"gate {r.name} failed: {r.detail}" for r in failed)
        return Decision(plan.on_fail, why)
    if plan.percent < plan.stage.percent or stage_started is None:
        return Decision("wait", f"ramping up to {plan.stage.percent:g}% (now {plan.percent:g}%)")
    left = stage_started + plan.stage.soak_s - now
    if left > 0:
        return Decision("wait", f"soaking, {left:.0f} s left")
    held = [r.name for r in results if r.verdict == "hold"]
    if held:
        return Decision("wait", f"gates not yet passing: {', '.join(held)}")
    short = [r.name for r in results if r.verdict == "insufficient"]
    if plan.on_insufficient == "wait" and short:
        return Decision("wait", f"waiting for enough samples: {', '.join(short)}")
    last = plan.stage_index + 1 >= len(plan.stages)
    what = "last stage soaked" if last else f"stage {plan.stage.percent:g}% soaked"
    if short:
        # on_insufficient = promote: the soak ran out before the gates had samples. Say so
        # plainly; "every gate holding" would claim evidence nobody saw.
        how = "completed" if last else "promoted"
        why = (f"{what}; {how} without evidence: {len(short)} of {len(results)} gates had too few samples "
               f"({', '.join(short)})")
    else:
        why = f"{what} with every gate holding"
    return Decision("complete" if last else "promote", why)


# ----------------------------------------------------------------- device health (pure)

def local_health(policy: HealthPolicy, *, inferences: int, errors: int, p95_new: float | None,
                 p95_old: float | None, crashed: bool = False) -> tuple[bool | None, str]:
    """A device's verdict at the end of its health window: (True ok | False failed | None undecided, reason)."""
    if crashed:
        return False, "the agent crashed during the health window"
    if inferences > 0 and errors / max(1, inferences + errors) > policy.max_error_rate:
        return False, (f"error rate {errors}/{inferences + errors} exceeds {policy.max_error_rate:.1%} "
                       "in the health window")
    if (inferences >= policy.min_inferences and p95_new is not None and p95_old
            and p95_new / p95_old > policy.max_latency_ratio and p95_new - p95_old > policy.latency_slack_ms):
        return False, (f"p95 latency {p95_new:.1f} ms vs {p95_old:.1f} ms before the switch "
                       f"(> x{policy.max_latency_ratio:g})")
    return True, f"{inferences} inferences, {errors} errors in the health window"
