"""A simulated fleet for the rollout acceptance tests (helpers, not tests).

Real parts only: each device is a real :class:`edgeship.agent.Agent` with its
own state dir, store, SQLite outbox, MQTT connection (FleetLink) and
:class:`RolloutClient`, running a tiny real ONNX model with onnxruntime; all
devices share this one test process. The fleet side is a real Collector and
RolloutController on a real SQLite fleet DB, the broker a real Mosquitto, the
packages served by the controller's own HTTP server. Simulated users send a
steady stream of requests and give feedback whose quality depends on the
model version a result came from.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np

from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.agent.link import FleetLink
from edgeship.agent.rollout_client import RolloutClient


def wait_for(pred, timeout: float, step: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Device:
    def __init__(self, root: Path, device: str, fleet: str, broker: str, package: Path, pub: Path,
                 health_window_s: float = 1.0, jitter_s: float = 0.3, plan_keys: list | None = None) -> None:
        self.device = device
        self.state_dir = root / device
        cfg = parse_config({
            "agent": {"device_id": device, "fleet": fleet, "state_dir": str(self.state_dir), "package": str(package),
                      "trusted_keys": [str(pub)]},
            "runtime": {"threads": 1, "warmup": 1},
            "batcher": {"max_batch": 8, "max_delay_ms": 0.5},
            "mqtt": {"broker": broker, "keepalive": 10},
            "telemetry": {"window_s": 0.5},
            "outbox": {"resend_rate": 1000},
            "rollout": {"health_window_s": health_window_s, "jitter_s": jitter_s},
        })
        self.agent = Agent(cfg)
        self.link = FleetLink.from_config(cfg).attach(self.agent)
        self.client = RolloutClient(self.agent, self.link.link, self.link.outbox, fleet=fleet, device=device,
                                    trusted_keys=[pub], state_dir=self.state_dir, jitter_s=jitter_s,
                                    health_window_s=health_window_s,
                                    poll_s=0.2, rng=random.Random(device), plan_keys=plan_keys)
        self.agent.add_component(self.client)

    def start(self) -> "Device":
        self.agent.start()
        return self

    def stop(self) -> None:
        self.agent.stop(2.0)

    @property
    def version(self) -> str:
        return self.agent.model["version"]

    def activated(self, sha: str) -> bool:
        """Whether this device's store ever made ``sha`` active (state.json history)."""
        return any(e.get("event") == "activate" and e.get("sha256") == sha
                   for e in self.agent.store.state().get("history", []))


class Users(threading.Thread):
    """Steady requests to every device; feedback ``incorrect`` with a per-version probability."""

    def __init__(self, devices: list[Device], bad_rate: dict[str, float], default_bad: float = 0.1,
                 period_s: float = 0.05, feedback_share: float = 0.5, seed: int = 0) -> None:
        super().__init__(name="simulated-users", daemon=True)
        self.devices = devices
        self.bad_rate = bad_rate
        self.default_bad = default_bad
        self.period_s = period_s
        self.feedback_share = feedback_share
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.sent = self.ok = self.failed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        x = np.linspace(-1, 1, 64, dtype=np.float32)
        while not self.stop_event.wait(self.period_s):
            futs = []
            for d in self.devices:
                if not d.agent.running:
                    continue
                try:
                    futs.append((d, d.agent.submit(x, preprocess=False)))
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001 - counted and asserted on by the tests
                    self.failed += 1
                    self.errors.append(f"{d.device}: {exc}")
            for d, f in futs:
                try:
                    r = f.result(5)
                except Exception as exc:  # noqa: BLE001
                    self.failed += 1
                    self.errors.append(f"{d.device}: {exc}")
                    continue
                self.ok += 1
                if self.rng.random() < self.feedback_share:
                    bad = self.rng.random() < self.bad_rate.get(r.model["version"], self.default_bad)
                    try:
                        d.agent.feedback(r.prediction_id, "incorrect" if bad else "correct")
                    except Exception as exc:  # noqa: BLE001 - an agent stopping under us
                        self.errors.append(f"feedback {d.device}: {exc}")

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
