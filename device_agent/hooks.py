"""The agent's plug-in points for components: which hooks each one has, and handing a batch to them.

Runs on the batcher's delivery path: a sink or hook that raises is logged
(and a failing sink counted as an error), never allowed to stop inference.

Components: the contract
------------------------
``agent.add_component(obj)`` (or ``Agent(..., components=[...])``) plugs in
anything with ``start()`` and ``stop(timeout)``, and optionally:

* ``on_batch(batch: ResultBatch)`` — called once per batch (fast path;
  ``batch.results()`` materialises per-sample results), or
  ``on_result(result: Result)`` — called per sample (simple, slower);
* ``on_batch_inputs(batch, inputs)`` — called on the batcher thread with
  the packed input rows of the batch (one array per model input, row i =
  ``batch`` row i); valid only during the call (the buffers are reused);
* ``wants_inputs = True`` — per-sample results given to ``on_result``
  carry ``result.inputs`` (a copy of the preprocessed input), e.g. for
  feedback capture;
* ``health() -> dict`` — merged into ``agent.health()["components"]``;
* ``feedback(prediction_id, kind, value=None)`` — the first component
  with this method receives ``agent.feedback(...)`` and ``POST
  /v1/feedback``; without one, both raise/return "feedback not enabled".

Components are started after the model is loaded and stopped before the
sinks close. ``agent.metrics.snapshot()`` gives the cumulative counters and
histograms (the telemetry window takes deltas); ``agent.store`` is the
:class:`~edgeship.agent.store.ModelStore`; ``agent.model`` names the active
model. Sink types other than stdout/jsonl/callback (e.g. ``mqtt``) come
from ``Agent(..., sink_factories={"mqtt": factory})``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .results import Result, ResultBatch

__all__ = ["Hooks", "component_health"]

log = logging.getLogger("edgeship.agent")


class Hooks:
    """The components' ``on_batch`` / ``on_result`` / ``on_batch_inputs`` hooks, wired once per component."""

    def __init__(self) -> None:
        self.batch: list[Callable[[ResultBatch], None]] = []
        self.result: list[Callable[[Result], None]] = []
        # on_batch_inputs(batch, inputs): called on the batcher thread while the packed input rows are valid
        # (drift monitoring reads them there; they are overwritten by the next batch).
        self.inputs: list[Callable[[ResultBatch, list[np.ndarray]], None]] = []
        self.wants_inputs = False

    def wire(self, obj: Any) -> None:
        if hasattr(obj, "on_batch_inputs"):
            self.inputs.append(obj.on_batch_inputs)
        if hasattr(obj, "on_batch"):
            self.batch.append(obj.on_batch)
        elif hasattr(obj, "on_result"):
            self.result.append(obj.on_result)
        if getattr(obj, "wants_inputs", False):
            self.wants_inputs = True

    @property
    def any(self) -> bool:
        return bool(self.batch or self.result or self.inputs)

    @property
    def need_inputs(self) -> bool:
        """Whether a batch's packed inputs must be copied for the hooks."""
        return bool(self.inputs) or self.wants_inputs

    def deliver(self, batch: ResultBatch, inputs: list[np.ndarray] | None, input_names: Sequence[str],
                sinks: Iterable[Any], on_sink_error: Callable[[], None]) -> None:
        for s in sinks:
            try:
                s.write(batch)
            except Exception as exc:  # a broken sink must not stop inference
                on_sink_error()
                log.warning("sink %s failed: %s", type(s).__name__, exc)
        for hook in self.batch:
            try:
                hook(batch)
            except Exception as exc:
                log.warning("component hook failed: %s", exc)
        if inputs is not None:
            for ihook in self.inputs:
                try:
                    ihook(batch, inputs)
                except Exception as exc:
                    log.warning("component input hook failed: %s", exc)
        if self.result:
            results = batch.results()
            if self.wants_inputs and inputs is not None:
                for i, r in enumerate(results):  # own copies: a view would keep the whole batch alive
                    r.inputs = {name: a[i].copy() for name, a in zip(input_names, inputs)}
            for r in results:
                for hook in self.result:
                    try:
                        hook(r)
                    except Exception as exc:
                        log.warning("component hook failed: %s", exc)


def component_health(components: Iterable[Any]) -> dict[str, Any]:
    """``{class name: health()}`` of the components that have one (a second of a class is ``Name#2``)."""
    comps: dict[str, Any] = {}
    for c in components:
        fn = getattr(c, "health", None)
        if callable(fn):
            name = type(c).__name__
            if name in comps:  # two components of one class: number the later ones
                name = f"{name}#{sum(k.split('#')[0] == name for k in comps) + 1}"
            try:
                comps[name] = fn()
            except Exception as exc:
                comps[name] = {"error": str(exc)}
    return comps
