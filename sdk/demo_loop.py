"""``edgeship demo --loop``: the field loop closed — shift, alarm, export, retrain, staged rollout, recovery.

The pure parts (the shift, the device partition, the phase figures) come
first; :func:`run_loop` drives the public APIs in this order:

1. **models** — the digits teacher and v1 (``1.0.0``) from the demo's
   recipes (cached between runs, like ``edgeship demo``);
2. **fleet + devices** — the fleet stack and N real agents booted with v1,
   ``[feedback] keep_inputs = true`` (the privacy switch: off by default on a
   real device). Each device streams its own slice of the bundled digits;
   a simulated user confirms right answers (``correct``) and corrects wrong
   ones (``label`` with the true digit), so corrections carry their inputs;
3. **before** — a baseline window: negative-feedback rate and drift score;
4. **shift** — a share of the devices now see the digits rotated a quarter
   turn and written with a thicker pen (:func:`shift_digits`); the demo
   waits for the drift alarm in the devices' telemetry and for the
   negative-feedback rate to rise against the baseline;
5. **export** — :func:`edgeship.fleet.field.export_field_data` (what
   ``edgeship fleet export-feedback`` runs): provenance and a by-device
   held-out split;
6. **retrain** — a recipe with a ``[field]`` section
   (:mod:`edgeship.converters.field`): the field samples mixed into the
   original training data; the gate compares the new model with v1 on the
   original test set and on the held-out field set;
7. **rollout** — the retrained version through staged rollout with the
   field gates (negative feedback, drift score vs control) and
   ``on_insufficient = "wait"``: it completes only on evidence;
8. **after** — the same figures on the new version, then the HTML report
   with a per-phase, per-version table.
"""
from __future__ import annotations

import dataclasses
import html as _html
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import ConfigError, RolloutError

__all__ = ["shift_digits", "partition", "stage_salt", "SHIFTS", "LoopSettings", "loop_settings", "loop_gates", "phase_figures",
           "phase_table", "LoopResult", "loop_device", "run_loop", "RETRAINED_VERSION", "SERVING_VERSION"]

#: The shifts :func:`shift_digits` knows: a quarter turn, a thicker pen, or both.
SHIFTS = ("rotate", "thick", "rotate+thick")


def shift_digits(images: np.ndarray, kind: str = "rotate+thick") -> np.ndarray:
    """Digits as a shifted fleet writes them: raw 0..16 pixels (N, 1, 8, 8) in, same shape out. Pure.

    ``rotate``: a quarter turn counter-clockwise; ``thick``: a 2x2 maximum
    filter (a thicker pen), clipped to the 0..16 range.
    """
    if kind not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, got {kind!r}")
    x = np.asarray(images, dtype=np.float32)
    if "rotate" in kind:
        x = np.rot90(x, 1, axes=(-2, -1))
    if "thick" in kind:
        t = x.copy()
        t[..., 1:, :] = np.maximum(t[..., 1:, :], x[..., :-1, :])
        t[..., :, 1:] = np.maximum(t[..., :, 1:], t[..., :, :-1])
        x = np.clip(t, 0.0, 16.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def partition(n_items: int, n_parts: int, part: int) -> np.ndarray:
    """Indices of part ``part`` of ``n_parts`` disjoint, interleaved slices of ``range(n_items)``. Pure.

    Every device sees its own digits, so the devices held out of the field
    set hold inputs no training device sent.
    """
    if not 0 <= part < n_parts:
        raise ValueError(f"part {part} is not in 0..{n_parts - 1}")
    return np.arange(part, n_items, n_parts)


# ----------------------------------------------------------------------------- settings and figures (pure)

log = logging.getLogger("edgeship.demo.loop")

SERVING_VERSION = "1.0.0"     # v1 of `edgeship demo`: what the fleet serves when the shift comes
RETRAINED_VERSION = "1.1.0"   # v1 retrained on the field's corrections
PHASES = ("before", "shift", "rollout", "after")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Every number ``demo --loop`` uses; :func:`loop_settings` gives the default and the ``--fast`` set."""

    fast: bool
    devices: int
    rate_hz: float              # digits per second per device
    feedback_share: float       # share of predictions the simulated user judges
    window_s: float             # telemetry window: enough samples per window for a drift verdict
    shift_share: float          # share of devices that meet the shift
    shift: str
    baseline_s: float           # how long the fleet runs unshifted first
    min_field_samples: int      # labelled samples with inputs to collect before the export
    max_shift_s: float          # give up waiting for the alarm / the samples after this long
    holdout: float              # share of devices held out of the field training set
    retrain_epochs: int
    mix: float                  # share of field samples in the retrain's training set
    stages: tuple[int, ...]
    soak_s: float
    min_feedback: int           # per cohort, for the negative-feedback gate
    after_s: float              # how long the fleet runs on the new version before the figures are read
    rollout_timeout_s: float


def loop_settings(fast: bool = False, devices: int | None = None) -> LoopSettings:
    """A few minutes on two cores by default; ``fast`` trims the phases and the retrain for tests."""
    from .drift import MIN_ALARM_SAMPLES

    if devices is not None and devices < 4:
        raise ConfigError(f"--devices must be at least 4 for --loop (shifted and unshifted, canary and control), "
                          f"got {devices}")
    n = devices or (8 if fast else 12)
    rate = min(20.0, 240.0 / n)
    # A window holds enough predictions for the drift monitor to judge it (at least MIN_ALARM_SAMPLES); its
    # alarm thresholds are calibrated for its size, so --fast takes shorter windows and every phase that counts
    # in windows (baseline, soak, after) is shorter with them.
    window = max(2.0, max(MIN_ALARM_SAMPLES, 60 if fast else 120) / rate)
    common = dict(devices=n, rate_hz=rate, feedback_share=0.5, window_s=window, shift_share=0.5,
                  shift="rotate+thick", holdout=0.25, mix=0.5)
    if fast:
        return LoopSettings(fast=True, baseline_s=2.5 * window, min_field_samples=600, max_shift_s=120.0,
                            retrain_epochs=5, stages=(50, 100), soak_s=2 * window, min_feedback=30,
                            after_s=2 * window, rollout_timeout_s=240.0, **common)
    return LoopSettings(fast=False, baseline_s=4 * window, min_field_samples=1500, max_shift_s=240.0,
                        retrain_epochs=15, stages=(25, 50, 100), soak_s=3 * window, min_feedback=60,
                        after_s=5 * window, rollout_timeout_s=420.0, **common)


def loop_gates(s: LoopSettings) -> list[str]:
    """The retrained version's gates: the field signal that raised the alarm, canary vs control.

    Negative feedback (the users' corrections) and the input drift score
    (``drift_score``: no worse than control, 0.1 PSI of slack), plus the usual
    install failures and error rate. The rollout runs with
    ``on_insufficient = "wait"``: without field evidence it holds its stage.
    """
    return ["failures:0.1:1", f"error_rate:0.01:{5 * s.min_feedback}", f"negative_feedback:0.05:{s.min_feedback}",
            "drift_score:1.0:3:0.95:0.1"]


def stage_salt(devices: Sequence[str], stages: Sequence[float], base: str, tries: int = 1000) -> str:
    """A cohort salt under which every stage but the last adds a device and leaves one on the old version. Pure.

    With 12 devices a 25 % stage holds no device under about one salt in 30
    (0.75 ** 12); a rollout with ``on_insufficient = wait`` then waits for
    canary evidence that can never come. ``base``, then ``base/1``,
    ``base/2``... are tried in order, so the choice is reproducible.
    """
    from .rollout import bucket

    for k in range(tries):
        salt = base if k == 0 else f"{base}/{k}"
        b = [bucket(d, salt) for d in devices]
        counts = [sum(x < p for x in b) for p in stages[:-1]]
        if all(c2 > c1 for c1, c2 in zip([0, *counts], counts)) and all(c < len(b) for c in counts):
            return salt
    raise ConfigError(f"no cohort salt in {tries} tries gives each of the stages {list(stages)} a device of "
                      f"{len(devices)}; use fewer stages")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def phase_figures(feedback: Iterable[Mapping], telemetry: Iterable[Mapping], phases: Mapping[str, tuple],
                  shifted: set[str] = frozenset()) -> list[dict]:
    """Per phase and model version: feedback, negative rate, mean drift score, windows in alarm. Pure.

    ``drift_score_vs_previous``: the mean score of the same windows against the
    reference of the package the version replaced (the agent's ``vs_previous``;
    None before any switch). A retrained package's own reference holds the
    field data, so its own score falls after the rollout even though the
    shifted devices still see shifted digits; this one does not.

    ``phases`` maps a name to its [start, end) wall-clock times; ``feedback``
    rows are :meth:`FleetDB.feedback` rows, ``telemetry`` rows carry the
    window's ``drift`` field in ``body`` (JSON text or dict). ``shifted``
    devices' rows are also summed apart (``*_shifted`` keys).
    """
    from .fleet.figures import VERDICT_KINDS, is_negative, window_body

    acc: dict[tuple[str, str], dict] = {}

    def cell(phase: str, version: str) -> dict:
        return acc.setdefault((phase, version), {"phase": phase, "version": version, "feedback": 0, "negative": 0,
                                                  "feedback_shifted": 0, "negative_shifted": 0, "scores": [],
                                                  "scores_shifted": [], "scores_prev": [], "windows": 0,
                                                  "alarms": 0})

    def phase_of(ts: float) -> str | None:
        return next((p for p, (a, b) in phases.items() if a <= ts < b), None)

    for r in feedback:
        p = phase_of(r["ts"])
        if p is None or r["kind"] not in VERDICT_KINDS:
            continue
        c = cell(p, str(r["model_version"]))
        neg = int(is_negative(r["kind"], r.get("value"), r.get("predicted")))
        c["feedback"] += 1
        c["negative"] += neg
        if r["device"] in shifted:
            c["feedback_shifted"] += 1
            c["negative_shifted"] += neg
    for r in telemetry:
        p = phase_of(r["ts"])
        if p is None:
            continue
        d = window_body(r).get("drift") or {}
        score = d.get("score")
        if not isinstance(score, (int, float)):
            continue
        c = cell(p, str(r["model_version"]))
        c["windows"] += 1
        c["alarms"] += int(bool(d.get("alarm")))
        c["scores"].append(float(score))
        if r["device"] in shifted:
            c["scores_shifted"].append(float(score))
        prev = (d.get("vs_previous") or {}).get("score")
        if isinstance(prev, (int, float)):
            c["scores_prev"].append(float(prev))
    out = []
    for (p, v), c in sorted(acc.items(), key=lambda kv: (PHASES.index(kv[0][0]) if kv[0][0] in PHASES else 99,
                                                         kv[0][1])):
        out.append({"phase": p, "version": v, "feedback": c["feedback"],
                    "negative_rate": c["negative"] / c["feedback"] if c["feedback"] else None,
                    "negative_rate_shifted": (c["negative_shifted"] / c["feedback_shifted"]
                                              if c["feedback_shifted"] else None),
                    "drift_score": _mean(c["scores"]), "drift_score_shifted": _mean(c["scores_shifted"]),
                    "drift_score_vs_previous": _mean(c["scores_prev"]),
                    "windows": c["windows"], "alarm_windows": c["alarms"]})
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


_COLS = ("phase", "version", "feedback", "negative feedback", "on shifted devices", "drift score",
         "on shifted devices", "vs v1's reference", "windows in alarm")


def _phase_cells(r: Mapping) -> list[str]:
    return [r["phase"], r["version"], str(r["feedback"]), _pct(r["negative_rate"]), _pct(r["negative_rate_shifted"]),
            _num(r["drift_score"]), _num(r["drift_score_shifted"]), _num(r.get("drift_score_vs_previous")),
            f"{r['alarm_windows']}/{r['windows']}"]


def phase_table(rows: Sequence[Mapping]) -> str:
    """The per-phase, per-version figures as an aligned text table."""
    cells = [list(_COLS)] + [_phase_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(_COLS))).rstrip() for c in cells)


# ----------------------------------------------------------------------------- devices

def _shiftable_stream_cls():
    from .demo import DigitsStream

    class _Stream(DigitsStream):
        """A :class:`~edgeship.demo.DigitsStream` that switches to shifted digits when told (thread-safe flag)."""

        def __init__(self, source_id: str, images: np.ndarray, labels: np.ndarray, *, shifted: np.ndarray,
                     rate_hz: float, seed: int) -> None:
            super().__init__(source_id, images, labels, rate_hz=rate_hz, seed=seed)
            self._plain = self.images
            self._shifted = np.ascontiguousarray(shifted, dtype=np.float32)
            self.shift_on = threading.Event()

        def read(self, max_n: int, timeout: float):
            # One attribute swap per read: a batch is all plain or all shifted, never torn.
            self.images = self._shifted if self.shift_on.is_set() else self._plain
            return super().read(max_n, timeout)

    return _Stream


def loop_device(device_id: str, state_dir: Path, *, broker: str, public_key: Path, s: LoopSettings,
                images: np.ndarray, labels: np.ndarray, seed: int, package: Path, shift: bool):
    """A :class:`~edgeship.demo.SimDevice` (a real agent, wired as ``edgeship agent run`` wires it) with
    ``keep_inputs`` on, a stream that can shift, and a user who corrects wrong answers."""
    from .demo import SimDevice, demo_settings

    stream = _shiftable_stream_cls()("digits", images, labels, shifted=shift_digits(images, s.shift),
                                     rate_hz=s.rate_hz, seed=seed)
    settings = dataclasses.replace(demo_settings(s.fast), rate_hz=s.rate_hz, feedback_share=s.feedback_share,
                                   window_s=s.window_s)
    dev = SimDevice(device_id, state_dir, broker=broker, public_key=public_key, settings=settings, images=images,
                    labels=labels, seed=seed, package=package, stream=stream, corrections=True,
                    # The privacy switch (off by default): this device keeps its inputs on disk, bounded, so
                    # a correction can carry the input it corrects.
                    overrides={"feedback": {"keep_inputs": True, "max_input_bytes": 5_000_000}})
    dev.shift = shift
    return dev


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class LoopResult:
    """What one ``demo --loop`` run did; also written to ``<workdir>/loop.json``."""

    workdir: Path
    db_path: Path
    report_html: Path | None
    timeline: list[dict]                 # {"t": seconds since start, "event", "text"}
    phases: dict[str, list[float]]       # name -> [start, end] (wall clock)
    figures: list[dict]                  # phase_figures rows
    export: dict                         # the field export: samples, train, holdout, devices, skipped
    retrain: dict                        # the field gate's figures and the recipe's field data counts
    rollout: dict                        # rollout id, state, reason, gates, seconds
    alarm_to_complete_s: float | None
    devices: dict[str, str | None]
    shifted_devices: list[str]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _fleet_cls():
    from .demo import _DemoFleet

    class _LoopFleet(_DemoFleet):
        """The demo's fleet stack with loop devices: v1 on every device, keep_inputs on, half of them to shift."""

        loop: LoopSettings
        shifted: set[str]

        def _start_devices(self) -> None:
            from .demo_data.model import load_digits_split

            s, b = self.loop, self.built
            d = load_digits_split(0)
            x = np.concatenate([d["x_train"], d["x_calib"], d["x_eval"]])
            y = np.concatenate([d["y_train"], d["y_calib"], d["y_eval"]])
            n_shift = max(1, round(s.shift_share * s.devices))
            self.shifted = {f"pi-{i + 1:02d}" for i in range(0, s.devices, max(1, s.devices // n_shift))[:n_shift]}
            bar = self.n.bar(s.devices, "starting devices")
            try:
                for i in range(s.devices):
                    name = f"pi-{i + 1:02d}"
                    idx = partition(len(x), s.devices, i)
                    dev = loop_device(name, self.workdir / "devices" / name, broker=self.broker_url,
                                     public_key=b.public_key, s=s, images=x[idx], labels=y[idx], seed=2000 + i,
                                     package=self.served["v1"], shift=name in self.shifted)
                    self.devices.append(dev)
                    dev.start()
                    bar.update(1)
            finally:
                bar.close()

    return _LoopFleet


class _Timeline:
    def __init__(self, narrator, t0: float) -> None:
        self.n = narrator
        self.t0 = t0
        self.events: list[dict] = []

    def mark(self, event: str, text: str) -> float:
        now = time.time()
        t = now - self.t0
        self.events.append({"t": round(t, 1), "ts": now, "event": event, "text": text})
        self.n.say(f"[{int(t) // 60:02d}:{int(t) % 60:02d}] {text}")
        return now


def _wait(pred: Callable[[], Any], timeout: float, step: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    stop = threading.Event()
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        stop.wait(step)


def _neg_rate(rows: Sequence[Mapping], *, devices: set[str] | None = None) -> tuple[float | None, int]:
    from .fleet.figures import feedback_counts

    rows = [r for r in rows if devices is None or r["device"] in devices]
    verdicts, neg = feedback_counts(rows)
    return (neg / verdicts if verdicts else None), verdicts


def _retrain_recipe(workdir: Path, cache: Path, s: LoopSettings, export_path: Path, serving: Path) -> Path:
    """The recipe that retrains v1 on the field: the demo's v1 recipe with a [field] section."""
    from . import demo_data
    from .demo import _recipe_text, demo_settings

    ds = demo_settings(s.fast)
    tdir = cache / f"teacher-e{ds.teacher_epochs}"
    data = {"train": tdir / "train.npz", "val": tdir / "calib.npz", "calib": tdir / "calib.npz",
            "eval": tdir / "eval.npz"}
    student = f"{Path(demo_data.__file__).resolve().parent / 'model.py'}:Student"
    out = workdir / "retrain"
    out.mkdir(parents=True, exist_ok=True)
    # alpha 0: the teacher never saw the shift, so its soft targets would pull the student back to v1's answers;
    # the users' corrections are the labels to learn from.
    text = _recipe_text(version=RETRAINED_VERSION, out_dir=out, data=data, teacher_onnx=tdir / "teacher.onnx",
                        student=student, key=tdir / "keys" / "dev.key", epochs=s.retrain_epochs, seed=0, alpha=0.0,
                        s=ds)
    text += (f"\n[field]\ndata = {json.dumps(str(export_path))}\nserving = {json.dumps(str(serving))}\n"
             f"mix = {s.mix}\nmax_regress = {ds.max_drop}\n")
    path = out / "recipe.toml"
    path.write_text(text)
    return path


_OWNED = ("devices", "packages", "report", "retrain", "field", "fleet.sqlite", "fleet.sqlite-wal", "fleet.sqlite-shm",
          "loop.json")


def run_loop(*, workdir: str | os.PathLike = "edgeship-demo-loop", devices: int | None = None, fast: bool = False,
             broker_url: str | None = None, quiet: bool = False, cache_dir: str | os.PathLike | None = None,
             echo: Callable[[str], None] | None = None) -> LoopResult:
    """Run the field loop (see the module docstring); returns a :class:`LoopResult`.

    Raises :class:`~edgeship.errors.EdgeshipError` subclasses when a part
    fails, and :class:`~edgeship.errors.RolloutError` when the loop does not
    close: no alarm, the retrain refused by its field gate, or the rollout
    not completed with every device on the retrained version.
    """
    from .demo import (
        BuiltModels,
        _fresh_workdir,
        _Narrator,
        build_packages,
        default_cache_dir,
        demo_health,
        demo_settings,
    )
    from .fleet.field import export_field_data

    t_start = time.monotonic()
    s = loop_settings(fast, devices)
    n = _Narrator(quiet, echo)
    workdir = Path(workdir).expanduser().resolve()
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    n.say(f"edgeship demo --loop{' --fast' if fast else ''}: {s.devices} devices on v1 meet a shift at "
          f"{100 * s.shift_share:.0f}% of them → drift alarm + corrections → export → retrain → staged rollout → "
          f"recovery (in {workdir})")
    ds = demo_settings(fast)
    built = build_packages(cache, ds, quiet=quiet, say=lambda line: n.say("      " + line), only=("v1",))
    _fresh_workdir(workdir, _OWNED)
    v1 = BuiltModels(packages={"v1": built.packages["v1"]}, top1={}, key=built.key, public_key=built.public_key,
                     teacher_top1=None, eval_inputs=built.eval_inputs, eval_labels=built.eval_labels, reused={},
                     seconds=0.0)
    fleet = _fleet_cls()(workdir, ds, v1, broker_url, n)
    fleet.loop = s
    try:
        return _run(fleet, s, n, workdir, cache, built, t_start, export_field_data, demo_health(ds))
    finally:
        fleet.stop()


def _notice(fleet, s: LoopSettings, tl: _Timeline, shifted: set[str]) -> tuple[float, float, float]:
    """Baseline, shift, then wait for the drift alarm, the rise in negative feedback and enough field samples;
    returns (baseline start, shift, alarm) wall-clock times."""
    db = fleet.db
    # -- before
    t_before = tl.mark("start", f"[2/7] baseline: every device sees ordinary digits for {s.baseline_s:.0f} s")
    threading.Event().wait(s.baseline_s)
    base_rate, base_n = _neg_rate(db.feedback(since=t_before))
    # -- shift
    for d in fleet.devices:
        if d.device_id in shifted:
            d.stream.shift_on.set()
    t_shift = tl.mark("shift", f"[3/7] shift: {len(shifted)} of {s.devices} devices ({', '.join(sorted(shifted))}) "
                               f"now see digits turned a quarter and written thicker; baseline negative feedback "
                               f"{_pct(base_rate)} ({base_n} verdicts)")

    # The devices' alarms are calibrated for their window size (edgeship.drift: a window like the reference
    # alarms with probability <= FALSE_ALARM_RATE), so the loop acts on the first alarm after the shift.
    from .fleet.figures import window_body

    def alarmed() -> list[str]:
        return sorted({r["device"] for r in db.telemetry(since=t_shift)
                       if (window_body(r).get("drift") or {}).get("alarm") is True})

    alarms = _wait(alarmed, s.max_shift_s)
    if not alarms:
        raise RolloutError(f"demo --loop: no drift alarm within {s.max_shift_s:.0f} s of the shift")
    t_alarm = tl.mark("alarm", f"      drift alarm from {len(alarms)} device(s) ({', '.join(alarms[:6])}) in their "
                               "telemetry — scores only: no raw data left the devices")

    def risen():
        rate, k = _neg_rate(db.feedback(since=t_shift))
        return (rate, k) if rate is not None and k >= s.min_feedback and rate > (base_rate or 0) + 0.1 else None

    rose = _wait(risen, s.max_shift_s)
    if not rose:
        raise RolloutError("demo --loop: the negative-feedback rate did not rise after the shift")
    tl.mark("feedback", f"      negative feedback {_pct(base_rate)} → {_pct(rose[0])} ({rose[1]} verdicts since the "
                        "shift)")
    got = _wait(lambda: len(db.feedback_samples(since=t_shift)) >= s.min_field_samples, s.max_shift_s)
    if not got:
        log.warning("only %d field samples after %.0f s; exporting what there is",
                    len(db.feedback_samples(since=t_shift)), s.max_shift_s)
    return t_before, t_shift, t_alarm


def _run(fleet, s: LoopSettings, n, workdir: Path, cache: Path, built, t_start: float, export_field_data,
         health: dict) -> LoopResult:
    from .converters.recipe import run_recipe

    fleet.start(step=(1, 7))
    tl = _Timeline(n, time.time())
    shifted = set(fleet.shifted)
    n.say(f"      {s.devices} devices on v1 ({SERVING_VERSION}), each streaming its own slice of the 1,797 bundled "
          f"digits at {s.rate_hz:g}/s; users judge {100 * s.feedback_share:.0f}% of predictions and correct the "
          f"wrong ones; inputs kept on the devices ([feedback] keep_inputs = true)")
    phases: dict[str, list[float]] = {}
    db = fleet.db
    t_before, t_shift, t_alarm = _notice(fleet, s, tl, shifted)
    phases["before"] = [t_before, t_shift]
    # -- export
    export = export_field_data(db, workdir / "field" / "field.npz", labels=[str(i) for i in range(10)],
                               holdout=s.holdout)
    tl.mark("export", f"[4/7] export: {export.summary()}")
    # -- retrain
    recipe = _retrain_recipe(workdir, cache, s, export.path, fleet.served["v1"])
    tl.mark("retrain", f"[5/7] retrain: edgeship convert run {recipe} ([field] mix {s.mix:g}, "
                       f"{s.retrain_epochs} epochs, gate vs v1 on the original test set and the held-out field set)")
    res = run_recipe(recipe, quiet=True)
    gate = res.step("field_gate").info
    fdat = res.step("field_data").info
    tl.mark("retrained", f"      field gate passed: {gate['reason']}")
    pkg = fleet.workdir / "packages" / res.package.name
    shutil.copyfile(res.package, pkg)
    fleet.served["v1.1"] = pkg
    # -- rollout
    gates = loop_gates(s)
    rid = f"loop-{RETRAINED_VERSION}-{int(time.time())}"
    st = fleet.controller.start_rollout(pkg, stages=[float(p) for p in s.stages], soak_s=s.soak_s, gates=gates,
                                        health=health, who="edgeship demo --loop", on_insufficient="wait",
                                        rollout_id=rid,
                                        salt=stage_salt([d.device_id for d in fleet.devices], s.stages, rid))
    rid = st["rollout_id"]
    t_roll = tl.mark("rollout", f"[6/7] rollout {RETRAINED_VERSION}: stages "
                                f"{' → '.join(f'{p:g}%' for p in s.stages)}, soak {s.soak_s:.0f} s, gates "
                                f"{', '.join(gates)}; completes only on evidence (on_insufficient = wait)")
    phases["shift"] = [t_shift, t_roll]
    deadline = time.monotonic() + s.rollout_timeout_s
    seen = 0
    while True:
        stt = fleet.controller.status(rid)
        if stt["stage_index"] != seen and stt["state"] == "running":
            seen = stt["stage_index"]
            tl.mark("promote", f"      gates held through the soak: promoted to {stt['percent']:g}%")
        if stt["state"] != "running":
            break
        if time.monotonic() > deadline:
            raise RolloutError(f"demo --loop: rollout {rid} still running at stage {stt['stage_index'] + 1} after "
                               f"{s.rollout_timeout_s:.0f} s ({stt['decision']['reason']})")
        threading.Event().wait(0.5)
    bar = n.bar(len(fleet.devices), RETRAINED_VERSION)
    try:
        fleet._converge(rid, RETRAINED_VERSION, stt["state"], {}, deadline, bar)
    finally:
        bar.close()
    stt = fleet.controller.status(rid)
    if stt["state"] != "completed":
        raise RolloutError(f"demo --loop: the retrained rollout ended {stt['state']}: {stt.get('reason')}")
    t_done = tl.mark("completed", f"      completed: {stt['reason']}")
    phases["rollout"] = [t_roll, t_done]
    # -- after
    threading.Event().wait(s.after_s)
    fleet._settle(2 * s.window_s + 1.0)
    t_end = time.time()
    phases["after"] = [t_done, t_end]
    figures = phase_figures(db.feedback(since=t_before), db.telemetry(since=t_before),
                            {k: tuple(v) for k, v in phases.items()}, shifted)
    after = [r for r in figures if r["phase"] == "after" and r["version"] == RETRAINED_VERSION]
    under = [r for r in figures if r["phase"] == "shift" and r["version"] == SERVING_VERSION]
    tl.mark("recovered", "[7/7] after the rollout: negative feedback "
                         f"{_pct(under[0]['negative_rate'] if under else None)} on v1 under the shift → "
                         f"{_pct(after[0]['negative_rate'] if after else None)} on {RETRAINED_VERSION}")
    result = LoopResult(
        workdir=workdir, db_path=fleet.db_path, report_html=None, timeline=tl.events,
        phases={k: list(v) for k, v in phases.items()}, figures=figures,
        export={"samples": export.samples, "train": export.train, "holdout": export.holdout,
                "devices": list(export.devices), "holdout_devices": list(export.holdout_devices),
                "skipped": dict(export.skipped), "path": str(export.path)},
        retrain={"gate": gate, "field_data": fdat, "package": str(res.package), "seconds": res.seconds},
        rollout={"rollout_id": rid, "state": stt["state"], "reason": stt.get("reason"),
                 "stages": [x["percent"] for x in stt["stages"]],
                 "gates": [{k: g.get(k) for k in ("name", "verdict", "canary", "control", "canary_n", "control_n")}
                           for g in stt["gates"]], "seconds": round(t_done - t_roll, 1)},
        alarm_to_complete_s=round(t_done - t_alarm, 1),
        devices={d.device_id: (d.model or {}).get("version") for d in fleet.devices},
        shifted_devices=sorted(shifted))
    rep = _report(fleet, result)
    result.report_html = rep.html_path
    result.seconds = round(time.monotonic() - t_start, 1)
    for line in phase_table(figures).splitlines():
        n.say("      " + line)
    n.say(f"done in {result.seconds:.0f} s; alarm → completed rollout {result.alarm_to_complete_s / 60:.1f} min. "
          f"Report: {rep.html_path}")
    (workdir / "loop.json").write_text(json.dumps(result.to_dict(), indent=2))
    off = {d: v for d, v in result.devices.items() if v != RETRAINED_VERSION}
    if off:
        raise RolloutError(f"demo --loop: {len(off)} devices are not on {RETRAINED_VERSION}: "
                           + ", ".join(f"{d}={v}" for d, v in sorted(off.items())[:5]))
    return result


def _report(fleet, result: LoopResult):
    from .fleet.report import Section, build_report, drift_section, rollout_section

    def loop_section(db, summary, out):
        g = result.retrain["gate"]
        lines = [f"+{e['t']:6.1f}s  {e['text'].strip()}" for e in result.timeline]
        text = "\n".join(["timeline:", *lines, "", phase_table(result.figures), "",
                          f"retrain gate: {g['reason']}",
                          f"alarm → completed rollout: {result.alarm_to_complete_s:.0f} s"])
        head = "".join(f"<th>{_html.escape(c)}</th>" for c in _COLS)
        rows = "".join("<tr>" + "".join(f"<td>{_html.escape(c)}</td>" for c in _phase_cells(r)) + "</tr>"
                       for r in result.figures)
        tl = "".join(f"<tr><td>+{e['t']:.0f} s</td><td>{_html.escape(e['text'].strip())}</td></tr>"
                     for e in result.timeline)
        gate_rows = "".join(
            f"<tr><td>{_html.escape(name)}</td><td>{new:.2f}</td><td>{serving:.2f}</td></tr>"
            for name, new, serving in (("original test set", g["original_new"], g["original_serving"]),
                                       ("held-out field set", g["field_new"], g["field_serving"])))
        frag = (f"<p>Devices {', '.join(result.shifted_devices)} met the shift. Negative feedback and drift score "
                "per phase and model version (drift score: the mean of the devices' per-window scores).</p>"
                f"<table><tr>{head}</tr>{rows}</table>"
                f"<h3>Retrain gate (top-1 points, {_html.escape(SERVING_VERSION)} serving vs "
                f"{_html.escape(RETRAINED_VERSION)})</h3><table><tr><th>data</th><th>new</th><th>serving</th></tr>"
                f"{gate_rows}</table><p>{_html.escape(g['reason'])}</p>"
                f"<h3>Timeline</h3><table>{tl}</table>"
                f"<p>Alarm → completed rollout: {result.alarm_to_complete_s:.0f} s.</p>")
        return Section("Field loop", text=text, html=frag, data={"figures": result.figures})

    return build_report(fleet.db, out_dir=fleet.workdir / "report", bucket_s=max(2.0, 2 * fleet.loop.window_s),
                        sections=[loop_section, rollout_section(result.rollout["rollout_id"]), drift_section()])
