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
                 max_values_per_update: int = dm.MAX_VALUES_PER_UPDATE) -> None:
        self.agent = agent
        self.min_samples = int(min_samples)
        self.max_values = int(max_values_per_update)
        self._fixed_reference = reference
        self._lock = threading.Lock()
        self._sha: str | None = None
        self._variant: str | None = None
        self._model: dict | None = None
        self._window: dm.WindowStats | None = None
        self._previous: dict | None = None
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
            self._previous = {**old.report(min_samples=self.min_samples), "model": self._model}
        self._window, self._reason = None, None
        self._sha = (batch.model or {}).get("sha256")
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
            try:
                w.update(list(inputs), dict(zip(batch.output_names, batch.outputs)))
            except EdgeshipError as exc:  # a batch that does not fit the reference: count it, keep serving
                self._skipped += 1
                if self._skipped == 1:
                    log.warning("drift: batch skipped: %s", exc)

    # -- telemetry -------------------------------------------------------------
    def telemetry_fields(self) -> dict:
        """The ``drift`` field of one telemetry window; closes the window (called by Telemetry.flush)."""
        with self._lock:
            w = self._window
            if w is None and self._previous is None:
                return {"drift": {"rev": dm.REF_REV, "enabled": False, "reason": self._reason,
                                  "model": self._model}} if self._reason else {}
            body: dict[str, Any] = (w.report(min_samples=self.min_samples) if w is not None
                                    else {"rev": dm.REF_REV, "samples": 0, "score": None, "alarm": None,
                                          "alarms": []})
            body["model"] = self._model
            body["skipped_batches"] = self._skipped
            if self._previous is not None:
                body["previous"] = self._previous
            self._previous = None
            self._skipped = 0
            if w is not None:
                w.reset()
            self.last_report = body
            return {"drift": body}

    def health(self) -> dict:
        r = self.last_report
        return {"drift": None if r is None else {"score": r.get("score"), "alarm": r.get("alarm"),
                                                  "alarms": r.get("alarms"), "samples": r.get("samples")}}
