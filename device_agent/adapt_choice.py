"""The variant served at start-up: each variant measured on this device, the fastest within the accuracy budget.

A package carries several variants of one model (fp32 and the best int8,
TFLite where built) with their accuracy. Which is fastest depends on the
device: int8 ran at 0.36x the fp32 throughput on an x86 without int8
dot-product instructions (issue 19), and 2-3x faster on a Pi 5. So the agent
measures instead of trusting the workstation:

1. it serves the package's default at once (spawn -> first result is not
   held up), and after the first result (or ``SETTLE_S``) its
   :class:`VariantChooser` thread loads the other variants within the
   accuracy budget beside it (:func:`~edgeship.agent.adapt_policy.eligible_variants`);
2. times them all interleaved on the package's example input, at batch 1
   and then at the batcher's batch, for ``[adapt] choose_s`` in total (at
   least ``MIN_ROUNDS`` rounds each, so a big model takes longer:
   :func:`measure_variants`);
3. asks the pure :func:`~edgeship.agent.adapt_policy.choose_fastest` (a noise
   margin prefers the default), switches through the agent's zero-drop swap
   when another variant wins, and reports the choice, the figures and the
   machine (:func:`machine_info`) in one log line, ``agent.metrics`` (so
   ``/v1/metrics`` and telemetry) and ``health()``.

With ``[adapt] latency_budget_ms`` the start-up choice is the
:class:`~edgeship.agent.adapt.AdaptController`'s (the most accurate variant
within the latency budget); it stops a chooser still measuring and reports
its choice the same way, so there is one choice. Why: ``docs/adapt.md``.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import EdgeshipError
from ..lifecycle import Loop
from .adapt_policy import accuracy_budget, accuracy_drops, choose_fastest, eligible_variants, variant_accuracy

__all__ = ["VariantChooser", "start_choice", "stop_choice", "measure_variants", "example_feed", "machine_info",
           "parse_cpuinfo", "choice_line", "choice_metric_lines", "publish_choice", "SETTLE_S", "MIN_ROUNDS"]

log = logging.getLogger("edgeship.agent.adapt")

SETTLE_S = 0.5     # wait at most this long for the first result before measuring (it is not held up)
MIN_ROUNDS = 3     # interleaved rounds at least, whatever choose_s says (a big model then takes longer)
MAX_ROUNDS = 1000  # and at most: a tiny model's figures are stable long before choose_s
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # int8 dot-product instructions


# --------------------------------------------------------------------------- the machine

def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """``/proc/cpuinfo`` text → (CPU model name, flags). Pure. x86 says ``model name``/``flags``; Arm
    ``Hardware``/``Features`` (often no model name at all: the device-tree model names the board then)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, flags


def machine_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo",
                 dt_model: str | os.PathLike = "/proc/device-tree/model") -> dict:
    """Which machine measured: ``{"cpu", "arch", "cores", "int8_dot"}`` (CPU model, board on a Pi)."""
    try:
        model, flags = parse_cpuinfo(Path(cpuinfo).read_text(errors="replace"))
    except OSError:
        model, flags = None, set()
    try:
        board = Path(dt_model).read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        board = None
    cpu = " / ".join(x for x in (board, model) if x) or platform.processor() or "unknown CPU"
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(),
            "int8_dot": [f for f in INT8_DOT if f in flags]}


# --------------------------------------------------------------------------- measuring

def example_feed(handle: Any, batch: int = 1) -> tuple[list[np.ndarray], bool] | None:
    """``(one model call's inputs at ``batch`` rows, real?)`` from the package's example input.

    Real inputs where the package has an example (``real`` True), zeros of
    the input shapes otherwise; None when an input has a variable size and
    no example says which (a detector's H x W cannot be made up).
    """
    pkg = getattr(handle.runner, "package", None)
    try:
        ex = pkg.example_input() if pkg is not None else None
    except EdgeshipError:
        ex = None
    feed, real = [], True
    for i, (name, shape, dtype) in enumerate(zip(handle.input_names, handle.sample_shapes, handle.dtypes)):
        arr = ex.get(name) if isinstance(ex, Mapping) else (ex if i == 0 else None)
        if arr is None:
            if any(d < 0 for d in shape):
                return None
            arr, real = np.zeros((1, *shape), dtype), False
        else:
            arr = np.asarray(arr, dtype=dtype)
            arr = (arr[None] if arr.ndim == len(shape) else arr)[:1]
        if batch > 1:
            arr = np.repeat(arr, batch, axis=0)
        feed.append(np.ascontiguousarray(arr))
    return feed, real


def measure_variants(runs: Mapping[str, Any], feeds: Mapping[str, Mapping[int, list]], *, seconds: float = 1.0,
                     min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                     stop: threading.Event | None = None) -> dict[str, dict[int, float]]:
    """Median call ms per variant and batch size: ``{id: {batch: ms}}``.

    ``runs[id](feed)`` is one model call; ``feeds[id][batch]`` its inputs, in
    the order to time them (batch 1 first). One phase per batch size: in a
    session that alternates shapes call by call, a 48x192 CNN's fp32 batch-1
    call took 9.8 ms between batch-32 calls against 1.3 ms in a row (cause
    not traced: likely memory re-planning and cold caches), which steady
    serving (a stream of lone requests, or of full batches) does not see. Within
    a phase the variants are interleaved (one call each per round, the order
    rotated every round), so a burst of load from another process, or
    serving meanwhile, hits every variant alike instead of deciding the
    choice; the median, so a stray preemption does not. One untimed call
    first (a new shape plans its memory on its first run). A phase ends once
    its share of ``seconds`` is used and ``min_rounds`` are done, or at
    ``max_rounds``; everything ends when ``stop`` is set.
    """
    phases = max((len(f) for f in feeds.values()), default=0)
    out: dict[str, dict[int, float]] = {vid: {} for vid in runs}
    for phase in range(phases):
        keys = [(vid, list(feeds[vid])[phase]) for vid in runs if len(feeds[vid]) > phase]
        for vid, b in keys:
            runs[vid](feeds[vid][b])
        times: dict[tuple, list[float]] = {k: [] for k in keys}
        t_end = time.perf_counter() + seconds / phases
        for r in range(max_rounds):
            if r >= min_rounds and time.perf_counter() >= t_end or stop is not None and stop.is_set():
                break
            shift = r % len(keys)
            for vid, b in keys[shift:] + keys[:shift]:
                t0 = time.perf_counter()
                runs[vid](feeds[vid][b])
                times[(vid, b)].append((time.perf_counter() - t0) * 1000.0)
        for (vid, b), ts in times.items():
            if ts:
                out[vid][b] = float(np.median(ts))
    return out


def _sizes(handle: Any, batch: int) -> list[int] | None:
    """The batch sizes to time ``handle`` at: 1 and the batcher's, or the model's fixed batch; None: cannot."""
    if handle.states is not None or handle.scalars:
        return None  # state and scalar inputs are not in a plain feed
    if handle.model_batch == 0:
        return None
    if handle.model_batch:  # a fixed batch: every call runs that many rows (the packer pads)
        return [int(handle.model_batch)]
    return [1, batch] if batch > 1 and not handle.dynamic else [1]


def _figures(handle: Any, ms: Mapping[int, float], batch: int) -> dict:
    """Measured call times → ``{"b1_ms", "bn_ms", "batch"}`` as :func:`choose_fastest` reads them."""
    k = handle.model_batch
    if k:  # a lone sample pays a whole padded call; a batch of `batch` takes ceil(batch / k) calls
        t = ms[int(k)]
        return {"b1_ms": t, "bn_ms": math.ceil(batch / k) * t if batch > 1 else None, "batch": batch}
    return {"b1_ms": ms[1], "bn_ms": ms.get(batch) if batch > 1 else None, "batch": batch if batch in ms else 1}


# --------------------------------------------------------------------------- reporting

def choice_line(choice: Mapping) -> str:
    """The one log line of a choice: what is served, why, every variant's figures, the machine."""
    m = choice.get("machine") or {}
    dot = ", int8 dot product: " + "/".join(m["int8_dot"]) if m.get("int8_dot") else ", no int8 dot product"
    figs = []
    for vid, f in (choice.get("measured") or {}).items():
        bn = f" b{f['batch']} {f['bn_ms']:.3f} ms" if f.get("bn_ms") is not None else ""
        rel = f" ({f['relative']:.2f}x)" if f.get("relative") is not None else ""
        figs.append(f"{vid} b1 {f['b1_ms']:.3f} ms{bn}{rel}")
    excl = "; ".join(f"{k} not served: {v}" for k, v in (choice.get("excluded") or {}).items())
    line = (f"variant choice ({choice.get('mode')}): serving {choice.get('variant')} (package default "
            f"{choice.get('default')}): {choice.get('reason')}"
            + (f"; measured {', '.join(figs)}" if figs else "") + (f"; {excl}" if excl else "")
            + f"; on {m.get('cpu')} ({m.get('arch')}, {m.get('cores')} cores{dot})"
            + (f" in {choice['measure_s']:.2f} s" if choice.get("measure_s") is not None else ""))
    return " ".join(line.split())  # one line, whatever a load error's text holds


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def choice_metric_lines(choice: Mapping, prefix: str = "edgeship") -> list[str]:
    """Prometheus lines of a choice (pure): an info gauge naming it and the machine, and the measured times."""
    m = choice.get("machine") or {}
    labels = {"variant": choice.get("variant"), "default": choice.get("default"), "mode": choice.get("mode"),
              "cpu": m.get("cpu"), "arch": m.get("arch"), "int8_dot": "/".join(m.get("int8_dot") or []) or "none"}
    text = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
    lines = [f"# TYPE {prefix}_variant_choice_info gauge", f"{prefix}_variant_choice_info{{{text}}} 1"]
    measured = choice.get("measured") or {}
    if measured:
        lines.append(f"# TYPE {prefix}_variant_call_ms gauge")
        for vid, f in measured.items():
            lines.append(f'{prefix}_variant_call_ms{{variant="{_esc(vid)}",batch="1"}} {f["b1_ms"]:.6f}')
            if f.get("bn_ms") is not None:
                lines.append(f'{prefix}_variant_call_ms{{variant="{_esc(vid)}",batch="{int(f["batch"])}"}} '
                             f'{f["bn_ms"]:.6f}')
    return lines


def publish_choice(agent: Any, choice: dict) -> None:
    """Make ``choice`` the agent's reported one (``/v1/metrics``, telemetry) and log its line."""
    agent.metrics.variant_choice = choice
    log.info("%s", choice_line(choice))


# --------------------------------------------------------------------------- the component

class VariantChooser(Loop):
    """Agent component: after start-up, measures the package's eligible variants and serves the fastest.

    One pass on its own thread (the agent serves the default meanwhile); see
    the module docstring. ``result`` is the published choice (None until
    made); ``ready`` is set when the pass is over, chosen or not.
    """

    def __init__(self, agent: Any, *, seconds: float | None = None, margin: float | None = None,
                 max_drop: float | None = None, settle_s: float = SETTLE_S, machine: dict | None = None) -> None:
        super().__init__("edgeship-variant-choice")
        cfg = agent.config.adapt
        self.agent = agent
        self.mode = cfg.choose
        self.seconds = float(cfg.choose_s if seconds is None else seconds)
        self.margin = float(cfg.choose_margin if margin is None else margin)
        self.max_drop = cfg.max_drop if max_drop is None else max_drop
        self.settle_s = float(settle_s)
        self.machine = machine
        self.state = "waiting"   # waiting | measuring | done | skipped | cancelled | failed
        self.result: dict | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.ready.set()

    def _run(self) -> None:
        agent = self.agent
        t_start = time.monotonic()
        # The first result is not held up: the agent serves the default while this waits (bounded).
        while agent.first_result_at is None and time.monotonic() - t_start < self.settle_s:
            if self.wait(0.01):
                return
        handle = agent.handle
        if handle is None or self.stopping:
            self.state = "cancelled"
            return
        try:
            choice = self.choose(handle)
        except EdgeshipError as exc:  # choosing is an optimisation: the default keeps serving
            self.state = "failed"
            log.warning("variant choice failed, serving the default: %s", exc)
            return
        if choice is not None:
            publish_choice(agent, choice)
            self.result = choice

    def choose(self, handle: Any) -> dict | None:
        """Measure (mode "fastest") or look up (mode "most_accurate"), switch, and return the choice."""
        agent = self.agent
        manifest = handle.manifest
        variants = [v for v in manifest.get("variants") or [] if v.get("id")]
        default = next((v for v in variants if v.get("default")), variants[0] if variants else None)
        if default is None or handle.variant != default.get("id"):
            self.state = "skipped"  # something else chose already (a rollout, adapt): not ours to change
            return None
        did = str(default["id"])
        budget, budget_from = accuracy_budget(manifest, self.max_drop)
        ids, excluded = eligible_variants(variants, did, budget, agent.config.runtime.backend)
        base = {"mode": self.mode, "default": did, "variant": did, "max_drop": budget, "max_drop_from": budget_from,
                "drops": accuracy_drops(variants), "excluded": excluded, "machine": self.machine or machine_info(),
                "at": time.time()}
        if self.mode == "most_accurate":
            by_id = {str(v["id"]): v for v in variants}
            best = max(by_id, key=lambda vid: variant_accuracy(by_id[vid]))
            return self._switch(handle, {**base, "variant": best, "excluded": {}, "measured": {},
                                         "reason": "the most accurate variant ([adapt] choose = \"most_accurate\")"},
                                {})
        if len(ids) < 2:
            self.state = "done"
            return {**base, "measured": {}, "reason": "no other variant within the accuracy budget "
                    f"({budget:g} pt, {budget_from})"}
        return self._measure_and_switch(handle, ids, base)

    def _measure_and_switch(self, handle: Any, ids: list[str], base: dict) -> dict | None:
        agent = self.agent
        self.state = "measuring"
        t0 = time.monotonic()
        batch = int(getattr(agent.batcher.policy, "max_batch", 1)) if agent.batcher is not None else 1
        loaded: dict[str, Any] = {base["default"]: handle}  # the served default is timed as it serves
        excluded = dict(base["excluded"])
        try:
            for vid in ids:
                if vid in loaded or self.stopping:
                    continue
                try:
                    loaded[vid] = agent.load_candidate(handle.sha256, variant=vid)
                except EdgeshipError as exc:  # e.g. a TFLite variant on a device without a TFLite runtime
                    excluded[vid] = f"cannot be loaded here: {exc}"
            runs, feeds, real = {}, {}, True
            for vid, h in loaded.items():
                sizes = _sizes(h, batch)
                feed = example_feed(h) if sizes is not None else None
                if sizes is None or feed is None:
                    excluded[vid] = "cannot be timed: state or scalar inputs, or a variable size without an example"
                    continue
                real = real and feed[1]
                runs[vid] = h.run_fn()
                feeds[vid] = {b: example_feed(h, b)[0] for b in sizes}
            if base["default"] not in runs or len(runs) < 2 or self.stopping:
                self.state = "cancelled" if self.stopping else "done"
                return None if self.stopping else {**base, "excluded": excluded, "measured": {},
                                                   "reason": "nothing to compare the default with"}
            ms = measure_variants(runs, feeds, seconds=self.seconds, stop=self._stopping)
            if self.stopping:  # stopped mid-way (the agent stops, or adapt takes over): figures incomplete
                self.state = "cancelled"
                return None
            figures = {vid: _figures(loaded[vid], ms[vid], batch) for vid in runs}
            best, reason, rel = choose_fastest(figures, base["default"], self.margin, base["drops"])
            for vid in figures:
                figures[vid] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in figures[vid].items()},
                                "relative": round(rel[vid], 3)}
            choice = {**base, "variant": best, "reason": reason + ("" if real else "; timed on zeros: the package "
                                                                    "has no example input"),
                      "excluded": excluded, "measured": figures, "measure_s": round(time.monotonic() - t0, 3)}
            return self._switch(handle, choice, loaded)
        finally:
            for h in loaded.values():  # every candidate the switch did not adopt
                if h is not handle and h is not agent.handle:
                    h.close()

    def _switch(self, handle: Any, choice: dict, loaded: dict) -> dict | None:
        agent = self.agent
        best = choice["variant"]
        if best == handle.variant:
            self.state = "done"
            return choice
        if self.stopping or agent.handle is not handle:
            # 1. Something else switched while this measured (a rollout, adapt, a rollback): its model stays.
            self.state = "cancelled"
            return None
        new = loaded.get(best)
        if new is None:
            new = agent.load_candidate(handle.sha256, variant=best)
            loaded[best] = new
        agent.switch_to(new)  # between two batches; nothing in flight is dropped
        self.state = "done"
        return choice

    def health(self) -> dict:
        c = self.result
        return {"state": self.state, "variant": None if c is None else c["variant"],
                "reason": None if c is None else c["reason"]}


def start_choice(agent: Any) -> VariantChooser | None:
    """Start the chooser as a component of ``agent`` when its config and package leave a choice (agent start-up).

    None: ``[adapt] choose = "default"``, ``[runtime] variant`` names one,
    ``[adapt] latency_budget_ms`` is set (the AdaptController chooses), no
    model yet, or a package with one variant.
    """
    cfg = agent.config
    handle = agent.handle
    if (cfg.adapt.choose == "default" or cfg.runtime.variant or cfg.adapt.latency_budget_ms is not None
            or handle is None or len(handle.manifest.get("variants") or []) < 2):
        return None
    chooser = VariantChooser(agent)
    agent.components.append(chooser)  # stopped with the agent's components
    return chooser.start()


def stop_choice(agent: Any, timeout: float = 10.0) -> None:
    """Stop a chooser still measuring (the AdaptController takes over the start-up choice)."""
    for c in list(getattr(agent, "components", ())):
        if isinstance(c, VariantChooser) and c.alive:
            c.stop(timeout)
