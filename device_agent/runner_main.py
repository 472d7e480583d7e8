"""What ``edgeship agent run`` does: build the agent and its components, serve until SIGTERM.

:func:`wire_components` is the one place where optional components are
attached to the agent built from a config — the telemetry engineer adds the
MQTT link, outbox, telemetry and feedback components here (when ``[mqtt]
broker`` is set), the rollout engineer the rollout client. Each is plugged
in with ``agent.add_component(obj)`` and, for result sinks, through
``agent.sink_factories[type] = factory`` before ``start()``.
"""
from __future__ import annotations

import gc
import logging

from .agent import Agent
from .config import AgentConfig

__all__ = ["run_agent", "wire_components"]

log = logging.getLogger("edgeship.agent")


def wire_components(agent: Agent, cfg: AgentConfig) -> None:
    """Attach the optional components the config asks for (before ``agent.start()``)."""
    if cfg.mqtt.broker:
        # Outbox + MQTT link + state/telemetry/feedback (issue 7): everything for the fleet goes
        # through outbox.sqlite in the state dir; the network never touches the inference path.
        from .link import FleetLink  # noqa: PLC0415 - only agents with a broker pay for it

        fleet_link = FleetLink.from_config(cfg).attach(agent)
    else:
        fleet_link = None
    if fleet_link is not None and fleet_link.link is not None and cfg.rollout.enabled:
        # Staged rollouts (issue 8): signed plans in over the same link, reports out through the outbox.
        from .rollout_client import RolloutClient  # noqa: PLC0415

        agent.add_component(RolloutClient.from_config(agent, fleet_link, cfg))
    # Drift (issue 10): window statistics of inputs/predictions against the package's reference_stats,
    # sent as the "drift" field of each telemetry window; no raw data leaves the device.
    from .drift import DriftMonitor  # noqa: PLC0415

    monitor = agent.add_component(DriftMonitor(agent))
    if fleet_link is not None:
        fleet_link.telemetry.add_fields(monitor.telemetry_fields)
    if cfg.adapt.latency_budget_ms is not None:
        # Variants under a latency budget (issue 10): measured at start-up, re-checked with hysteresis.
        from .adapt import AdaptController  # noqa: PLC0415

        adapt = agent.add_component(AdaptController(agent))
        if fleet_link is not None:
            fleet_link.telemetry.add_fields(adapt.telemetry_fields)
    return None


def run_agent(cfg: AgentConfig, *, until_done: bool = False) -> int:
    """Start, serve until SIGTERM/SIGINT (or the end of finite sources with ``until_done``), drain; exit code."""
    agent = Agent(cfg)
    wire_components(agent, cfg)
    agent.start()
    # This process only serves from here on: move everything alive after start-up
    # (runtime modules, the loaded model's objects) out of the collector's reach, so a
    # full collection walks only what serving allocates and never pauses a request
    # for tens of milliseconds (full passes over a big heap were the 20 ms deadline tail
    # in benchmarks/agent.py).
    gc.freeze()
    m = agent.model
    if m is None:
        log.info("device %s is up with no model: waiting for a rollout on %s", cfg.agent.device_id, cfg.mqtt.broker)
    else:
        log.info("serving %s %s (%s) on device %s", m["name"], m["version"], m["sha256"][:12], cfg.agent.device_id)
    return agent.run_forever(until_done=until_done)
