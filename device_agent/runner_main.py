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
from .agent_metrics import fixed_mmap_threshold
from .config import AgentConfig
from .wiring import wire_components

__all__ = ["run_agent", "wire_components"]

log = logging.getLogger("edgeship.agent")


def run_agent(cfg: AgentConfig, *, until_done: bool = False) -> int:
    """Start, serve until SIGTERM/SIGINT (or the end of finite sources with ``until_done``), drain; exit code."""
    fixed_mmap_threshold()  # this process is the agent's own: it may set how its C heap behaves
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
