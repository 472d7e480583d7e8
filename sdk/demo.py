"""``edgeship demo``: the whole loop on this machine, from teacher to rolled-back canary.

:func:`run_demo` drives the public APIs of every part, in this order, and
narrates what happens in a few lines (progress bars on stderr):

1. **models** — the digits teacher (``edgeship.demo_data``: data from
   scikit-learn, nothing downloaded) is trained once and kept in a cache
   folder; four conversion recipes (:func:`edgeship.converters.recipe.run_recipe`)
   distill, quantize to int8 and sign four packages of the same model:

   * **v0** ``0.9.0``: the factory image every device boots with (one epoch);
   * **v1** ``1.0.0``: a student distilled for a few epochs;
   * **v2** ``1.1.0``: a student distilled longer — as good or better in the field;
   * **v3** ``1.2.0``: deliberately degraded — trained on labels where the
     digits 0–4 are permuted, so it is wrong about half the time.

   The recipes cache every step by its inputs, so a second run reuses them.
2. **fleet** — an MQTT broker (the embedded amqtt broker, or ``broker_url``),
   the fleet DB (SQLite), the collector, the HTTP package server and the
   rollout controller.
3. **devices** — N real agents in this process, each with its own state
   folder (booted with v0), MQTT link (outbox, telemetry, feedback), rollout client, a stream
   of bundled digits (:class:`DigitsStream`) and a simulated user
   (:class:`SimulatedUser`) who compares each prediction with the true label
   and sends ``correct``/``incorrect`` feedback for a share of them.
4. **rollouts** — v1 to every device, v2 through all stages to 100 %, v3
   until the negative-feedback gate aborts it and every switched device rolls
   back.
5. **report** — :func:`edgeship.fleet.report.build_report` (table, PNGs,
   HTML) in ``<workdir>/report``.

Nothing here decides anything the parts decide themselves: gates, stages,
promotion and rollback belong to the controller and the rollout client; the
demo only starts them, watches the fleet DB and tells what happened.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .agent.sources import RawBlock, Source
from .errors import ConfigError, EdgeshipError, RolloutError
from .lifecycle import Loop

__all__ = ["run_demo", "DemoResult", "DemoSettings", "demo_settings", "demo_gates", "demo_health", "degrade_labels",
           "judge", "DigitsStream", "SimulatedUser", "SimDevice", "BuiltModels", "build_packages",
           "default_cache_dir", "DEGRADED_CLASSES", "VERSIONS"]

log = logging.getLogger("edgeship.demo")

FLEET = "demo"
NAME = "digits"
#: v0 is the factory image every device boots with; v1, v2 and v3 are rolled out.
VERSIONS = {"v0": "0.9.0", "v1": "1.0.0", "v2": "1.1.0", "v3": "1.2.0"}
#: v3 is trained on labels where these digits are shifted by one among themselves (0→1, …, 4→0).
DEGRADED_CLASSES = (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------- settings (pure)

@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every number the demo uses; :func:`demo_settings` gives the full and the ``--fast`` set."""

    fast: bool
    devices: int
    teacher_epochs: int
    v0_epochs: int
    v1_epochs: int
    v2_epochs: int
    v3_epochs: int
    max_drop: float              # the recipes' int8 accuracy budget (points)
    calibrations: tuple[str, ...]
    # The devices run the packages' default ONNX int8 variant. The TFLite export (examples/digits builds it)
    # adds ~20 s per package and litert-torch prints its own progress lines, so the demo leaves it out.
    tflite: bool
    rate_hz: float               # digits per second per device
    feedback_share: float        # share of predictions the simulated user gives feedback on
    window_s: float              # telemetry window
    health_window_s: float       # device-side health window after a switch
    jitter_s: float              # device-side prefetch jitter
    stages_v1: tuple[int, ...]
    stages_v2: tuple[int, ...]
    stages_v3: tuple[int, ...]
    soak_s: float                # per stage; longer for bigger fleets, whose switches take longer here
    # Per cohort, for the controller's gates. Small is safe: a gate fails only when the canary is worse with
    # 95 % confidence, and an inconclusive difference holds the stage instead of promoting it.
    min_samples: int
    rollout_timeout_s: float     # give up waiting for one rollout after this long


#: All simulated devices share one process, one broker and this machine's cores: the fleet's total
#: inference and feedback rates stay under these, so bigger fleets get slower streams, not a jammed broker
#: (the embedded amqtt broker starts timing out QoS 1 acknowledgements at a few hundred messages/s here).
FLEET_INFERENCE_HZ = 300.0
FLEET_FEEDBACK_HZ = 80.0


def demo_settings(fast: bool = False, devices: int | None = None) -> DemoSettings:
    """The demo's numbers: a few minutes by default, under a minute with ``fast``."""
    if devices is not None and devices < 2:
        raise ConfigError(f"--devices must be at least 2 (a canary and a control), got {devices}")
    n = devices or (10 if fast else 24)
    rate_hz = min(20.0, FLEET_INFERENCE_HZ / n)
    share = min(0.5 if fast else 0.3, FLEET_FEEDBACK_HZ / (n * rate_hz))
    window_s = max(1.0 if fast else 2.0, n / 20.0)  # telemetry messages/s stay near 20 for the fleet
    if fast:
        return DemoSettings(
            fast=True, devices=n, teacher_epochs=2, v0_epochs=1, v1_epochs=3, v2_epochs=6, v3_epochs=4,
            max_drop=3.0, calibrations=("minmax",), tflite=False, rate_hz=rate_hz, feedback_share=share,
            window_s=window_s, health_window_s=2.0, jitter_s=0.3, stages_v1=(100,), stages_v2=(30, 100),
            stages_v3=(50, 100), soak_s=3.0 + n / 10.0, min_samples=20, rollout_timeout_s=60.0 + n)
    return DemoSettings(
        fast=False, devices=n, teacher_epochs=30, v0_epochs=2, v1_epochs=8, v2_epochs=40, v3_epochs=20,
        max_drop=1.5, calibrations=("minmax", "percentile", "entropy"), tflite=False, rate_hz=rate_hz,
        feedback_share=share, window_s=window_s, health_window_s=5.0, jitter_s=2.0, stages_v1=(100,),
        stages_v2=(10, 50, 100), stages_v3=(10, 50, 100), soak_s=max(15.0, 3 * window_s), min_samples=60,
        rollout_timeout_s=300.0 + 2 * n)


def degrade_labels(labels: np.ndarray, classes: Sequence[int] = DEGRADED_CLASSES) -> np.ndarray:
    """Shift the labels of ``classes`` by one among themselves (0→1, 1→2, …, last→first); others unchanged.

    A model trained on these labels answers the shifted digit for every
    digit in ``classes``: about ``len(classes) / 10`` of its predictions
    are wrong, which is what v3's simulated users see.
    """
    y = np.asarray(labels).copy()
    cls = list(classes)
    mapping = {c: cls[(i + 1) % len(cls)] for i, c in enumerate(cls)}
    out = y.copy()
    for src, dst in mapping.items():
        out[y == src] = dst
    return out


def default_cache_dir() -> Path:
    """Where built models are kept between runs: ``$EDGESHIP_CACHE_DIR`` or ``~/.cache/edgeship/demo``."""
    env = os.environ.get("EDGESHIP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeship" / "demo"


# ----------------------------------------------------------------------------- narration

class _Narrator:
    """The short log: one line per event on stdout (nothing when quiet) and tqdm bars on stderr."""

    def __init__(self, quiet: bool, echo: Callable[[str], None] | None = None) -> None:
        self.quiet = quiet
        self._echo = echo or (lambda line: print(line, flush=True))
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self._open_bars = 0

    def say(self, line: str) -> None:
        self.lines.append(line)
        if self.quiet:
            return
        if self._open_bars:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)  # clears and redraws the live bar instead of tearing it
        else:
            self._echo(line)

    def step(self, n: int, total: int, line: str) -> None:
        self.say(f"[{n}/{total}] {line}")

    def bar(self, total: int, desc: str, unit: str = "device"):
        from tqdm import tqdm

        narrator = self
        disable = self.quiet or not sys.stderr.isatty()

        class _Bar(tqdm):
            def close(self_inner) -> None:
                if not getattr(self_inner, "_counted_closed", False):
                    self_inner._counted_closed = True
                    narrator._open_bars -= 0 if disable else 1
                super().close()

        if not disable:
            self._open_bars += 1
        return _Bar(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=disable,
                    bar_format="{desc}: {bar:30} {n_fmt}/{total_fmt} " + unit + "s on it{postfix}")


# ----------------------------------------------------------------------------- models

def _recipe_text(*, version: str, out_dir: Path, data: Mapping[str, Path], teacher_onnx: Path, student: str,
                 key: Path, epochs: int, seed: int, alpha: float, s: DemoSettings) -> str:
    def q(p) -> str:
        return json.dumps(str(p))  # a TOML basic string is a JSON string

    cal = ", ".join(json.dumps(c) for c in s.calibrations)
    return f"""# written by edgeship demo
name = "{NAME}"
version = "{version}"
description = "8x8 digits, distilled student, int8 (edgeship demo)"
out_dir = {q(out_dir)}
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
preprocess = {{ scale = 0.0625, mean = [0.0], std = [1.0], layout = "NCHW", resize = [8, 8], color = "L", dtype = "float32" }}

[data]
train = {q(data["train"])}
val = {q(data["val"])}
calib = {q(data["calib"])}
eval = {q(data["eval"])}

[teacher]
onnx = {q(teacher_onnx)}

[student]
factory = {q(student)}

[distill]
alpha = {alpha}
temperature = 4.0
epochs = {epochs}
lr = 0.003
seed = {seed}
early_stopping = {15 if epochs > 15 else "false"}

[export]
exporter = "{"torchscript" if s.fast else "auto"}"

[quantize]
max_drop = {s.max_drop}
method = "static"
calibrations = [{cal}]
recovery_steps = {0 if s.fast else 3}

[tflite]
enabled = {"true" if s.tflite else "false"}

[evaluate]
repeats = {3 if s.fast else 30}

[package]
signing_key = {q(key)}
"""


@dataclasses.dataclass
class BuiltModels:
    """What :func:`build_packages` made: package per version, the signing key pair, top-1 per version."""

    packages: dict[str, Path]
    top1: dict[str, float]
    key: Path
    public_key: Path
    teacher_top1: float | None
    eval_inputs: np.ndarray        # raw 0..16 pixels, (N, 1, 8, 8) float32: what the devices see
    eval_labels: np.ndarray
    reused: dict[str, bool]
    seconds: float


def _top1(result) -> float | None:
    for row in result.table:
        if row.get("id") == "student_int8_onnx" and row.get("metric") == "top1":
            return float(row["value"])
    return None


def build_packages(cache_dir: str | os.PathLike, settings: DemoSettings, *, quiet: bool = False,
                   say: Callable[[str], None] = lambda line: None, only: Sequence[str] | None = None) -> BuiltModels:
    """Teacher (cached), then the v0-v3 recipes (or ``only`` these tags); returns the signed packages.
    Reuses every cached step."""
    t0 = time.monotonic()
    # Shipped in the package (not read from the source checkout's examples/), so the demo runs from a wheel.
    from . import demo_data
    from .converters.recipe import run_recipe
    from .demo_data.prepare import prepare  # data splits, teacher, dev key

    ex = Path(demo_data.__file__).resolve().parent  # holds model.py, which the recipes name for the student

    import torch

    # These models are tiny: one intra-op thread trains them faster than two that wait on each other,
    # and far faster when the machine is busy. Restored on the way out (this may be a library call).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(cache_dir, settings, ex, prepare, run_recipe, quiet=quiet, say=say, t0=t0, only=only)
    finally:
        torch.set_num_threads(threads)


def _build(cache_dir, settings: DemoSettings, ex: Path, prepare, run_recipe, *, quiet: bool,
           say: Callable[[str], None], t0: float, only: Sequence[str] | None = None) -> BuiltModels:
    mode = "fast" if settings.fast else "full"
    cache = Path(cache_dir).expanduser().resolve()
    tdir = cache / f"teacher-e{settings.teacher_epochs}"
    try:
        done = prepare(tdir, teacher_epochs=settings.teacher_epochs, quiet=True)
    except EdgeshipError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise EdgeshipError(f"could not prepare the digits teacher in {tdir}: {exc}; delete that folder and retry") from exc
    teacher_top1 = (done.get("teacher") or {}).get("eval_top1")
    meta = tdir / "teacher.json"
    if teacher_top1 is not None:
        meta.write_text(json.dumps({"eval_top1": teacher_top1}))
    elif meta.is_file():
        teacher_top1 = json.loads(meta.read_text()).get("eval_top1")
    say(f"teacher: 0.63M-parameter CNN, {settings.teacher_epochs} epochs on 1,200 digits"
        + (f", top-1 {100 * teacher_top1:.1f}%" if teacher_top1 is not None else "")
        + (" (trained now)" if "teacher" in done else f" (reused from {tdir})"))

    data = {"train": tdir / "train.npz", "val": tdir / "calib.npz", "calib": tdir / "calib.npz",
            "eval": tdir / "eval.npz"}
    # v3's training set: the same digits with 0-4 permuted among themselves (written once, then reused).
    bad_train = tdir / "train-degraded.npz"
    if not bad_train.is_file():
        with np.load(data["train"]) as z:
            x, y = z["input"], z["labels"]
        tmp = bad_train.with_name(bad_train.name + ".partial.npz")
        np.savez(tmp, input=x, labels=degrade_labels(y))
        os.replace(tmp, bad_train)
    key = tdir / "keys" / "dev.key"
    pub = tdir / "keys" / "dev.pub"
    student = f"{ex / 'model.py'}:Student"
    plans = {
        "v0": dict(epochs=settings.v0_epochs, seed=3, alpha=0.7, data=data),
        "v1": dict(epochs=settings.v1_epochs, seed=0, alpha=0.7, data=data),
        "v2": dict(epochs=settings.v2_epochs, seed=1, alpha=0.7, data=data),
        "v3": dict(epochs=settings.v3_epochs, seed=2, alpha=0.0, data={**data, "train": bad_train}),
    }
    packages, top1, reused = {}, {}, {}
    for tag, p in plans.items():
        if only is not None and tag not in only:
            continue
        version = VERSIONS[tag]
        out = cache / mode / tag
        out.mkdir(parents=True, exist_ok=True)
        recipe = out / "recipe.toml"
        text = _recipe_text(version=version, out_dir=out, data=p["data"], teacher_onnx=tdir / "teacher.onnx",
                            student=student, key=key, epochs=p["epochs"], seed=p["seed"], alpha=p["alpha"],
                            s=settings)
        if not recipe.is_file() or recipe.read_text() != text:
            recipe.write_text(text)
        res = run_recipe(recipe, quiet=quiet)
        if res.package is None:
            raise EdgeshipError(f"the {tag} recipe ({recipe}) wrote no package")
        packages[tag] = res.package
        top1[tag] = _top1(res)
        reused[tag] = all(s.status in ("reused", "skipped") for s in res.steps)
        what = {"v0": f"the factory image devices boot with: student distilled for {p['epochs']} epoch(s)",
                "v1": f"student distilled for {p['epochs']} epochs",
                "v2": f"student distilled for {p['epochs']} epochs (the good update)",
                "v3": "student trained on labels with digits 0-4 permuted (deliberately degraded)"}[tag]
        acc = f", int8 top-1 {100 * top1[tag]:.1f}%" if top1[tag] is not None else ""
        say(f"{tag} {NAME} {version}: {what}{acc}, signed"
            + (" (reused)" if reused[tag] else f" ({res.seconds:.0f} s)"))
    with np.load(data["eval"]) as z:
        # The .npz holds model inputs (pixels / 16); devices see raw 0..16 pixels and apply the manifest's scale.
        eval_inputs = (z["input"] * 16.0).astype(np.float32)
        eval_labels = z["labels"].astype(np.int64)
    return BuiltModels(packages=packages, top1=top1, key=key, public_key=pub, teacher_top1=teacher_top1,
                       eval_inputs=eval_inputs, eval_labels=eval_labels, reused=reused,
                       seconds=time.monotonic() - t0)


# ----------------------------------------------------------------------------- simulated devices

class DigitsStream(Source):
    """A device's sensor: bundled 8x8 digits (raw 0..16 pixels) at ``rate_hz``, each row's ref naming its true label.

    Samples are drawn at random (seeded per device) from ``images``; the ref
    ``"<index>:<label>"`` travels with the prediction, so the simulated user
    can judge it. Rate-limited like the agent's synthetic source.
    """

    kind = "digits"

    def __init__(self, source_id: str, images: np.ndarray, labels: np.ndarray, *, rate_hz: float = 20.0,
                 seed: int = 0) -> None:
        super().__init__(source_id)
        if len(images) != len(labels) or len(images) == 0:
            raise ConfigError("DigitsStream needs as many labels as images, and at least one")
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.labels = np.asarray(labels)
        self.rate_hz = float(rate_hz)
        self._rng = np.random.default_rng(seed)
        self._made = 0
        self._t0 = 0.0
        self._stop = threading.Event()

    def open(self) -> None:
        super().open()
        self._made = 0
        self._t0 = time.monotonic()

    def read(self, max_n: int, timeout: float):
        n = max_n
        if self.rate_hz > 0:
            from .agent.sources import paced

            n = paced(n, made=self._made, t0=self._t0, rate_hz=self.rate_hz, stop=self._stop, timeout=timeout)
            if n is None:
                return None
        idx = self._rng.integers(0, len(self.images), size=n)
        self._made += n
        return RawBlock(data=self.images[idx], ts=time.time(),
                        refs=[f"{i}:{self.labels[i]}" for i in idx.tolist()])

    def close(self) -> None:
        self._stop.set()


def judge(predicted: str | None, ref: str | None) -> str | None:
    """The simulated user's verdict on one prediction: ``correct``, ``incorrect`` or None (cannot tell). Pure."""
    if predicted is None or not ref or ":" not in ref:
        return None
    return "correct" if str(predicted) == ref.rsplit(":", 1)[1] else "incorrect"


class SimulatedUser(Loop):
    """Agent component: looks at a share of the device's predictions and says whether each was right.

    ``on_batch`` (batcher thread) only picks predictions and puts (id,
    verdict) into a bounded queue; the user's own thread sends them with
    ``agent.feedback`` (which writes to the outbox), so feedback never slows
    inference. A full queue skips the prediction (counted in ``skipped``).
    With ``corrections`` the user gives the right digit (``label``) instead
    of a bare ``incorrect``: a labelled sample for the field loop (#22).
    """

    def __init__(self, agent: Any, *, share: float = 0.3, seed: int = 0, queue_size: int = 1000,
                 corrections: bool = False) -> None:
        super().__init__("demo-user")
        self.agent = agent
        self.share = float(share)
        self.corrections = corrections
        self._rng = np.random.default_rng(seed)
        self._q: queue.Queue[tuple[str, str, str]] = queue.Queue(maxsize=queue_size)
        self.sent = {"correct": 0, "incorrect": 0, "label": 0}
        self.skipped = 0
        self.failed = 0

    def on_batch(self, batch: Any) -> None:
        refs = batch.refs
        names = batch.label_names()
        if refs is None or names is None:
            return
        refs = refs if isinstance(refs, list) else [refs] * batch.n
        pick = self._rng.random(batch.n) < self.share
        if not pick.any():
            return
        ids = batch.prediction_ids()
        for i in np.flatnonzero(pick).tolist():
            verdict = judge(names[i], refs[i])
            if verdict is None:
                continue
            try:
                self._q.put_nowait((ids[i], verdict, refs[i].rsplit(":", 1)[1]))
            except queue.Full:
                self.skipped += 1

    def run(self) -> None:
        while not self.stopping:
            try:
                pid, verdict, truth = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if verdict == "incorrect" and self.corrections:
                    self.agent.feedback(pid, "label", truth)
                    self.sent["label"] += 1
                else:
                    self.agent.feedback(pid, verdict)
                    self.sent[verdict] += 1
            except EdgeshipError as exc:  # e.g. the prediction left the ring: a user who came back too late
                self.failed += 1
                log.debug("simulated feedback on %s not sent: %s", pid, exc)

    def health(self) -> dict:
        return {"feedback_sent": dict(self.sent), "skipped": self.skipped, "failed": self.failed}


class SimDevice:
    """One simulated device: a real :class:`~edgeship.agent.Agent` with its own state folder and MQTT client.

    The agent is built from an agent config mapping and wired exactly as
    ``edgeship agent run`` wires it (:func:`edgeship.agent.runner_main.wire_components`:
    outbox, MQTT link, telemetry, feedback, rollout client); the demo adds
    its sensor (:class:`DigitsStream`, or ``stream``) and its user (:class:`SimulatedUser`;
    ``corrections`` makes it send the right label). ``overrides`` replace
    keys of the config's sections (``demo --loop`` turns on keep_inputs).
    """

    def __init__(self, device_id: str, state_dir: Path, *, broker: str, public_key: Path, settings: DemoSettings,
                 images: np.ndarray, labels: np.ndarray, seed: int, package: Path | None = None,
                 stream: Source | None = None, overrides: Mapping[str, Mapping] | None = None,
                 corrections: bool = False) -> None:
        from .agent.agent import Agent
        from .agent.config import parse_config
        from .agent.runner_main import wire_components

        self.device_id = device_id
        self.state_dir = Path(state_dir)
        agent_section: dict[str, Any] = {"device_id": device_id, "fleet": FLEET, "state_dir": str(self.state_dir),
                                         "trusted_keys": [str(public_key)], "drain_timeout_s": 1.0,
                                         "log_level": "warning"}
        if package is not None:
            agent_section["package"] = str(package)
        sections: dict[str, dict] = {
            "agent": agent_section,
            # Many agents share two cores here: one intra-op thread each, one warm-up run.
            "runtime": {"threads": 1, "warmup": 1},
            # The demo's devices run the default int8 variant (see DemoSettings.tflite): no start-up timing of
            # both variants by each of many agents on two shared cores.
            "adapt": {"choose": "default"},
            "batcher": {"max_batch": 16, "max_delay_ms": 5.0},
            "mqtt": {"broker": broker, "keepalive": 10},
            "telemetry": {"window_s": settings.window_s},
            "rollout": {"health_window_s": settings.health_window_s, "jitter_s": settings.jitter_s},
        }
        for name, values in (overrides or {}).items():
            sections[name] = {**sections.get(name, {}), **values}
        self.config = parse_config(sections)
        self.stream = stream or DigitsStream("digits", images, labels, rate_hz=settings.rate_hz, seed=seed)
        self.agent = Agent(self.config, sources=[self.stream])
        wire_components(self.agent, self.config)
        self.rollout_client = _ensure_rollout_client(self.agent, self.config)
        self.user = self.agent.add_component(SimulatedUser(self.agent, share=settings.feedback_share, seed=seed,
                                                           corrections=corrections))

    def start(self) -> "SimDevice":
        self.agent.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.agent.stop(timeout)

    @property
    def model(self) -> dict | None:
        return self.agent.model


def _ensure_rollout_client(agent: Any, config: Any) -> Any:
    """The rollout client ``wire_components`` attached (it does so when ``[mqtt] broker`` is set)."""
    from .agent.rollout_client import RolloutClient

    for c in agent.components:
        if isinstance(c, RolloutClient):
            return c
    raise ConfigError(f"device {config.agent.device_id}: no rollout client was wired; the demo's devices need "
                      "[mqtt] broker and [rollout] enabled = true")


def _stop_all(parts: Sequence[Any], timeout: float) -> None:
    """Stop many parts at once (each stop may drain for a while); wait at most ``timeout`` in total."""
    threads = []
    for p in parts:
        t = threading.Thread(target=_stop_quietly, args=(p, timeout), name="demo-stop", daemon=True)
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _stop_quietly(part: Any, timeout: float) -> None:
    try:
        part.stop(timeout)
    except (EdgeshipError, OSError, RuntimeError) as exc:
        log.warning("stopping %s: %s", type(part).__name__, exc)


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class DemoResult:
    """What one demo run did; also written to ``<workdir>/demo.json``."""

    workdir: Path
    db_path: Path
    report_dir: Path
    report_html: Path | None
    packages: dict[str, Path]
    versions: dict[str, str]
    top1: dict[str, float | None]
    rollouts: dict[str, dict]          # tag -> {"rollout_id", "state", "reason", "stage", ...}
    devices: dict[str, str | None]     # device -> model version active at the end
    broker_url: str
    report_text: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d, default=str))


_OWNED = ("devices", "packages", "report", "fleet.sqlite", "fleet.sqlite-wal", "fleet.sqlite-shm", "demo.json")


def _fresh_workdir(workdir: Path, owned: Sequence[str] = _OWNED) -> None:
    """Remove what an earlier demo run left in ``workdir`` (only the demo's own entries)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in owned:
        p = workdir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(*, workdir: str | os.PathLike = "edgeship-demo", devices: int | None = None, fast: bool = False,
             broker_url: str | None = None, keep: bool = False, quiet: bool = False,
             cache_dir: str | os.PathLike | None = None, echo: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole loop (see the module docstring); returns a :class:`DemoResult`.

    ``workdir`` receives the fleet DB, the device state folders, the served
    packages and the report (an earlier run's are replaced); built models
    are kept in ``cache_dir`` (default :func:`default_cache_dir`) and reused.
    ``keep`` leaves everything running until Ctrl-C. Raises
    :class:`~edgeship.errors.EdgeshipError` subclasses when a part fails, and
    :class:`~edgeship.errors.RolloutError` when a rollout does not end the
    way the demo shows it (v2 promoted to 100 %, v3 aborted and rolled back).
    """
    t0 = time.monotonic()
    s = demo_settings(fast, devices)
    n = _Narrator(quiet, echo)
    workdir = Path(workdir).expanduser().resolve()
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir()
    total = 6
    n.say(f"edgeship demo{' --fast' if fast else ''}: teacher → signed int8 packages → {s.devices} devices → "
          f"staged rollouts → report (in {workdir})")
    n.step(1, total, f"models (cache {cache})")
    built = build_packages(cache, s, quiet=quiet, say=lambda line: n.say("      " + line))
    _fresh_workdir(workdir)
    fleet = _DemoFleet(workdir, s, built, broker_url, n)
    try:
        fleet.start(step=(2, total))
        tags = ("v1", "v2", "v3")
        outcomes: dict[str, dict] = {}
        for i, tag in enumerate(tags):
            outcomes[tag] = fleet.rollout(tag, step=(3 + i, total))
        n.step(6, total, "fleet report")
        rep = fleet.report()
        result = DemoResult(
            workdir=workdir, db_path=fleet.db_path, report_dir=workdir / "report", report_html=rep.html_path,
            packages=dict(fleet.served), versions=dict(VERSIONS), top1=dict(built.top1),
            rollouts=outcomes, devices={d.device_id: (d.model or {}).get("version") for d in fleet.devices},
            broker_url=fleet.broker_url, report_text=rep.text(), seconds=round(time.monotonic() - t0, 1))
        (workdir / "demo.json").write_text(json.dumps(result.to_dict(), indent=2))
        # The short version on the terminal: the per-version table and one line per rollout; the
        # rollouts' timelines, gate figures and plots are in the HTML report.
        for line in rep.table.splitlines() + [""] + rep.sections[0].text.splitlines():
            n.say("      " + line if line else "")
        n.say(f"done in {result.seconds:.0f} s. Report (table, PNG plots, rollout timelines): {rep.html_path}")
        n.say(f"      the same from the CLI: edgeship fleet report --db {fleet.db_path} --out DIR "
              f"[--rollout {outcomes['v3']['rollout_id']}]")
        _check_outcome(result)
        if keep:
            fleet.keep_running()
        return result
    finally:
        fleet.stop()


def _check_outcome(result: DemoResult) -> None:
    """The demo's promise: v2 promoted to 100 % with every device on it, v3 aborted and rolled back."""
    v2, v3 = result.rollouts.get("v2", {}), result.rollouts.get("v3", {})
    if v2.get("state") != "completed":
        raise RolloutError(f"demo: the v2 rollout ended {v2.get('state')!r} ({v2.get('reason') or 'no reason'}), "
                           "not promoted to 100 %; see the report")
    if v3.get("state") != "aborted":
        raise RolloutError(f"demo: the degraded v3 rollout ended {v3.get('state')!r}, not aborted; see the report")
    off = {d: v for d, v in result.devices.items() if v != VERSIONS["v2"]}
    if off:
        raise RolloutError(f"demo: {len(off)} devices are not back on {VERSIONS['v2']} after the v3 abort: "
                           + ", ".join(f"{d}={v}" for d, v in sorted(off.items())[:5]))


class _DemoFleet:
    """The fleet side and the devices of one demo run; owns everything it starts."""

    def __init__(self, workdir: Path, settings: DemoSettings, built: BuiltModels, broker_url: str | None,
                 narrator: _Narrator) -> None:
        self.workdir = workdir
        self.s = settings
        self.built = built
        self.n = narrator
        self.requested_broker = broker_url
        self.broker_url = broker_url or ""
        self.db_path = workdir / "fleet.sqlite"
        self.broker = None
        self.db = None
        self.collector = None
        self.server = None
        self.controller = None
        self.devices: list[SimDevice] = []
        self.served: dict[str, Path] = {}
        self.outcomes: dict[str, dict] = {}
        self._parts: list[Any] = []   # stopped in reverse order

    # -- start / stop ----------------------------------------------------------------
    def start(self, step: tuple[int, int]) -> None:
        from .fleet.stack import FleetStack

        pkgs = self.workdir / "packages"
        pkgs.mkdir(parents=True, exist_ok=True)
        for tag, src in self.built.packages.items():
            dst = pkgs / src.name
            shutil.copyfile(src, dst)
            self.served[tag] = dst
        stack = FleetStack(self.db_path, broker_url=self.requested_broker, fleet=FLEET, embedded_broker=True,
                           collect=True, packages_dir=pkgs, controller="loop", signing_key=self.built.key,
                           tick_s=0.25 if self.s.fast else 1.0, ready_timeout=15.0)
        self._parts.append(stack)
        try:
            stack.start()
        except EdgeshipError as exc:
            hint = "" if self.requested_broker is None else " (without --broker the demo starts its own)"
            raise EdgeshipError(f"{exc}{hint}") from exc
        self.db, self.broker, self.broker_url = stack.db, stack.broker, stack.broker_url
        self.collector, self.server, self.controller = stack.collector, stack.package_server, stack.controller
        which = "embedded amqtt" if self.broker is not None else "given"
        self.n.step(*step, f"fleet: MQTT broker {self.broker_url} ({which}), package server {self.server.url}, "
                           f"collector + rollout controller → {self.db_path.name}")
        self._start_devices()

    def _start_devices(self) -> None:
        s, b = self.s, self.built
        bar = self.n.bar(s.devices, "starting devices")
        try:
            for i in range(s.devices):
                dev = SimDevice(f"pi-{i + 1:02d}", self.workdir / "devices" / f"pi-{i + 1:02d}",
                                broker=self.broker_url, public_key=b.public_key, settings=s,
                                images=b.eval_inputs, labels=b.eval_labels, seed=1000 + i,
                                package=self.served["v0"])
                self.devices.append(dev)
                dev.start()
                bar.update(1)
        finally:
            bar.close()
        self.n.say(f"      {s.devices} devices: real agents with their own state folder, MQTT client, outbox, "
                   f"rollout client; each sees {s.rate_hz:g} bundled digits/s and a simulated user judges "
                   f"{100 * s.feedback_share:.0f}% of its predictions (correct/incorrect)")

    def stop(self) -> None:
        _stop_all(self.devices, 3.0)
        while self._parts:
            _stop_quietly(self._parts.pop(), 5.0)  # the fleet stack closes the DB it opened
        self.db = None

    def keep_running(self) -> None:
        self.n.say(f"--keep: everything keeps running. Broker {self.broker_url}, packages {self.server.url}, "
                   f"fleet DB {self.db_path}. In another terminal: edgeship fleet devices --db {self.db_path}  or  "
                   f"edgeship fleet report --db {self.db_path}. Ctrl-C stops it all.")
        stop = threading.Event()
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            self.n.say("stopping…")

    # -- rollouts --------------------------------------------------------------------
    def _versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.devices:
            v = (d.model or {}).get("version") or "-"
            out[v] = out.get(v, 0) + 1
        return out

    def rollout(self, tag: str, step: tuple[int, int]) -> dict:
        """Start one rollout on the controller and watch it end; returns its outcome (from the controller's status)."""
        s = self.s
        version = VERSIONS[tag]
        stages = {"v1": s.stages_v1, "v2": s.stages_v2, "v3": s.stages_v3}[tag]
        before = self._versions()
        t0 = time.monotonic()
        st = self.controller.start_rollout(
            self.served[tag], stages=[float(p) for p in stages], soak_s=s.soak_s, gates=demo_gates(s),
            health=demo_health(s), who="edgeship demo",
            rollout_id=f"demo-{tag}-{version}-{int(time.time())}")
        rid = st["rollout_id"]
        what = {"v1": "to every device", "v2": "the good update, stage by stage",
                "v3": "the degraded model, stage by stage"}[tag]
        self.n.step(*step, f"rollout {tag} ({NAME} {version}), {what}: stages "
                           f"{' → '.join(f'{p:g}%' for p in stages)}, soak {s.soak_s:g} s per stage "
                           f"(rollout {rid})")
        bar = self.n.bar(len(self.devices), f"{tag} {version}")
        deadline = time.monotonic() + s.rollout_timeout_s
        seen_stage = -1
        try:
            while True:
                st = self.controller.status(rid)
                on_new = sum(1 for d in self.devices if (d.model or {}).get("version") == version)
                bar.n = on_new
                bar.set_postfix_str(f"stage {st['stage_index'] + 1}/{len(stages)} {st['percent']:g}% {st['state']}")
                bar.refresh()
                if st["stage_index"] != seen_stage and st["state"] == "running":
                    seen_stage = st["stage_index"]
                    if seen_stage > 0:
                        self.n.say(f"      gates held through the soak: promoted to stage {seen_stage + 1} "
                                   f"({st['percent']:g}%)")
                if st["state"] not in ("running",):
                    break
                if time.monotonic() > deadline:
                    raise RolloutError(f"demo: rollout {rid} still {st['state']} at stage {st['stage_index'] + 1} "
                                       f"after {s.rollout_timeout_s:.0f} s ({st['decision']['reason']})")
                time.sleep(0.25)
            # The plan has ended; wait for the devices to get there (switch + health window, or roll back).
            self._converge(rid, version, st["state"], before, deadline, bar)
        finally:
            bar.close()
        st = self.controller.status(rid)
        out = {"rollout_id": rid, "version": version, "state": st["state"], "reason": st.get("reason") or "",
               "stage": st["stage_index"] + 1, "percent": st["percent"], "stages": [x["percent"] for x in st["stages"]],
               "devices_per_state": st["devices_per_state"], "versions_after": self._versions(),
               "gates": [{k: g.get(k) for k in ("name", "verdict", "canary", "control", "canary_n", "control_n",
                                                "threshold", "detail")} for g in st["gates"]],
               "seconds": round(time.monotonic() - t0, 1)}
        self.outcomes[tag] = out
        self._narrate_outcome(tag, out, before)
        return out

    def _converge(self, rid: str, version: str, state: str, before: dict, deadline: float, bar) -> None:
        n = len(self.devices)
        while time.monotonic() < deadline:
            per = self.controller.status(rid)["devices_per_state"]
            on_new = sum(1 for d in self.devices if (d.model or {}).get("version") == version)
            bar.n = on_new
            bar.refresh()
            if state == "completed" and on_new == n and per.get("healthy", 0) >= n:
                return
            if state == "aborted" and on_new == 0 and not per.get("active") and not per.get("healthy"):
                return
            if state == "paused":
                return
            time.sleep(0.25)
        log.warning("rollout %s: devices had not all settled when the demo stopped waiting", rid)

    def _narrate_outcome(self, tag: str, o: dict, before: dict) -> None:
        per = ", ".join(f"{v} {k}" for k, v in sorted(o["devices_per_state"].items()))
        after = ", ".join(f"{v} on {k}" for k, v in sorted(o["versions_after"].items()))
        if o["state"] == "completed":
            self.n.say(f"      completed: promoted to {o['percent']:g}% in {o['seconds']:.0f} s; devices {per}; "
                       f"now {after}")
        elif o["state"] == "aborted":
            failed = [g for g in o["gates"] if g["verdict"] == "fail"]
            why = "; ".join(f"gate {g['name']}: canary {_pct(g['canary'])} vs control {_pct(g['control'])} "
                            f"({g['canary_n']} vs {g['control_n']} samples)" for g in failed) or o["reason"]
            self.n.say(f"      ABORTED at stage {o['stage']} ({o['percent']:g}%) after {o['seconds']:.0f} s — {why}")
            self.n.say(f"      devices {per}; now {after}")
        else:
            self.n.say(f"      ended {o['state']}: {o['reason']}; devices {per}; now {after}")

    # -- report ----------------------------------------------------------------------
    def report(self):
        from .fleet.report import build_report

        # Let the last telemetry windows and feedback reach the DB before reading it.
        self._settle(2 * self.s.window_s + 1.0)
        sections = _report_sections(self)
        # Buckets of a few telemetry windows: the whole run lasts minutes, not the days `fleet report` expects.
        return build_report(self.db, out_dir=self.workdir / "report", sections=sections,
                            bucket_s=max(2.0, 3 * self.s.window_s))

    def _settle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            stored = self.collector.stats()["stored"]
            if stored == last:
                break
            last = stored
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def demo_gates(settings: DemoSettings) -> list[str]:
    """The gates every demo rollout uses (``NAME:THRESHOLD:MIN_SAMPLES[:CONFIDENCE[:SLACK]]``).

    Sample counts are scaled to the demo's short soaks; the latency gate gets
    a generous ratio and slack because all devices share this machine's two
    cores. The negative-feedback gate is the one the demo is about.
    """
    m = settings.min_samples
    # failures at 10 %: one device in ten may trip its local health check on this shared machine.
    return ["failures:0.1:1", f"error_rate:0.01:{5 * m}", f"latency_p95:3.0:{5 * m}:0.95:50",
            f"negative_feedback:0.05:{m}"]


def demo_health(settings: DemoSettings) -> dict:
    """The devices' local health check after a switch (:class:`edgeship.rollout.HealthPolicy` fields).

    All simulated devices share this machine's two cores, so while several
    of them load a new model at once every device's latency jumps for a
    moment (p95 spikes of a few hundred ms were seen with 24 devices); the
    slack keeps that shared-machine hiccup from counting as a slow model (a
    real device switches alone). Every demo model has the same architecture,
    so latency is not what the demo tests; the error-rate check stays.
    """
    return {"window_s": settings.health_window_s, "min_inferences": 10, "max_latency_ratio": 10.0,
            "latency_slack_ms": 1000.0}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _gate_text(g: Mapping) -> str:
    """One gate's end state for the report: verdict, canary vs control, samples."""
    fmt = (lambda v: "n/a" if v is None else f"{v:.1f} ms") if g["name"] == "latency_p95" else _pct
    return (f"{g['name']}: {g['verdict']}, canary {fmt(g['canary'])} vs control {fmt(g['control'])} "
            f"({g['canary_n']} vs {g['control_n']} samples)")


def _report_sections(fleet) -> list:
    from .fleet.report import Section

    def rollouts(db, summary, out):
        import html

        lines, rows = [], []
        for tag, o in fleet.outcomes.items():
            stage = f"{o['stage']}/{len(o['stages'])} ({o['percent']:g}%)"
            per = ", ".join(f"{k} {v}" for k, v in sorted(o["devices_per_state"].items()))
            lines.append(f"{tag} {o['version']} ({o['rollout_id']}): {o['state']} at stage {stage} after "
                         f"{o['seconds']:.0f} s; devices: {per}" + (f"; {o['reason']}" if o.get("reason") else ""))
            gates = "<br>".join(html.escape(_gate_text(g)) for g in o["gates"])
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
                html.escape(f"{tag} {o['version']}"), html.escape(o["state"]), html.escape(stage),
                f"{o['seconds']:.0f} s", html.escape(per), gates, html.escape(o.get("reason") or ""))) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("rollout", "outcome", "stage reached", "took", "devices",
                                                  "gates at the end", "reason"))
        frag = ("<p>Stages, gates and outcomes of the demo's rollouts (the controller's status at the end).</p>"
                f"<table><tr>{head}</tr>{''.join(rows)}</table>")
        return Section("Demo rollouts", text="\n".join(lines), html=frag, data={"rollouts": fleet.outcomes})

    def per_rollout(tag: str, rollout_id: str):
        from .fleet.report import rollout_section

        inner = rollout_section(rollout_id)
        # Its plots have fixed names: one folder per rollout keeps the three apart.
        return lambda db, summary, out: inner(db, summary, None if out is None else out / f"rollout-{tag}")

    return [rollouts] + [per_rollout(tag, o["rollout_id"]) for tag, o in fleet.outcomes.items()]
