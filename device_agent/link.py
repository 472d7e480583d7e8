"""Agent-side glue: outbox + MQTT link + forwarder + state + telemetry + feedback, from config.

:class:`FleetLink` is one agent component (``start``/``stop``/``on_result``/
``health``) built by the entry point from an :class:`AgentConfig` and passed to
the agent; none of its parts is a module global. The inference path only
touches in-memory aggregation (``on_result``); everything that goes to the
network is written to the outbox by the telemetry / state / feedback code and
sent by the forwarder thread, so a dead broker never slows inference.

Without ``[mqtt] broker`` the outbox still fills (bounded) and nothing is
sent: configuring a broker later delivers what was kept. With a collector
that announces end-to-end receipts, a row leaves the outbox only on the
collector's receipt (``[outbox] receipt_timeout_s``; see
:mod:`edgeship.agent.outbox`), so a broker that forgets loses nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from .._version import __version__
from ..mqtt import LinkOptions, MqttLink
from .disk import disk_state
from .feedback import FeedbackManager
from .outbox import Forwarder, Outbox
from .telemetry import StateReporter, Telemetry

__all__ = ["FleetLink"]

log = logging.getLogger("edgeship.agent.link")


class FleetLink:
    """Everything the agent sends to the fleet. Build with :meth:`from_config` or by hand."""

    def __init__(self, *, state_dir: str | Path, fleet: str, device: str, broker: str | None = None,
                 link_options: LinkOptions | None = None, outbox_max_bytes: int = 50_000_000,
                 resend_rate: float = 200.0, window_s: float = 60.0, ring_size: int = 10000,
                 keep_inputs: bool = False, max_input_bytes: int = 50_000_000,
                 metrics_snapshot: Callable[[], Mapping[str, Any]] | None = None,
                 model_fn: Callable[[], Mapping | None] | None = None,
                 receipt_timeout_s: float = 30.0) -> None:
        state_dir = Path(state_dir)
        self.fleet, self.device = fleet, device
        self.state_dir = state_dir
        self.outbox = Outbox(state_dir / "outbox.sqlite", outbox_max_bytes)
        self.state = StateReporter(self.outbox, fleet, device, agent_version=__version__, model_fn=model_fn)
        self.telemetry = Telemetry(self.outbox, fleet, device, window_s=window_s, metrics_snapshot=metrics_snapshot)
        self.feedback_manager = FeedbackManager(self.outbox, fleet, device, ring_size=ring_size,
                                                inputs_dir=state_dir / "feedback_inputs" if keep_inputs else None,
                                                max_input_bytes=max_input_bytes)
        self.telemetry.add_fields(lambda: {"disk": self.disk()})
        self.link: MqttLink | None = None
        self.forwarder: Forwarder | None = None
        if broker:
            base = link_options or LinkOptions()
            opts = LinkOptions(**{**base.__dict__, "client_id": base.client_id or f"edgeship-{fleet}-{device}"[:64],
                                  "will_factory": self.state.will})
            self.link = MqttLink(broker, opts)
            self.state.link = self.link
            # With fleet + device the forwarder follows the collector's end-to-end receipts.
            self.forwarder = Forwarder(self.outbox, self.link, rate=resend_rate, fleet=fleet, device=device,
                                       receipt_timeout_s=receipt_timeout_s)
        self._started = False

    @classmethod
    def from_config(cls, config: Any, *, metrics_snapshot: Callable[[], Mapping[str, Any]] | None = None,
                    model_fn: Callable[[], Mapping | None] | None = None) -> "FleetLink":
        a, m = config.agent, config.mqtt
        opts = LinkOptions(username=m.username, password=m.password, ca_file=m.ca_file, cert_file=m.cert_file,
                           key_file=m.key_file, keepalive=int(m.keepalive), protocol=m.protocol)
        return cls(state_dir=a.state_dir, fleet=a.fleet, device=a.device_id, broker=m.broker, link_options=opts,
                   outbox_max_bytes=int(config.outbox.max_bytes), resend_rate=float(config.outbox.resend_rate),
                   window_s=float(config.telemetry.window_s), ring_size=int(config.feedback.ring_size),
                   keep_inputs=bool(config.feedback.keep_inputs),
                   max_input_bytes=int(config.feedback.max_input_bytes),
                   metrics_snapshot=metrics_snapshot, model_fn=model_fn,
                   receipt_timeout_s=float(config.outbox.receipt_timeout_s))

    def attach(self, agent: Any) -> "FleetLink":
        """Plug into an :class:`edgeship.agent.Agent` (before or after ``start()``)."""
        if self.telemetry.metrics_snapshot is None:
            self.telemetry.metrics_snapshot = agent.metrics.snapshot
            self.telemetry._prime()  # noqa: SLF001 - windows count from now
        if self.state.model_fn is None:
            self.state.model_fn = lambda: agent.model
        fm = self.feedback_manager
        if fm.writer is not None:
            fm.input_names = None
            agent.add_component(_InputCapture(fm, agent))
        agent.add_component(self)
        return self

    # ------------------------------------------------------------ component hooks
    def start(self) -> "FleetLink":
        if self._started:
            return self
        self.feedback_manager.start()
        self.telemetry.start()
        self.state.start()
        if self.link is not None:
            self.link.start()
            self.forwarder.start()
        else:
            self.state.put_state(True)  # kept until a broker is configured
        self._started = True
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if not self._started:
            return
        self._started = False
        self.telemetry.stop(timeout)       # stores the last partial window
        self.state.stop(timeout)           # stores online: false
        self.feedback_manager.stop(timeout)
        if self.forwarder is not None:
            # Give what is queued a short chance to go out; what does not stays on disk.
            if self.link is not None and self.link.connected:
                self.forwarder.drain(min(timeout, 2.0))
            self.forwarder.stop(timeout)
        if self.link is not None:
            self.link.stop(timeout)  # flushes first: the last state goes out before DISCONNECT
        self.outbox.close()

    def on_batch(self, batch: Any) -> None:
        # On the batcher thread: in-memory bookkeeping only, never I/O.
        self.telemetry.on_batch(batch)
        self.feedback_manager.on_batch(batch)
        self.state.on_batch(batch)

    def on_result(self, result: Any) -> None:
        self.telemetry.on_result(result)
        self.feedback_manager.on_result(result)
        self.state.on_result(result)

    def send(self, kind: str, body: Mapping[str, Any]) -> dict:
        """Queue one v1 message of ``kind`` (e.g. a rollout report) from this device; returns it."""
        from .. import protocol

        msg = protocol.make_message(kind, self.device, dict(body))
        self.outbox.put(kind, protocol.device_topic(self.fleet, self.device, kind), protocol.encode(msg),
                        retain=protocol.RETAINED.get(kind, False))
        return msg

    def feedback(self, prediction_id: str, kind: str, value: Any = None) -> dict:
        return self.feedback_manager.feedback(prediction_id, kind, value)

    @property
    def disk_error(self) -> str | None:
        """Why the last outbox write failed for lack of space (None once one succeeds); the agent's health reads it."""
        return self.outbox.disk_error

    def disk(self) -> dict[str, Any]:
        return disk_state(self.state_dir, write_error=self.outbox.disk_error,
                          write_failures=self.outbox.disk_full_count)

    def health(self) -> dict[str, Any]:
        return {"disk": self.disk(), "mqtt": self.link.health() if self.link is not None else {"configured": False},
                "outbox": self.outbox.stats() if not self.outbox.closed else {"closed": True},
                "forwarder": self.forwarder.health() if self.forwarder is not None else None}


class _InputCapture:
    """Component wired only with ``[feedback] keep_inputs``: copies each batch's inputs for feedback."""

    def __init__(self, feedback_manager: FeedbackManager, agent: Any) -> None:
        self.fm = feedback_manager
        self.agent = agent

    def start(self) -> None:
        self.fm.start()

    def stop(self, timeout: float = 5.0) -> None:
        return None  # the FleetLink stops the writer after the last batch

    def on_batch_inputs(self, batch: Any, inputs: list) -> None:
        h = self.agent.handle
        if h is not None and self.fm.input_names != h.input_names:
            self.fm.input_names = list(h.input_names)
        self.fm.on_batch_inputs(batch, inputs)
