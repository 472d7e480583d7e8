"""Where results go: JSON lines (stdout or a file) and Python callbacks.

A sink has ``write(batch)`` taking a :class:`~edgeship.agent.results.ResultBatch`
(all rows of one source block in one batch, or one API result) and
``close()``. Sinks are called from the batcher thread, so they must be quick:
the JSON-lines sink formats a whole batch with one template and does one
``write``. The MQTT sink belongs to the telemetry component; it is plugged
in through ``Agent(..., sink_factories={"mqtt": factory})`` where
``factory(sink_config) -> sink``.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Mapping

from ..errors import ConfigError
from .config import SinkConfig
from .results import ResultBatch

__all__ = ["Sink", "JsonLinesSink", "CallbackSink", "make_sink"]


class Sink:
    def write(self, batch: ResultBatch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonLinesSink(Sink):
    """One JSON object per result, to stdout (``path`` None or "-") or appended to a file."""

    def __init__(self, path: str | None = None, outputs: bool = False, flush_every: int = 1) -> None:
        self.path = path
        self.outputs = outputs
        self.flush_every = flush_every
        self._lock = threading.Lock()
        self._batches = 0
        self.lines = 0
        if path in (None, "-"):
            self._f = sys.stdout
            self._own = False
        else:
            try:
                self._f = open(path, "a", buffering=1 << 16, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"[[sinks]] path: cannot open {path} for writing: {exc.strerror or exc}") from exc
            self._own = True

    def write(self, batch: ResultBatch) -> None:
        text = batch.to_json_lines(self.outputs)
        with self._lock:
            self._f.write(text)
            self.lines += batch.n
            self._batches += 1
            if self.flush_every and self._batches % self.flush_every == 0:
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            try:
                self._f.flush()
            finally:
                if self._own:
                    self._f.close()


class CallbackSink(Sink):
    """Calls ``fn(result)`` per sample (``per="result"``) or ``fn(batch)`` per batch (``per="batch"``)."""

    def __init__(self, fn: Callable, per: str = "result") -> None:
        if per not in ("result", "batch"):
            raise ConfigError(f"[[sinks]] per: must be 'result' or 'batch' (got {per!r})")
        self.fn = fn
        self.per = per

    def write(self, batch: ResultBatch) -> None:
        if self.per == "batch":
            self.fn(batch)
        else:
            for r in batch.results():
                self.fn(r)


def make_sink(cfg: SinkConfig, *, callbacks: Mapping[str, Callable] | None = None,
              factories: Mapping[str, Callable] | None = None) -> Sink:
    """Build the sink a ``[[sinks]]`` table describes."""
    if factories and cfg.type in factories:
        return factories[cfg.type](cfg)
    if cfg.type == "stdout":
        return JsonLinesSink(None, cfg.outputs, cfg.flush_every)
    if cfg.type == "jsonl":
        return JsonLinesSink(cfg.path, cfg.outputs, cfg.flush_every)
    if cfg.type == "callback":
        name = cfg.options.get("name", "default")
        fn = (callbacks or {}).get(name)
        if fn is None:
            raise ConfigError(f"[[sinks]] name: no callback named {name!r} was given to Agent(callbacks=...); "
                              "callback sinks only work from the Python API")
        return CallbackSink(fn, cfg.options.get("per", "result"))
    if cfg.type == "mqtt":
        raise ConfigError("[[sinks]] type: 'mqtt' needs the telemetry component (edgeship agent run wires it "
                          "when [mqtt] broker is set)")
    raise ConfigError(f"[[sinks]] type: unknown sink {cfg.type!r}")
