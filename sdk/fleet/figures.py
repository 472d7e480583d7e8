"""Each fleet figure computed once: the console, the CLI and ``fleet report`` all call these.

Three places used to count the same things three ways and disagreed on the
same DB (issue 16 item 8): the console's device list counted a confirming
``label`` as negative feedback, took p95 from a device's latest window only
(an idle window gave "—" for a device with 131 inferences), and the rollout
page showed devices per state from a snapshot nothing refreshed after the
rollout ended. The rules live here now, as plain functions over DB rows:

* :func:`is_negative` / :func:`feedback_counts` — negative feedback;
* :func:`window_histogram` / :func:`latency_percentile` — latency over windows;
* :func:`error_rate` — errors among all attempts;
* :func:`gate_value` — a gate's canary/control figure as text;
* :func:`count_device_states` (pure) and :func:`rollout_device_states` (reads
  the DB) — devices per state of a rollout.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from ..metrics import Histogram

__all__ = ["VERDICT_KINDS", "is_negative", "feedback_counts", "negative_rate", "error_rate", "window_body",
           "window_histogram", "latency_percentile", "gate_value", "count_device_states", "rollout_device_states"]

#: Feedback kinds that judge a prediction; the negative rate is over these only.
VERDICT_KINDS = ("correct", "incorrect", "label")


def is_negative(kind: str, value: Any = None, predicted: Any = None) -> bool:
    """Negative feedback: ``incorrect``, or a ``label`` that differs from the prediction."""
    if kind == "incorrect":
        return True
    if kind == "label":
        return predicted is None or str(value) != str(predicted)
    return False


def feedback_counts(rows: Iterable[Mapping]) -> tuple[int, int]:
    """(verdicts, negative) over :meth:`FleetDB.feedback` rows."""
    verdicts = negative = 0
    for r in rows:
        if r["kind"] in VERDICT_KINDS:
            verdicts += 1
            negative += int(is_negative(r["kind"], r.get("value"), r.get("predicted")))
    return verdicts, negative


def negative_rate(verdicts: int, negative: int) -> float | None:
    return negative / verdicts if verdicts else None


def error_rate(inferences: int | None, errors: int | None) -> float | None:
    """Errors among all attempts (successful inferences + errors); None without any."""
    inf, err = int(inferences or 0), int(errors or 0)
    return err / (inf + err) if inf + err else None


def window_body(row: Mapping) -> dict:
    """A telemetry row's full message (``body`` is JSON text in the DB); {} when unreadable."""
    body = row.get("body")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return {}
    return body if isinstance(body, dict) else {}


def window_histogram(row: Mapping, body: dict | None = None) -> Histogram | None:
    """The latency histogram a telemetry window carries, or None."""
    body = window_body(row) if body is None else body
    lat = body.get("latency_ms")
    hd = lat.get("hist") if isinstance(lat, dict) else None
    if not isinstance(hd, dict):
        return None
    try:
        return Histogram.from_dict(hd)
    except (KeyError, ValueError, TypeError):
        return None


def latency_percentile(windows: Iterable[Mapping], q: float = 95) -> float | None:
    """The ``q``-th latency percentile over telemetry windows (oldest first).

    The windows' histograms are merged, so an idle last window does not hide
    the figure of the windows before it. Windows without a histogram (older
    or hand-made senders) count only when none has one: then the latest
    reported ``p<q>`` is the figure.
    """
    merged: Histogram | None = None
    reported: float | None = None
    key = f"p{q:g}_ms"
    for w in windows:
        h = window_histogram(w)
        if h is not None and h.count:
            if merged is None:
                merged = h
            else:
                try:
                    merged.merge(h)
                except ValueError:  # different bucket bounds: keep what merged so far
                    pass
        v = w.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            reported = float(v)
    if merged is not None:
        return merged.percentile(q)
    return reported


def gate_value(gate: Mapping, v: float | None) -> str:
    """A gate's canary or control figure as ``rollout status`` and ``fleet report`` print it."""
    if v is None:
        return "-"
    if gate["unit"] == "rate":
        return f"{100 * v:.2f}%"
    return f"{v:.2f} ms" if gate["name"] == "latency_p95" else f"{v:.4g}"


def count_device_states(devices: Iterable[str], reports: Iterable[Mapping], *, in_target) -> dict:
    """Devices per state of one rollout (pure).

    ``reports``: the rollout's device reports, oldest first (the last one per
    device wins). A device without a report is ``pending`` when
    ``in_target(device)`` says the published stages include it, otherwise
    ``not_targeted``; a device whose last report says it is pinned counts as
    ``pinned``. Returns ``{"per_state", "failures" (reason kind -> n),
    "pinned" (devices), "latest" (device -> report)}``.
    """
    latest: dict[str, Mapping] = {}
    for r in reports:
        latest[r["device"]] = r
    pinned = sorted(d for d, r in latest.items() if (r.get("reason") or "").startswith("pinned"))
    per_state: dict[str, int] = {}
    failures: dict[str, int] = {}
    for dev in devices:
        r = latest.get(dev)
        if dev in pinned:
            key = "pinned"
        elif r is None:
            key = "pending" if in_target(dev) else "not_targeted"
        else:
            key = r["state"]
            if key == "failed":
                # "phase: ErrorType" (e.g. "download: IntegrityError"): counts by kind, not by message
                reason = ":".join((r.get("reason") or "unknown").split(":")[:2]).strip()[:80]
                failures[reason] = failures.get(reason, 0) + 1
        per_state[key] = per_state.get(key, 0) + 1
    return {"per_state": per_state, "failures": failures, "pinned": pinned, "latest": latest}


def rollout_device_states(db: Any, rollout: Mapping) -> dict:
    """:func:`count_device_states` for a rollout row of :meth:`FleetDB.rollout_get`, read from the DB now."""
    from .. import rollout as ro

    d = json.loads(rollout["plan"]) if isinstance(rollout.get("plan"), str) else dict(rollout.get("plan") or {})
    d.pop("_served", None)
    plan = ro.Plan.from_dict(d)
    devices = [r["device"] for r in db.devices(rollout["fleet"])]
    return count_device_states(devices, db.rollout_reports(rollout["rollout_id"]),
                               in_target=lambda dev: ro.in_stage(ro.bucket(dev, plan.salt), plan.target_percent))
