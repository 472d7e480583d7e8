"""What the console shows, assembled from the fleet library (no SQL here).

:class:`ConsoleData` is the one object the web app talks to. It reads the
fleet DB through :class:`edgeship.fleet.db.FleetDB` methods, drives rollouts
through the same controller calls as ``edgeship fleet rollout ...`` and
exports feedback with the same function as ``edgeship fleet export-feedback``.
The query-string parsing and the shaping of rows for pages are pure
functions here, tested directly.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ...errors import EdgeshipError, RolloutError
from .. import figures
from . import auth

__all__ = ["ConsoleData", "QueryError", "parse_device_query", "filter_sort_devices", "DEVICE_SORT_KEYS",
           "parse_int", "parse_stages", "parse_soak", "shape_gate", "stage_timeline"]

DEVICE_SORT_KEYS = ("device", "online", "model", "last_seen", "p95_ms", "error_rate", "negative_rate", "drift")
# The feedback page covers this many days (totals and series).
FEEDBACK_DAYS = 7
_P95_CACHE_MAX = 50_000  # devices whose p95 is kept (a few hundred bytes each)


class QueryError(EdgeshipError, ValueError):
    """A query parameter or form field the console cannot use; the message names it."""


# ----------------------------------------------------------------- pure helpers

def parse_int(name: str, value: Any, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(str(value).strip())
    except ValueError as exc:
        raise QueryError(f"parameter {name!r} must be an integer, got {str(value)[:40]!r}") from exc
    if not lo <= n <= hi:
        raise QueryError(f"parameter {name!r} must be between {lo} and {hi}, got {n}")
    return n


def parse_device_query(q: str = "", status: str = "", model: str = "", drift: str = "", sort: str = "device",
                       order: str = "asc", limit: Any = 200, offset: Any = 0) -> dict:
    """Validate the device list's query string; QueryError names the bad parameter."""
    if len(q) > 128:
        raise QueryError("parameter 'q' is longer than 128 characters")
    if status not in ("", "online", "offline"):
        raise QueryError(f"parameter 'status' must be online or offline, got {status[:40]!r}")
    if drift not in ("", "yes", "no"):
        raise QueryError(f"parameter 'drift' must be yes or no, got {drift[:40]!r}")
    if sort not in DEVICE_SORT_KEYS:
        raise QueryError(f"parameter 'sort' must be one of {', '.join(DEVICE_SORT_KEYS)}, got {sort[:40]!r}")
    if order not in ("asc", "desc"):
        raise QueryError(f"parameter 'order' must be asc or desc, got {order[:40]!r}")
    if len(model) > 128:
        raise QueryError("parameter 'model' is longer than 128 characters")
    return {"q": q, "status": status, "model": model, "drift": drift, "sort": sort, "order": order,
            "limit": parse_int("limit", limit, 200, 1, 5000), "offset": parse_int("offset", offset, 0, 0, 10 ** 7)}


def filter_sort_devices(rows: list[dict], p: dict) -> tuple[int, list[dict]]:
    """Apply a parsed device query to device rows; return (total after filter, page)."""
    out = rows
    if p["q"]:
        needle = p["q"].lower()
        out = [r for r in out if needle in r["device"].lower()]
    if p["status"]:
        want = p["status"] == "online"
        out = [r for r in out if bool(r.get("online")) == want]
    if p["model"]:
        out = [r for r in out if (r.get("model_version") or "") == p["model"]]
    if p["drift"]:
        want = p["drift"] == "yes"
        out = [r for r in out if bool(r.get("drift")) == want]
    key = {"model": "model_version"}.get(p["sort"], p["sort"])
    present = [r for r in out if r.get(key) is not None]
    missing = [r for r in out if r.get(key) is None]
    present.sort(key=lambda r: (r[key], r["device"]), reverse=p["order"] == "desc")
    # Devices with no figure yet sort last either way: they are the least informative.
    out = present + sorted(missing, key=lambda r: r["device"])
    return len(out), out[p["offset"]: p["offset"] + p["limit"]]


def parse_stages(text: str) -> list[float] | None:
    if not text.strip():
        return None
    try:
        stages = [float(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError as exc:
        raise QueryError(f"stages {text[:60]!r}: give percentages separated by commas, e.g. 1,10,50,100") from exc
    if not stages or any(not (0 < s <= 100) for s in stages) or stages != sorted(stages) or stages[-1] != 100:
        raise QueryError(f"stages {text[:60]!r}: increasing percentages in (0, 100] ending at 100, e.g. 1,10,50,100")
    return stages


def parse_soak(text: Any, n_stages: int | None) -> float | list[float]:
    """Soak seconds: one number for every stage, or one per stage ("5,600,600")."""
    text = str(text or "").strip()
    if not text:
        return 1800.0
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise QueryError(f"soak_s {text[:60]!r}: give seconds, one number or one per stage") from exc
    if not values or any(not (0 <= v <= 30 * 86400) or v != v for v in values):
        raise QueryError(f"soak_s {text[:60]!r}: seconds between 0 and 2592000")
    if len(values) == 1:
        return values[0]
    if n_stages is not None and len(values) != n_stages:
        raise QueryError(f"soak_s {text[:60]!r}: {len(values)} values for {n_stages} stages")
    return values


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt_figure(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "rate":
        return f"{100 * v:.2f} %"
    if unit == "ratio":
        return f"{v:.2f}×"
    if unit == "ms":
        return f"{v:.2f} ms"
    return f"{v:.4g}"


# Verdicts of edgeship.rollout.evaluate_gate, as the page words them.
VERDICT_TEXT = {"pass": "pass", "hold": "hold (not yet passing)", "fail": "fail",
                "insufficient": "waiting for samples"}


def shape_gate(g: dict) -> dict:
    """One :class:`edgeship.rollout.GateResult` as the page shows it.

    Rate gates compare the canary's rate with the control's plus ``threshold``
    (an allowed absolute increase; ``failures`` is canary-only: the rate
    itself against ``threshold``); ``latency_p95`` and ``metric:`` gates
    compare the canary with control × ``threshold``. ``threshold_line`` is
    that limit in the units of the canary/control figures, for the chart.
    """
    name = str(g.get("name") or "gate")
    canary, control, threshold = _num(g.get("canary")), _num(g.get("control")), _num(g.get("threshold"))
    unit = g.get("unit") or ("ratio" if name == "latency_p95" or name.startswith("metric:") else "rate")
    verdict = g.get("verdict")
    if verdict not in VERDICT_TEXT:
        ok = g.get("ok")
        verdict = "insufficient" if ok is None else ("pass" if ok else "fail")
    canary_only = name == "failures"
    if threshold is None:
        line, thr_text = None, "—"
    elif unit == "ratio":
        line = control * threshold + float(g.get("slack") or 0.0) if control is not None else None
        thr_text = f"≤ {threshold:.2f}× control"
    elif canary_only:
        line, thr_text = threshold, f"≤ {100 * threshold:.2f} %"
    else:
        line = control + threshold if control is not None else None
        thr_text = f"≤ control + {100 * threshold:.2f} pp"
    fig_unit = "ms" if name == "latency_p95" else ("num" if unit == "ratio" else "rate")
    return {
        "name": name, "canary": canary, "control": control, "threshold": threshold, "unit": unit,
        "percent": fig_unit == "rate",
        "canary_text": _fmt_figure(canary, fig_unit),
        "control_text": "—" if canary_only else _fmt_figure(control, fig_unit),
        "threshold_text": thr_text, "threshold_line": line, "verdict": verdict,
        "verdict_text": VERDICT_TEXT[verdict],
        "canary_n": g.get("canary_n"), "control_n": None if canary_only else g.get("control_n"),
        "min_samples": g.get("min_samples"), "detail": g.get("detail") or "",
        "history": g.get("history"),
    }


def stage_timeline(stages: list, current: int | None, state: str, stage_started: float | None = None) -> list[dict]:
    """Stages with status done / current / pending (and aborted at the stage that failed)."""
    out = []
    finished = state in ("completed", "done", "promoted", "succeeded")
    for i, s in enumerate(stages):
        if isinstance(s, dict):
            pct, soak = _num(s.get("percent", s.get("pct"))), _num(s.get("soak_s", s.get("soak")))
            started = s.get("started")
        else:
            pct, soak, started = _num(s), None, None
        if finished or (current is not None and i < current):
            status = "done"
        elif current is not None and i == current:
            status = "aborted" if state == "aborted" else ("paused" if state == "paused" else "current")
            started = started or stage_started
        else:
            status = "pending"
        out.append({"percent": pct, "soak_s": soak, "status": status, "started": started})
    return out


# ----------------------------------------------------------------- the data object

class ConsoleData:
    """The console's view of the fleet.

    ``controller`` is a RolloutController (or None: rollouts then show
    read-only from the DB); ``packages_dir`` is what ``--serve-packages``
    serves; ``export_dir`` receives feedback exports.
    """

    def __init__(self, db, *, controller=None, packages_dir: str | os.PathLike | None = None,
                 export_dir: str | os.PathLike | None = None, package_url: str | None = None,
                 online_window_s: float = 15 * 60.0, clock: Callable[[], float] = time.time,
                 extra_routes: list | None = None) -> None:
        self.db = db
        self.controller = controller
        self.packages_dir = Path(packages_dir) if packages_dir else None
        self.export_dir = Path(export_dir) if export_dir else Path(tempfile.gettempdir()) / "edgeship-console-exports"
        self.package_url = package_url
        self.window_s = online_window_s
        self.clock = clock
        self._extra_routes = list(extra_routes or [])
        self._export_lock = threading.Lock()
        self._p95_cache: dict[str, tuple[tuple, float | None]] = {}  # device -> (its window ids, p95)
        self._p95_lock = threading.Lock()

    def extra_routes(self) -> list:
        return list(self._extra_routes)

    # -------------------------------------------------------- sessions / audit
    def session_put(self, s: auth.Session) -> None:
        self.db.console_session_put(auth.token_digest(s.sid), s.user, s.csrf, s.created, s.expires)
        self.db.console_session_purge(self.clock())

    def session_get(self, sid: str) -> auth.Session | None:
        row = self.db.console_session_get(auth.token_digest(sid))
        if row is None:
            return None
        return auth.Session(sid=sid, user=row["user"], csrf=row["csrf"], created=row["created"], expires=row["expires"])

    def session_delete(self, sid: str) -> None:
        self.db.console_session_delete(auth.token_digest(sid))

    def audit(self, *, who: str, action: str, target: str, outcome: str, remote: str = "") -> None:
        self.db.audit_add(ts=self.clock(), who=who[:128], action=action[:64], target=target[:256],
                          outcome=outcome[:512], remote=remote[:64])

    def audit_list(self, limit: Any = 200) -> list[dict]:
        return self.db.audit_list(limit=parse_int("limit", limit, 200, 1, 1000))

    # -------------------------------------------------------- devices
    def _device_rows(self) -> list[dict]:
        # Figures over the online window, counted by edgeship.fleet.figures as the report counts them.
        since = self.clock() - self.window_s
        sums = self.db.telemetry_sums(since)
        feedback = _by_device(self.db.feedback(since=since))
        p95 = self._p95s(sums, since)
        return [device_row(r, (), feedback.get(r["device"], []), sums=sums.get(r["device"]),
                           p95_ms=p95.get(r["device"]))
                for r in self.db.console_devices()]

    def _p95s(self, sums: dict[str, dict], since: float) -> dict[str, float | None]:
        """Each device's p95 over its windows since ``since``, from the windows' merged histograms.

        Why a cache: merging means parsing every window's message (100,000 in a
        1,000-device fleet), which made the device list several times slower.
        A window never changes once stored, so a device whose windows are the
        ones seen last time (same count, first and last ts) has the same p95;
        only devices with a new or expired window are re-read, in one query.
        """
        keys = {d: (s["windows"], s["first"], s["last"]) for d, s in sums.items()}
        with self._p95_lock:
            cache = self._p95_cache
            stale = [d for d, key in keys.items() if cache.get(d, (None,))[0] != key]
            if len(cache) + len(stale) > _P95_CACHE_MAX:  # bounded: start over
                cache.clear()
                stale = list(keys)
            if stale:
                fresh = _by_device(self.db.telemetry(since=since, devices=stale))
                for d in stale:
                    cache[d] = (keys[d], figures.latency_percentile(fresh.get(d, []), 95))
            return {d: cache[d][1] for d in keys}

    def summary(self, rows: list[dict] | None = None) -> dict:
        rows = self._device_rows() if rows is None else rows
        online = sum(1 for r in rows if r.get("online"))
        try:
            running = sum(1 for r in self.rollouts() if r.get("state") in ("running", "paused"))
        except EdgeshipError:
            running = 0
        return {"devices": len(rows), "online": online, "offline": len(rows) - online,
                "drifting": sum(1 for r in rows if r.get("drift")), "rollouts_running": running}

    def devices(self, **params: Any) -> dict:
        p = parse_device_query(**params)
        rows = self._device_rows()
        total, page = filter_sort_devices(rows, p)
        models = sorted({r["model_version"] for r in rows if r.get("model_version")})
        return {"total": total, "limit": p["limit"], "offset": p["offset"], "window_s": self.window_s,
                "models": models, "summary": self.summary(rows), "items": page}

    def device(self, device: str) -> dict | None:
        if len(device) > 128:
            return None
        rows = [r for r in self._device_rows() if r["device"] == device]
        if not rows:
            return None
        d = rows[0]
        d.update(self.db.console_device_history(device))
        hist = d["history"]
        d["history_p95"] = [[w["ts"], w.get("p95_ms")] for w in hist]
        d["history_inferences"] = [[w["ts"], w.get("inferences")] for w in hist]
        d["history_errors"] = [[w["ts"], w.get("errors")] for w in hist]
        return d

    # -------------------------------------------------------- rollouts
    def can_start(self) -> bool:
        return self.controller is not None and self.packages_dir is not None

    def packages(self) -> list[dict]:
        """The ``.edgepkg`` files of the served directory (manifest name/version; unreadable ones skipped)."""
        if self.packages_dir is None or not self.packages_dir.is_dir():
            return []
        from ...package import open_package

        out = []
        for path in sorted(self.packages_dir.glob("*.edgepkg"))[:500]:
            try:
                pkg = open_package(path)
            except EdgeshipError:
                continue
            out.append({"file": path.name, "name": pkg.name, "version": pkg.version,
                        "signed": pkg.signature is not None, "size": path.stat().st_size})
        return out

    def rollouts(self) -> list[dict]:
        # The controller's list() (what `edgeship fleet rollout list` shows) reads only
        # the rollouts table; without a controller, the statuses it last stored.
        if self.controller is not None:
            rows = self.controller.list()
        elif hasattr(self.db, "rollouts_list"):
            rows = self.db.rollouts_list()
        else:
            rows = []
        return [shape_rollout(_as_dict(r), self.clock(), summary=True) for r in rows]

    def rollout(self, rollout_id: str) -> dict | None:
        if len(rollout_id) > 128:
            return None
        st = row = None
        try:
            # The status the running controller stores every tick: computing it
            # reads all telemetry since the rollout began, which a page load must
            # not repeat. Until the first tick has stored one, ask the controller.
            # Stored status is used only while it matches the rollout's current seq:
            # a command (pause, abort, ...) moves the seq on at once.
            if hasattr(self.db, "rollout_status") and hasattr(self.db, "rollout_get"):
                row = self.db.rollout_get(rollout_id)
                saved = self.db.rollout_status(rollout_id) if row is not None else None
                if saved is not None and saved.get("seq") == row.get("seq") and saved.get("state") == row.get("state"):
                    st = saved
                elif self.controller is None:
                    st = saved
            if st is None and self.controller is not None:
                st = self.controller.status(rollout_id)
            elif st is not None and row is not None:
                # Device reports keep coming after the last stored status (an aborted
                # rollout's devices roll back; nothing re-stores it then): count them now,
                # with the function `edgeship fleet rollout status` uses.
                counted = figures.rollout_device_states(self.db, row)
                st = {**st, "devices_per_state": counted["per_state"], "pinned": counted["pinned"]}
        except RolloutError:
            return None
        if st is None:
            return None
        out = shape_rollout(_as_dict(st), self.clock())
        if hasattr(self.db, "rollout_gate_evals"):
            attach_gate_history(out, self.db.rollout_gate_evals(rollout_id))
        return out

    def rollout_action(self, rollout_id: str, action: str, who: str) -> dict:
        if self.controller is None:
            raise RolloutError("this console runs without a rollout controller; start it with --broker to act on rollouts")
        if action == "promote":
            st = self.controller.promote(rollout_id, force=True, who=who)
        else:
            st = getattr(self.controller, action)(rollout_id, who=who)
        return shape_rollout(_as_dict(st), self.clock(), summary=True)

    def start_rollout(self, package: str, *, stages: str = "", soak_s: str = "", who: str = "") -> dict:
        if self.controller is None or self.packages_dir is None:
            raise RolloutError("starting rollouts needs a controller (--broker) and --serve-packages DIR")
        names = {p["file"] for p in self.packages()}
        if package not in names:
            raise QueryError(f"package {package[:80]!r} is not in the served package directory")
        st = parse_stages(stages)
        soak = parse_soak(soak_s, len(st) if st else None)
        status = self.controller.start_rollout(self.packages_dir / package, stages=st, soak_s=soak, who=who)
        return shape_rollout(_as_dict(status), self.clock(), summary=True)

    # -------------------------------------------------------- feedback
    def feedback(self, model: str = "", bucket: Any = "", samples: int = 24) -> dict:
        """Per-version feedback over the last ``FEEDBACK_DAYS`` days, as ``edgeship fleet report`` counts it."""
        if len(model) > 128:
            raise QueryError("parameter 'model' is longer than 128 characters")
        bucket_s = parse_int("bucket", bucket, 0, 60, 7 * 86400)
        now = self.clock()
        rows = self.db.feedback(since=now - FEEDBACK_DAYS * 86400, model_version=model or None)
        latest = self.db.console_latest_feedback("incorrect", limit=samples, model_version=model or None)
        return shape_feedback(rows, latest, bucket_s or None, model)

    def feedback_input_image(self, device: str, msg_id: str) -> tuple[bytes, str] | None:
        from .images import input_to_png

        if len(device) > 128 or len(msg_id) > 128:
            return None
        data = self.db.feedback_input(f"{device}/{msg_id}")
        return None if data is None else input_to_png(data)

    def export_feedback(self, model: str = "") -> tuple[Path, int]:
        from .. import report

        self.export_dir.mkdir(parents=True, exist_ok=True)
        with self._export_lock:
            out = self.export_dir / f"feedback-{int(self.clock())}.npz"
            path, count = report.export_feedback(self.db, out, model_version=model or None)
        return Path(path), int(count)


def drift_flagged(body: Any) -> bool:
    """Whether a telemetry window says its inputs or predictions drift.

    The agent's drift block (:meth:`edgeship.drift.WindowStats.report`) carries
    the verdict in ``alarm`` (None when the window had too few samples to
    judge: not flagged). Older or hand-made blocks without ``alarm`` are judged
    with the same rule, :func:`edgeship.drift.is_alarm`, on their scores.
    """
    if not isinstance(body, dict):
        return False
    drift = body.get("drift")
    if not isinstance(drift, dict):
        return False
    if "alarm" in drift:
        return drift["alarm"] is True
    from ...drift import is_alarm

    stack = [drift]
    while stack:
        node = stack.pop()
        psi, z = node.get("psi"), node.get("z")
        if is_alarm(psi if isinstance(psi, (int, float)) else None, z if isinstance(z, (int, float)) else None):
            return True
        stack.extend(v for v in node.values() if isinstance(v, dict))
    return False


def _by_device(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["device"], []).append(r)
    return out


def device_row(r: dict, windows: list[dict] = (), feedback: list[dict] = (), *, p95_ms: Any = ...,
               sums: dict | None = None) -> dict:
    """A device as the device list shows it (pure).

    ``r``: a row of :meth:`FleetDB.console_devices`; ``windows`` and
    ``feedback``: the device's telemetry and feedback rows in the online
    window, oldest first. Or, from the console's cache, ``sums`` (the windows'
    summed ``inferences``/``errors``, :meth:`FleetDB.telemetry_sums`) and
    ``p95_ms`` computed from them. Every figure is the fleet library's
    (:mod:`edgeship.fleet.figures`), the one ``edgeship fleet report`` prints.
    """
    body = r.get("telemetry_body")
    try:
        parsed = json.loads(body) if isinstance(body, str) else None
    except ValueError:
        parsed = None
    if sums is not None:
        inf, err = int(sums.get("inferences") or 0), int(sums.get("errors") or 0)
    else:
        inf = sum(int(w.get("inferences") or 0) for w in windows) if windows else None
        err = sum(int(w.get("errors") or 0) for w in windows) if windows else None
    verdicts, negative = figures.feedback_counts(feedback)
    return {
        "device": r["device"], "fleet": r.get("fleet"), "online": bool(r.get("online")),
        "last_seen": r.get("last_seen") or None, "model_name": r.get("model_name"),
        "model_version": r.get("model_version"), "agent_version": r.get("agent_version"),
        "p95_ms": _num(figures.latency_percentile(windows, 95) if p95_ms is ... else p95_ms), "inferences": inf,
        "error_rate": figures.error_rate(inf, err),
        "negative_rate": figures.negative_rate(verdicts, negative), "feedback": verdicts,
        "drift": drift_flagged(parsed),
    }


def shape_feedback(rows: list[dict], latest: list[dict], bucket_s: float | None, model: str) -> dict:
    """Per-version counts and negative rate (the report's own figures), series per version, latest samples."""
    from ...protocol import FEEDBACK_KINDS
    from ..report import pick_bucket, summarize

    summary = summarize([], rows, bucket_s=bucket_s)
    bucket = float(bucket_s or summary["bucket_s"] or pick_bucket(1.0))
    versions = [{"version": v.version, "counts": dict(v.feedback), "total": sum(v.feedback.values()),
                 "verdicts": v.verdicts, "negative_rate": v.negative_rate} for v in summary["versions"]]
    per: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        per.setdefault(r.get("model_version") or "(unknown)", {}).setdefault(int(r["ts"] // bucket), []).append(r)
    rate_series, count_series = [], []
    for v in sorted(per):
        cells = sorted(per[v].items())
        counts = [figures.feedback_counts(c) for _, c in cells]
        # Plotted at the bucket's end: the figure "as of" that time.
        rate_series.append({"name": v, "points": [[(b + 1) * bucket, figures.negative_rate(*n)]
                                                  for (b, _), n in zip(cells, counts)]})
        count_series.append({"name": v, "points": [[(b + 1) * bucket, len(c)] for b, c in cells]})
    samples = []
    for r in latest:
        value = r.get("label") or r.get("value")
        if isinstance(value, str) and value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        samples.append({"id": f"{r['device']}/{r['msg_id']}", "device": r["device"], "msg_id": r["msg_id"],
                        "ts": r["ts"], "prediction_id": r["prediction_id"], "model_version": r.get("model_version"),
                        "value": value, "has_input": bool(r.get("has_input")), "has_image": bool(r.get("has_input"))})
    kinds = [k for k in FEEDBACK_KINDS if any(k in e["counts"] for e in versions)] or ["correct", "incorrect"]
    return {"model": model, "bucket_s": bucket, "days": FEEDBACK_DAYS, "kinds": kinds, "versions": versions,
            "rate_series": rate_series, "count_series": count_series, "samples": samples}


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        return obj
    for attr in ("as_dict", "to_dict"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def _first(d: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


ACTIVE_STATES = ("running", "paused")


def shape_rollout(st: dict, now: float, summary: bool = False) -> dict:
    """A controller status as the rollout pages show it (pure).

    Field names follow :meth:`RolloutController.status`; the page needs the
    stage timeline, devices per state, gates with canary/control/threshold,
    the soak time left and which actions apply in the current state.
    """
    pkg = st.get("package") if isinstance(st.get("package"), dict) else {}
    state = str(_first(st, "state", "status", default="unknown"))
    stages_raw = _first(st, "stages", default=[]) or []
    current = _first(st, "stage_index", "stage", "current_stage")
    current = int(current) if isinstance(current, (int, float)) and not isinstance(current, bool) else None
    stage_started = _num(_first(st, "stage_started", "stage_started_at"))
    stages = stage_timeline(stages_raw, current, state, stage_started)
    soak_default = _num(_first(st, "soak_s"))
    for s in stages:
        if s["soak_s"] is None:
            s["soak_s"] = soak_default
    out = {
        "rollout_id": str(_first(st, "rollout_id", "id", default="")),
        "package_name": _first(st, "package_name", default=pkg.get("name")),
        "package_version": _first(st, "package_version", "version", default=pkg.get("version")),
        "package_sha256": _first(st, "package_sha256", default=pkg.get("sha256")),
        "state": state,
        "stage_number": (current + 1) if current is not None else None,
        "stage_count": len(stages),
        "stage_percent": stages[current]["percent"] if current is not None and 0 <= current < len(stages) else None,
        "created": _num(_first(st, "created", "created_at", "started", "started_at")),
        "updated": _num(_first(st, "updated", "updated_at")),
        "reason": _first(st, "reason", "abort_reason", default="") or "",
        "percent": _num(st.get("percent")),
    }
    per_state = _first(st, "devices_per_state", "device_states", "states", default=None)
    if not isinstance(per_state, dict):
        devs = st.get("devices")
        per_state = devs if isinstance(devs, dict) else {}
    per_state = {str(k): int(v) for k, v in per_state.items() if isinstance(v, (int, float))}
    out["devices"] = sum(per_state.values())
    if summary:
        return out
    soak_left = _num(_first(st, "soak_left_s", "soak_remaining_s"))
    if soak_left is None and stage_started is not None and current is not None and 0 <= current < len(stages):
        soak = stages[current]["soak_s"]
        soak_left = max(0.0, stage_started + soak - now) if soak is not None else None
    if state not in ACTIVE_STATES:
        soak_left = None
    gates_raw = _first(st, "gates", default=[]) or []
    if isinstance(gates_raw, dict):
        gates_raw = [{"name": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in gates_raw.items()]
    order = ["assigned", "downloading", "prefetched", "verified", "active", "healthy", "failed", "rolled_back"]
    keys = sorted(per_state, key=lambda k: (order.index(k) if k in order else len(order), k))
    events = _first(st, "events", "history", "timeline", default=[]) or []
    out.update({
        "stages": stages, "soak_left_s": soak_left,
        "devices_per_state": {k: per_state[k] for k in keys},
        "state_bars": [{"label": k, "value": per_state[k], "cls": "st-" + k} for k in keys],
        "gates": [shape_gate(g) for g in gates_raw if isinstance(g, dict)],
        "events": [{"ts": _num(_first(e, "ts", "time")), "kind": str(_first(e, "kind", "event", "type", default="")),
                    "detail": _first(e, "detail", "message", "reason", default="") or ""}
                   for e in events if isinstance(e, dict)][-50:][::-1],
        "decision": st.get("decision") if isinstance(st.get("decision"), dict) else None,
        "can": {"pause": state == "running", "resume": state == "paused",
                "abort": state in ACTIVE_STATES, "promote": state in ACTIVE_STATES},
    })
    return out


def attach_gate_history(rollout: dict, evals: list[dict], max_points: int = 200) -> None:
    """Add each gate's canary/control figures over time (from the controller's stored evaluations)."""
    series: dict[str, dict[str, list]] = {}
    for ev in evals[-max_points:]:
        for g in ev.get("results") or []:
            if not isinstance(g, dict) or "name" not in g:
                continue
            h = series.setdefault(g["name"], {"canary": [], "control": []})
            h["canary"].append([ev["ts"], _num(g.get("canary"))])
            h["control"].append([ev["ts"], _num(g.get("control"))])
    for g in rollout.get("gates", []):
        h = series.get(g["name"])
        if h and len(h["canary"]) > 1:
            g["history"] = h
