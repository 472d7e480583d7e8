"""``edgeship fleet report`` and ``edgeship fleet export-feedback``.

The report is built in three steps so other areas can add to it:

1. :func:`summarize` (pure) turns telemetry and feedback rows into per model
   version figures (inferences, error rate, latency p50/p95 overall and per
   time bucket, feedback counts, negative-feedback rate);
2. :func:`render_table` prints them; :func:`plot_versions` draws the PNGs;
3. :func:`build_report` assembles table + PNGs + ``report.html`` and then
   appends every extra :class:`Section` — the rollout report (``--rollout ID``)
   and drift plots register a function ``(db, summary, out_dir) -> Section``
   and pass it in ``sections``; nothing here needs to change for them.

Export (:func:`export_feedback`): feedback that carries the input and a label
(``label`` gives it, ``correct`` confirms the predicted one) becomes an
``.npz`` with one array per input name plus integer ``labels`` — the layout
``edgeship convert`` / the distillation and quantization commands read.
"""
from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import DataError
from ..metrics import Histogram
from .figures import (
    VERDICT_KINDS,
    error_rate,
    gate_value,
    is_negative,
    negative_rate,
    rollout_device_states,
    window_histogram,
)

__all__ = ["parse_since", "is_negative", "summarize", "render_table", "plot_versions", "build_report",
           "Section", "Report", "export_feedback", "pick_bucket", "rollout_section"]


# ----------------------------------------------------------------- pure helpers

def parse_since(text: str | None, now: float | None = None) -> float:
    """``"24h"``, ``"7d"``, ``"30m"``, ``"90s"``, an ISO date/time (UTC) or epoch seconds -> epoch seconds."""
    now = time.time() if now is None else now
    if text is None or text == "":
        return 0.0
    s = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", s)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        return now - float(m.group(1)) * mult
    try:
        v = float(s)
        if v >= 0:
            return v
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DataError(f"--since {text!r} is not understood; use e.g. 24h, 7d, 2026-11-25 or 2026-11-25T06:00") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def pick_bucket(span_s: float, target_points: int = 48) -> float:
    """A round time-bucket width giving about ``target_points`` points over ``span_s``."""
    for b in (60, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400):
        if span_s / b <= target_points:
            return float(b)
    return 7 * 86400.0


def _version_key(row: dict) -> str:
    return row.get("model_version") or "(unknown)"


@dataclass
class VersionFigures:
    version: str
    name: str | None = None
    devices: set = field(default_factory=set)
    windows: int = 0
    inferences: int = 0
    errors: int = 0
    rejected: int = 0
    dropped: int = 0
    latency: Histogram | None = None
    feedback: dict = field(default_factory=dict)
    negative: int = 0
    verdicts: int = 0  # correct + incorrect + label
    series: dict = field(default_factory=dict)  # bucket start -> {"inferences", "errors", "hist"}

    @property
    def error_rate(self) -> float | None:
        return error_rate(self.inferences, self.errors)

    @property
    def negative_rate(self) -> float | None:
        return negative_rate(self.verdicts, self.negative)

    def p(self, q: float) -> float | None:
        return None if self.latency is None else self.latency.percentile(q)

    def as_dict(self) -> dict:
        return {"version": self.version, "name": self.name, "devices": len(self.devices), "windows": self.windows,
                "inferences": self.inferences, "errors": self.errors, "error_rate": self.error_rate,
                "rejected": self.rejected, "dropped": self.dropped, "p50_ms": self.p(50), "p95_ms": self.p(95),
                "p99_ms": self.p(99), "feedback": dict(self.feedback), "negative_rate": self.negative_rate,
                "series": [{"t": t, "inferences": s["inferences"], "errors": s["errors"],
                            "p50_ms": s["hist"].percentile(50) if s["hist"] else None,
                            "p95_ms": s["hist"].percentile(95) if s["hist"] else None}
                           for t, s in sorted(self.series.items())]}


def summarize(telemetry: Iterable[dict], feedback: Iterable[dict], *, bucket_s: float | None = None) -> dict:
    """Per-version figures from DB rows (pure). Returns ``{"versions": [...], "bucket_s", "since", "until"}``."""
    tel = list(telemetry)
    fb = list(feedback)
    ts = [r["ts"] for r in tel] + [r["ts"] for r in fb]
    t0, t1 = (min(ts), max(ts)) if ts else (0.0, 0.0)
    bucket = bucket_s or pick_bucket(max(t1 - t0, 1.0))
    by: dict[str, VersionFigures] = {}
    for r in tel:
        v = by.setdefault(_version_key(r), VersionFigures(_version_key(r)))
        v.name = v.name or r.get("model_name")
        v.devices.add(r["device"])
        v.windows += 1
        v.inferences += int(r.get("inferences") or 0)
        v.errors += int(r.get("errors") or 0)
        v.rejected += int(r.get("rejected") or 0)
        v.dropped += int(r.get("dropped") or 0)
        h = window_histogram(r)
        if h is not None:
            if v.latency is None:
                v.latency = h.copy()
            else:
                try:
                    v.latency.merge(h)
                except ValueError:
                    pass
        b = math.floor(r["ts"] / bucket) * bucket
        s = v.series.setdefault(b, {"inferences": 0, "errors": 0, "hist": None})
        s["inferences"] += int(r.get("inferences") or 0)
        s["errors"] += int(r.get("errors") or 0)
        if h is not None:
            if s["hist"] is None:
                s["hist"] = h.copy()
            else:
                try:
                    s["hist"].merge(h)
                except ValueError:
                    pass
    for r in fb:
        v = by.setdefault(_version_key(r), VersionFigures(_version_key(r)))
        kind = r["kind"]
        v.feedback[kind] = v.feedback.get(kind, 0) + 1
        if kind in VERDICT_KINDS:
            v.verdicts += 1
            if is_negative(kind, r.get("value"), r.get("predicted")):
                v.negative += 1
    versions = sorted(by.values(), key=lambda x: x.version)
    return {"versions": versions, "bucket_s": bucket, "since": t0, "until": t1}


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec or ".3g")
    return str(v)


def render_table(summary: dict) -> str:
    """A readable fixed-width table, one row per model version."""
    head = ["version", "devices", "inferences", "error rate", "p50 ms", "p95 ms", "p99 ms", "feedback",
            "negative"]
    rows = []
    for v in summary["versions"]:
        fbn = sum(v.feedback.values())
        rows.append([v.version, str(len(v.devices)), str(v.inferences),
                     "-" if v.error_rate is None else f"{100 * v.error_rate:.2f}%",
                     _fmt(v.p(50), ".3g"), _fmt(v.p(95), ".3g"), _fmt(v.p(99), ".3g"),
                     str(fbn), "-" if v.negative_rate is None else f"{100 * v.negative_rate:.1f}%"])
    if not rows:
        return "no telemetry or feedback in the selected period"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _save(fig, path: Path, paths: list[Path], *, dates: bool = False) -> None:
    """Lay out, write ``path`` as PNG, free the figure (pyplot keeps every open one) and record it."""
    import matplotlib.pyplot as plt

    if dates:
        fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)


def plot_versions(summary: dict, out_dir: Path) -> list[Path]:
    """PNG plots: latency p50/p95 over time, inferences and error rate over time, feedback per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    vs = summary["versions"]

    def when(t: float) -> datetime:
        return datetime.fromtimestamp(t, tz=timezone.utc)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, v in enumerate(vs):
        pts = sorted((t, s["hist"]) for t, s in v.series.items() if s["hist"] is not None and s["hist"].count)
        if not pts:
            continue
        xs = [when(t) for t, _ in pts]
        color = f"C{i % 10}"  # one colour per version: solid p50, dashed p95
        ax.plot(xs, [h.percentile(50) for _, h in pts], marker=".", color=color, label=f"{v.version} p50")
        ax.plot(xs, [h.percentile(95) for _, h in pts], marker=".", color=color, linestyle="--",
                label=f"{v.version} p95")
    ax.set_title("Latency per model version (ms)")
    ax.set_ylabel("ms")
    ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    _save(fig, out_dir / "latency.png", paths, dates=True)

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for v in vs:
        pts = sorted(v.series.items())
        if not pts:
            continue
        xs = [when(t) for t, _ in pts]
        a1.plot(xs, [s["inferences"] for _, s in pts], marker=".", label=v.version)
        a2.plot(xs, [100 * s["errors"] / (s["inferences"] + s["errors"]) if s["inferences"] + s["errors"] else 0
                     for _, s in pts], marker=".", label=v.version)
    a1.set_title(f"Inferences per {summary['bucket_s'] / 60:g} min bucket")
    a2.set_title("Error rate (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    a2.set_xlabel("time (UTC)")
    _save(fig, out_dir / "inferences_errors.png", paths, dates=True)

    fig, ax = plt.subplots(figsize=(9, 4))
    kinds = ("correct", "incorrect", "label", "rating", "comment")
    x = range(len(vs))
    width = 0.15
    for i, k in enumerate(kinds):
        ax.bar([xi + (i - 2) * width for xi in x], [v.feedback.get(k, 0) for v in vs], width, label=k)
    ax.set_xticks(list(x))
    ax.set_xticklabels([v.version for v in vs])
    ax.set_title("Feedback per model version")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, out_dir / "feedback.png", paths)
    return paths


@dataclass
class Section:
    """One extra part of the report (rollout, drift, ...)."""

    title: str
    text: str = ""                      # printed after the main table
    html: str = ""                      # trusted HTML fragment (escape your own data)
    plots: list[Path] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class Report:
    summary: dict
    table: str
    out_dir: Path | None
    plots: list[Path]
    html_path: Path | None
    sections: list[Section]

    def text(self) -> str:
        parts = [self.table]
        for s in self.sections:
            if s.text:
                parts += ["", f"== {s.title} ==", s.text]
        if self.html_path:
            parts += ["", f"report: {self.html_path}"]
        return "\n".join(parts)


SectionFn = Callable[[Any, dict, "Path | None"], Section]


def build_report(db: Any, *, since: float = 0.0, until: float | None = None, out_dir: str | Path | None = None,
                 bucket_s: float | None = None, sections: Sequence[SectionFn] = ()) -> Report:
    """Query, summarize, and (with ``out_dir``) write PNGs, ``summary.json`` and ``report.html``."""
    tel = db.telemetry(since=since, until=until)
    fb = []
    for r in db.feedback(since=since):
        if until is not None and r["ts"] >= until:
            continue
        fb.append(r)
    summary = summarize(tel, fb, bucket_s=bucket_s)
    table = render_table(summary)
    out = Path(out_dir) if out_dir else None
    plots: list[Path] = []
    if out is not None:
        plots = plot_versions(summary, out)
    extra = [fn(db, summary, out) for fn in sections]
    html_path = None
    if out is not None:
        (out / "summary.json").write_text(json.dumps(
            {"generated": time.time(), "since": since, "bucket_s": summary["bucket_s"],
             "versions": [v.as_dict() for v in summary["versions"]],
             "sections": {s.title: s.data for s in extra}}, indent=2, default=str))
        html_path = out / "report.html"
        html_path.write_text(_html(summary, table, plots, extra, out))
    return Report(summary, table, out, plots, html_path, extra)


def _html(summary: dict, table: str, plots: list[Path], sections: list[Section], out: Path) -> str:
    esc = html.escape
    rows = []
    for v in summary["versions"]:
        d = v.as_dict()
        rows.append("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in (
            d["version"], d["devices"], d["inferences"],
            None if d["error_rate"] is None else f"{100 * d['error_rate']:.2f}%",
            d["p50_ms"], d["p95_ms"], d["p99_ms"], ", ".join(f"{k}: {n}" for k, n in sorted(d["feedback"].items())),
            None if d["negative_rate"] is None else f"{100 * d['negative_rate']:.1f}%")) + "</tr>")
    imgs = "".join(f'<figure><img src="{esc(p.relative_to(out).as_posix())}" alt="{esc(p.stem)}"></figure>'
                   for p in plots)
    extra = ""
    for s in sections:
        extra += f"<h2>{esc(s.title)}</h2>{s.html or '<pre>' + esc(s.text) + '</pre>'}"
        extra += "".join(f'<figure><img src="{esc(p.relative_to(out).as_posix() if p.is_relative_to(out) else str(p))}">'
                         "</figure>" for p in s.plots)
    period = "-"
    if summary["versions"]:
        period = (f"{datetime.fromtimestamp(summary['since'], tz=timezone.utc):%Y-%m-%d %H:%M} — "
                  f"{datetime.fromtimestamp(summary['until'], tz=timezone.utc):%Y-%m-%d %H:%M} UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeship fleet report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>edgeship fleet report</h1><p>Period: {esc(period)}; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>
<h2>Per model version</h2>
<table><tr><th>version</th><th>devices</th><th>inferences</th><th>error rate</th><th>p50 ms</th><th>p95 ms</th>
<th>p99 ms</th><th>feedback</th><th>negative feedback</th></tr>{''.join(rows)}</table>
<p>Negative feedback = <code>incorrect</code>, or a <code>label</code> that differs from the prediction,
over all correct/incorrect/label feedback.</p>
{imgs}{extra}
</body></html>
"""


# ----------------------------------------------------------------- export

def export_feedback(db: Any, out: str | Path, *, model_version: str | None = None, since: float = 0.0,
                    labels: Sequence[str] | None = None, holdout: float = 0.2) -> tuple[Path, int]:
    """Write labelled field samples to ``out`` (.npz); returns (path, number of samples).

    ``labels`` (the model's class names, in index order) maps label names to
    class indices; without it every label must be an integer. The train /
    held-out files and the provenance are written beside it
    (:func:`edgeship.fleet.field.export_field_data`, which says more).
    """
    from .field import export_field_data

    res = export_field_data(db, out, model_version=model_version, since=since, labels=labels, holdout=holdout)
    return res.path, res.samples


# ----------------------------------------------------------------- rollout section (issue 8)

def rollout_section(rollout_id: str) -> SectionFn:
    """A :class:`Section` for ``edgeship fleet report --rollout ID``: timeline, cohort figures, gate decisions.

    Reads what the rollout controller stored (rollout row, events, gate
    evaluations) and the devices' rollout reports; with an output folder it
    draws ``rollout_timeline.png`` (published percent and devices per state
    over time) and ``rollout_gates.png`` (each gate's canary vs control over
    time, with its threshold and the decisions).
    """

    def section(db: Any, summary: dict, out: Path | None) -> Section:
        row = db.rollout_get(rollout_id)
        if row is None:
            raise DataError(f"no rollout {rollout_id!r} in the fleet DB (edgeship fleet rollout list)")
        events = db.rollout_events(rollout_id)
        evals = db.rollout_gate_evals(rollout_id)
        reports = db.rollout_reports(rollout_id)
        status = db.rollout_status(rollout_id) or {}
        t0 = row["created"]

        def rel(t: float) -> str:
            return f"+{t - t0:7.1f}s"

        lines = [f"{row['package_name']} {row['package_version']} ({row['package_sha256'][:12]}) to fleet "
                 f"{row['fleet']}: {row['state']}" + (f" — {row['reason']}" if row["reason"] else ""), "", "timeline:"]
        for e in events:
            detail = e["detail"]
            try:
                d = json.loads(detail) if detail.startswith("{") else {}
            except ValueError:
                d = {}
            text = d.get("reason") or (f"{d['percent']:g}% published" if "percent" in d else detail)
            lines.append(f"  {rel(e['ts'])}  {e['kind']:<14} stage {e['stage_index'] + 1}  {text}"
                         + (f"  [{e['who']}]" if e["who"] and e["who"] != "controller" else ""))
        # The same count as `edgeship fleet rollout status` and the console's rollout page.
        per = rollout_device_states(db, row)["per_state"]
        lines += ["", "devices: " + (", ".join(f"{k} {v}" for k, v in sorted(per.items())) or "none reported")]
        gates = status.get("gates") or (evals[-1]["results"] if evals else [])
        if gates:
            lines += ["", "gates (canary vs control, last evaluation):"]
            for g in gates:
                lines.append(f"  {g['name']:<18} {g['verdict']:<12} canary {gate_value(g, g['canary'])} "
                             f"(n={g['canary_n']}) control {gate_value(g, g['control'])} (n={g['control_n']})  "
                             f"{g.get('detail', '')}")
        decisions = [e for e in events if e["kind"] in ("promote", "complete", "abort", "pause", "force_promote",
                                                        "force_complete")]
        plots: list[Path] = []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            plots = _plot_rollout(out, t0, events, reports, evals)
        return Section(title=f"rollout {rollout_id}", text="\n".join(lines), plots=plots,
                       html="<pre>" + html.escape("\n".join(lines)) + "</pre>",
                       data={"rollout": {k: row[k] for k in ("rollout_id", "state", "stage_index", "percent",
                                                             "reason", "created", "updated")},
                             "events": events, "devices": per, "gates": gates,
                             "decisions": [{"ts": e["ts"], "kind": e["kind"], "stage_index": e["stage_index"]}
                                           for e in decisions]})

    return section


def _plot_rollout(out: Path, t0: float, events: list, reports: list, evals: list) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 4))
    pts = []
    for e in events:
        try:
            d = json.loads(e["detail"]) if e["detail"].startswith("{") else {}
        except ValueError:
            d = {}
        if "percent" in d:
            pts.append((e["ts"] - t0, float(d["percent"])))
    if pts:
        xs, ys = zip(*pts)
        ax.step(xs, ys, where="post", label="published %", color="black")
    ax.set_ylabel("published % of the fleet")
    ax.set_ylim(0, 105)
    ax.set_xlabel("seconds since start")
    ax2 = ax.twinx()
    states: dict[str, str] = {}
    series: dict[str, list[tuple[float, int]]] = {}
    for r in reports:
        states[r["device"]] = r["state"]
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        for s in ("verified", "active", "healthy", "failed", "rolled_back"):
            series.setdefault(s, []).append((r["ts"] - t0, counts.get(s, 0)))
    for s, p in series.items():
        if any(v for _, v in p):
            ax2.plot([x for x, _ in p], [v for _, v in p], label=s, drawstyle="steps-post")
    ax2.set_ylabel("devices")
    for e in events:
        if e["kind"] in ("promote", "complete", "abort", "pause", "force_promote"):
            ax.axvline(e["ts"] - t0, color="red" if e["kind"] == "abort" else "grey", ls=":", lw=1)
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="center right", fontsize=8)
    ax.set_title("rollout timeline")
    _save(fig, out / "rollout_timeline.png", paths)
    names = sorted({g["name"] for ev in evals for g in ev["results"]})
    if names:
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            xs, can, ctl, fails = [], [], [], []
            thr = None
            for ev in evals:
                for g in ev["results"]:
                    if g["name"] != name:
                        continue
                    xs.append(ev["ts"] - t0)
                    can.append(g["canary"] if g["canary"] is not None else math.nan)
                    ctl.append(g["control"] if g["control"] is not None else math.nan)
                    thr = g["threshold"]
                    if g["verdict"] == "fail":
                        fails.append((ev["ts"] - t0, g["canary"]))
            ax.plot(xs, can, label="canary", marker=".")
            ax.plot(xs, ctl, label="control", marker=".")
            if fails:
                ax.scatter([x for x, _ in fails], [y for _, y in fails], color="red", zorder=3, label="fail")
            ax.set_title(f"{name} (allowed {'+' if name != 'latency_p95' else 'x'}{thr:g})", fontsize=9)
            ax.legend(fontsize=7)
        axes[-1, 0].set_xlabel("seconds since start")
        _save(fig, out / "rollout_gates.png", paths)
    return paths


# ----------------------------------------------------------------- drift section (issue 10)

#: A device is flagged when its inputs alarmed in at least this share of its recent judged windows ...
DRIFT_FLAG_SHARE = 0.5
#: ... counting this many most recent judged windows (and at least two of them alarmed).
DRIFT_FLAG_WINDOWS = 6


def summarize_drift(rows: Iterable[dict], *, bucket_s: float | None = None) -> dict:
    """Pure: drift and confidence per (model version, device group) over time, and the drifting devices.

    ``rows``: :meth:`FleetDB.drift_windows` rows. The device group is the
    device's fleet. A device is *drifting* when its *inputs* alarmed (PSI or
    mean shift over the thresholds in :mod:`edgeship.drift`) in at least
    :data:`DRIFT_FLAG_SHARE` of its last :data:`DRIFT_FLAG_WINDOWS` judged
    windows — a camera knocked sideways, a failing sensor; prediction-only
    alarms are counted but do not flag (the world may have changed, not the
    device).
    """
    rows = list(rows)
    if not rows:
        return {"series": {}, "devices": {}, "flagged": [], "bucket_s": bucket_s, "windows": 0}
    t_lo, t_hi = min(r["ts"] for r in rows), max(r["ts"] for r in rows)
    bucket = bucket_s or pick_bucket(max(1.0, t_hi - t_lo))
    series: dict[str, dict[float, dict]] = {}
    per_dev: dict[str, list[dict]] = {}
    for r in rows:
        d = r["drift"]
        key = f"{r.get('model_version') or '?'} / {r.get('fleet') or '?'}"
        b = math.floor(r["ts"] / bucket) * bucket
        cell = series.setdefault(key, {}).setdefault(b, {"scores": [], "conf": [], "windows": 0, "alarms": 0})
        if d.get("score") is not None:
            cell["scores"].append(float(d["score"]))
        conf = (d.get("predictions") or {}).get("mean_confidence")
        if conf is not None:
            cell["conf"].append(float(conf))
        cell["windows"] += 1
        cell["alarms"] += 1 if d.get("alarm") else 0
        per_dev.setdefault(r["device"], []).append(r)
    out_series = {}
    for key, cells in series.items():
        pts = []
        for b in sorted(cells):
            c = cells[b]
            sc = sorted(c["scores"])
            pts.append({"t": b, "score_median": sc[len(sc) // 2] if sc else None, "score_max": sc[-1] if sc else None,
                        "confidence": sum(c["conf"]) / len(c["conf"]) if c["conf"] else None,
                        "windows": c["windows"], "alarms": c["alarms"]})
        out_series[key] = pts
    devices, flagged = {}, []
    for dev, rs in per_dev.items():
        judged = [r for r in rs if r["drift"].get("alarm") is not None][-DRIFT_FLAG_WINDOWS:]
        input_alarms = [r for r in judged if any(a.startswith("input:") for a in r["drift"].get("alarms") or [])]
        pred_alarms = [r for r in judged if "predictions" in (r["drift"].get("alarms") or [])]
        last = rs[-1]
        worst: dict[str, float] = {}
        for r in input_alarms:
            for name, s in (r["drift"].get("inputs") or {}).items():
                if s.get("psi") is not None:
                    worst[name] = max(worst.get(name, 0.0), float(s["psi"]))
        info = {"fleet": last.get("fleet"), "model_version": last.get("model_version"), "judged": len(judged),
                "input_alarms": len(input_alarms), "prediction_alarms": len(pred_alarms),
                "last_score": last["drift"].get("score"), "worst_input_psi": worst,
                "variant": (last.get("adapt") or {}).get("variant")}
        devices[dev] = info
        if judged and len(input_alarms) >= 2 and len(input_alarms) >= DRIFT_FLAG_SHARE * len(judged):
            flagged.append(dev)
    return {"series": out_series, "devices": devices, "flagged": sorted(flagged), "bucket_s": bucket,
            "windows": len(rows)}


def _plot_drift(out: Path, ds: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..drift import PSI_ALARM

    def when(t: float) -> datetime:
        return datetime.fromtimestamp(t, tz=timezone.utc)

    paths = []
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, pts in sorted(ds["series"].items()):
        xs = [when(p["t"]) for p in pts]
        a1.plot(xs, [p["score_median"] if p["score_median"] is not None else math.nan for p in pts], marker="o",
                markersize=3, label=f"{key} (median)")
        a1.plot(xs, [p["score_max"] if p["score_max"] is not None else math.nan for p in pts], linestyle=":",
                linewidth=1)
        a2.plot(xs, [p["confidence"] if p["confidence"] is not None else math.nan for p in pts], marker="o",
                markersize=3, label=key)
    a1.axhline(PSI_ALARM, color="tab:red", linestyle="--", linewidth=1,
               label=f"PSI {PSI_ALARM}: the least that alarms (short windows need more)")
    a1.set_yscale("symlog", linthresh=0.01)
    a1.set_ylabel("drift score (max PSI)")
    a1.set_title("drift per model version / device group (dotted: worst device)")
    a1.legend(fontsize=7)
    a2.set_ylabel("mean top-1 confidence")
    a2.set_xlabel("time (UTC)")
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
    fig.autofmt_xdate()
    p = out / "drift.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(p)
    return paths


def drift_section() -> SectionFn:
    """A :class:`Section` for ``edgeship fleet report``: drift and confidence over time, drifting devices."""

    def section(db: Any, summary: dict, out: Path | None) -> Section:
        rows = db.drift_windows()
        ds = summarize_drift(rows, bucket_s=summary.get("bucket_s"))
        if not rows:
            return Section(title="drift", text="no telemetry window carries drift statistics yet "
                                               "(packages need reference_stats; agents send them per window)",
                           data=ds)
        lines = [f"{ds['windows']} windows with drift statistics from {len(ds['devices'])} devices"]
        for key, pts in sorted(ds["series"].items()):
            last = pts[-1]
            alarms = sum(p["alarms"] for p in pts)
            windows = sum(p["windows"] for p in pts)
            conf = f"{last['confidence']:.3f}" if last["confidence"] is not None else "-"
            score = f"{last['score_median']:.3f}" if last["score_median"] is not None else "-"
            lines.append(f"  {key:<28} last score {score}  confidence {conf}  alarmed {alarms}/{windows} windows")
        if ds["flagged"]:
            lines += ["", "devices whose inputs drift:"]
            for dev in ds["flagged"]:
                info = ds["devices"][dev]
                worst = ", ".join(f"{k} PSI {v:.2f}" for k, v in info["worst_input_psi"].items()) or "-"
                lines.append(f"  {dev:<20} {info['input_alarms']}/{info['judged']} recent windows alarmed  "
                             f"(model {info['model_version']}, {worst})")
        else:
            lines += ["", "no device's inputs drift"]
        plots: list[Path] = []
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            plots = _plot_drift(out, ds)
        text = "\n".join(lines)
        return Section(title="drift", text=text, plots=plots, html="<pre>" + html.escape(text) + "</pre>", data=ds)

    return section
