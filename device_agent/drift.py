"""On-device drift monitoring: an agent component feeding :class:`edgeship.drift.WindowStats`.

No raw data leaves the device: each batch's preprocessed inputs and outputs
are folded into fixed-size counters laid out like the package's
``reference_stats`` (see :mod:`edgeship.drift`), and each telemetry window
carries only the scores::

    "drift": {"rev": 1, "samples", "nonfinite", "score", "alarm", "alarms",
              "inputs": {"<name>": {"psi", "z", "psi_groups", "z_groups", "mean_groups"}},
              "predictions": {"psi", "confidence_psi", "mean_confidence", "confidence_z",
                              "confidence_hist": {"edges", "counts"}, "class_counts"},
              "model": {"name", "version", "sha256", "variant"}, "skipped_batches": n}

Wiring (done by the entry point that builds the agent)::

    monitor = DriftMonitor(agent)
    agent.add_component(monitor)
    telemetry.add_fields(monitor.telemetry_fields)

The update runs on the batcher thread inside ``on_batch_inputs`` — the only
moment the packed input rows are valid — and costs a bounded amount per
batch: at most :data:`edgeship.drift.MAX_VALUES_PER_UPDATE` values per
channel are binned (a rotating stride over larger batches). Cache hits are
not seen (their inputs never reach the model). When the active model
changes, the window restarts against the new model's reference; the old
model's partial window is reported once as ``previous``.

**Against the replaced model's reference, too** (``compare_previous``, on by
default): after a switch to another package the monitor keeps a second
window over the reference of the package it replaced and reports it as
``"vs_previous": {"model", "samples", "score", "alarm", "alarms"}``. A
retrained package's reference holds the field data it was trained on, so
its own drift score falls after a rollout even when the field has not
changed back; the score against the replaced model's reference says
whether the inputs did. It doubles the per-batch drift cost while it runs.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from .. import drift as dm
from ..errors import EdgeshipError

__all__ = ["DriftMonitor"]

log = logging.getLogger("edgeship.agent.drift")


class DriftMonitor:
    """Agent component: per-window drift statistics of the active model's inputs and predictions."""

    def __init__(self, agent: Any = None, *, reference: Mapping | None = None,
                 min_samples: int = dm.MIN_ALARM_SAMPLES,
                 max_values_per_update: int = dm.MAX_VALUES_PER_UPDATE, compare_previous: bool = True) -> None:
        self.agent = agent
        self.compare_previous = bool(compare_previous)
        self.min_samples = int(min_samples)
        self.max_values = int(max_values_per_update)
        self._fixed_reference = reference
        self._lock = threading.Lock()
        self._sha: str | None = None
        self._variant: str | None = None
        self._model: dict | None = None
        self._window: dm.WindowStats | None = None
        self._previous: tuple[dm.WindowStats, dict | None] | None = None
        self._base: dm.WindowStats | None = None   # over the replaced package's reference (compare_previous)
        self._base_model: dict | None = None
        self._skipped = 0
        self._reason: str | None = None
        self.last_report: dict | None = None
        if reference is not None:
            self._window = dm.WindowStats(reference, max_values_per_update=self.max_values)

    # -- lifecycle (no thread of its own) --------------------------------------
    def start(self) -> "DriftMonitor":
        return self

    def stop(self, timeout: float = 5.0) -> None:
        return None

    # -- the hook --------------------------------------------------------------
    def _reference_for(self, batch: Any) -> Mapping | None:
        if self._fixed_reference is not None:
            return self._fixed_reference
        handle = getattr(self.agent, "handle", None)
        manifest = getattr(handle, "manifest", None) if handle is not None else None
        sha = (batch.model or {}).get("sha256")
        if manifest is None or getattr(handle, "sha256", None) != sha:
            store = getattr(self.agent, "store", None)
            manifest = store.manifest(sha) if store is not None and sha else None
        return (manifest or {}).get("reference_stats")

    def _rebind(self, batch: Any) -> None:
        """The active model changed: restart the window against its reference (called with the lock held)."""
        old = self._window
        if old is not None and old.samples:
            # Reported (and its thresholds computed) by the next telemetry_fields, outside the lock.
            self._previous = (old, self._model)
        new_sha = (batch.model or {}).get("sha256")
        if self.compare_previous and old is not None and self._sha != new_sha:
            # Another package (not another variant of this one): keep judging against the reference it replaces.
            self._base, self._base_model = old.empty_like(), self._model
        self._window, self._reason = None, None
        self._sha = new_sha
        handle = getattr(self.agent, "handle", None)
        self._variant = getattr(handle, "variant", None)
        self._model = {**dict(batch.model or {}), "variant": self._variant}
        try:
            ref = self._reference_for(batch)
            if ref is None:
                self._reason = "the package has no reference_stats (rebuild it with edgeship >= this version)"
                return
            self._window = dm.WindowStats(ref, max_values_per_update=self.max_values)
        except EdgeshipError as exc:
            self._reason = str(exc)
            log.warning("drift monitoring off for %s: %s", self._sha and self._sha[:12], exc)

    def on_batch_inputs(self, batch: Any, inputs: list) -> None:
        if getattr(batch, "cached", False):
            return
        with self._lock:
            sha = (batch.model or {}).get("sha256")
            handle = getattr(self.agent, "handle", None)
            variant = getattr(handle, "variant", None)
            if self._fixed_reference is None and (sha != self._sha or variant != self._variant):
                self._rebind(batch)
            w = self._window
            if w is None:
                return
            outputs = dict(zip(batch.output_names, batch.outputs))
            try:
                w.update(list(inputs), outputs)
            except EdgeshipError as exc:  # a batch that does not fit the reference: count it, keep serving
                self._skipped += 1
                if self._skipped == 1:
                    log.warning("drift: batch skipped: %s", exc)
            if self._base is not None:
                try:
                    self._base.update(list(inputs), outputs)
                except EdgeshipError as exc:  # the new model's inputs do not fit the old reference: stop comparing
                    log.info("drift: no comparison with the replaced model's reference: %s", exc)
                    self._base = self._base_model = None

    # -- telemetry -------------------------------------------------------------
    def telemetry_fields(self) -> dict:
        """The ``drift`` field of one telemetry window; closes the window (called by Telemetry.flush)."""
        with self._lock:
            w = self._window
            if w is None and self._previous is None:
                return {"drift": {"rev": dm.REF_REV, "enabled": False, "reason": self._reason,
                                  "model": self._model}} if self._reason else {}
            # Swap in an empty window and read the closed one outside the lock: the first window of a new
            # size computes its calibrated thresholds (milliseconds per statistic), and the batcher thread
            # must not wait for that in on_batch_inputs.
            if w is not None:
                self._window = w.empty_like()
            previous, self._previous = self._previous, None
            model, skipped, self._skipped = self._model, self._skipped, 0
            base, base_model = self._base, self._base_model
            if base is not None:
                self._base = base.empty_like()
        body: dict[str, Any] = (w.report(min_samples=self.min_samples) if w is not None
                                else {"rev": dm.REF_REV, "samples": 0, "score": None, "alarm": None, "alarms": []})
        body["model"] = model
        body["skipped_batches"] = skipped
        if previous is not None:
            body["previous"] = {**previous[0].report(min_samples=self.min_samples), "model": previous[1]}
        if base is not None:
            r = base.report(min_samples=self.min_samples)
            body["vs_previous"] = {"model": base_model, **{k: r[k] for k in ("samples", "score", "alarm", "alarms")}}
        self.last_report = body
        return {"drift": body}

    def health(self) -> dict:
        r = self.last_report
        return {"drift": None if r is None else {"score": r.get("score"), "alarm": r.get("alarm"),
                                                  "alarms": r.get("alarms"), "samples": r.get("samples")}}
