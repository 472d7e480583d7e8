"""Which optional components a config asks for, attached to an agent before it starts.

The one place that turns ``[mqtt]``, ``[rollout]``, drift and ``[adapt]`` into
components; used by ``edgeship agent run`` (:mod:`.runner_main`) and by
:meth:`Agent.from_config`, so both build the same agent. It never imports the
agent module itself (the agent imports this lazily), which keeps the import
graph free of cycles.
"""
from __future__ import annotations

from typing import Any

__all__ = ["wire_components"]


def wire_components(agent: Any, cfg: Any) -> None:
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
