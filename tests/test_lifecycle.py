"""One thread lifecycle (edgeship.lifecycle.Loop), and every long-running component started, stopped and restarted.

The components run against real parts: SQLite outboxes and fleet DBs, the
Mosquitto fixture, real agents serving real ONNX models. After each restart
the component must do its work again (a loop that restarts but exits at once
passes a start/stop check and still does nothing: the feedback input writer
did exactly that).
"""
from __future__ import annotations

import inspect
import json
import logging
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.lifecycle import STOP_TIMEOUT_S, Loop
from edgeship.mqtt import LinkOptions, MqttLink

FAST = LinkOptions(backoff_base=0.05, backoff_cap=0.5)


# -- the base ---------------------------------------------------------------------------------------------------

class _Counter(Loop):
    """Counts its passes, one per ``interval``; pass number ``fail_at`` raises."""

    def __init__(self, interval: float = 60.0, fail_at: int | None = None) -> None:
        super().__init__("test-counter")
        self.interval, self.fail_at, self.passes = interval, fail_at, 0
        self.passed = threading.Event()

    def run(self) -> None:
        while True:
            self.passes += 1
            self.passed.set()
            if self.passes == self.fail_at:
                raise ValueError("a bug in the loop body")
            if self.wait(self.interval):
                return


def test_start_is_idempotent_and_stop_wakes_the_loop_at_once():
    loop = _Counter(interval=60.0)
    assert loop.stop() is True and not loop.alive     # before start: nothing to stop
    assert loop.start() is loop and loop.passed.wait(5)
    first = loop._thread  # noqa: SLF001 - the very thread object
    assert loop.start() is loop and loop._thread is first and loop.passes == 1  # noqa: SLF001 - no second thread
    assert first.name == "test-counter" and first.daemon
    t0 = time.monotonic()
    assert loop.stop(10.0) is True
    assert time.monotonic() - t0 < 1.0  # an Event wait: the 60 s pause ends at the stop, not after it
    assert not loop.alive and not first.is_alive() and loop.stopping
    assert loop.stop() is True                         # twice is fine
    loop.passed.clear()
    loop.start()                                       # the stop flag is cleared: the new thread runs
    assert loop.passed.wait(5) and loop.alive and not loop.stopping and loop.passes == 2
    assert loop.stop() is True


def test_context_manager_and_stop_from_the_loop_itself():
    with _Counter(interval=0.01) as loop:
        assert loop.alive and wait_until(lambda: loop.passes >= 3, 5)
    assert not loop.alive

    class StopsItself(Loop):
        def run(self) -> None:
            self.result = self.stop()  # a thread cannot join itself: stop only asks
            self.wait(5)

    s = StopsItself("test-self-stop").start()
    assert wait_until(lambda: not s.alive, 5) and s.result is False and s.stop() is True


def test_an_error_in_the_loop_body_is_reported_not_silent(caplog):
    loop = _Counter(interval=0.01, fail_at=2)
    with caplog.at_level(logging.ERROR, logger="edgeship.lifecycle"):
        loop.start()
        assert wait_until(lambda: not loop.alive, 5)
    assert loop.error == "ValueError: a bug in the loop body"
    rec = [r for r in caplog.records if r.name == "edgeship.lifecycle"]
    assert len(rec) == 1 and "test-counter" in rec[0].getMessage() and rec[0].exc_info is not None
    loop.start()                                       # a restart clears the error and runs again
    assert loop.error is None and wait_until(lambda: loop.passes >= 3, 5)
    loop.stop()


def test_a_loop_that_does_not_stop_in_time_is_said(caplog):
    release = threading.Event()

    class Stuck(Loop):
        def run(self) -> None:
            release.wait(10)  # ignores the stop flag (e.g. a blocking call)

    s = Stuck("test-stuck").start()
    with caplog.at_level(logging.WARNING, logger="edgeship.lifecycle"):
        assert s.stop(0.05) is False
    assert any("test-stuck did not stop within" in r.getMessage() for r in caplog.records)
    release.set()


# -- every component --------------------------------------------------------------------------------------------

def _named(name: str) -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == name and t.is_alive()}


class Rig:
    """Real parts for the components, built on first use and torn down in reverse order."""

    def __init__(self, tmp_path: Path, broker) -> None:
        self.tmp, self.broker = tmp_path, broker
        self._undo: list = []
        self._outbox = None

    def later(self, fn) -> None:
        self._undo.append(fn)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def outbox(self):
        from edgeship.agent.outbox import Outbox

        if self._outbox is None:
            self._outbox = Outbox(self.tmp / "outbox.sqlite", 10_000_000)
            self.later(self._outbox.close)
        return self._outbox

    def link(self, client_id: str, **kw) -> MqttLink:
        link = MqttLink(self.broker.url, LinkOptions(**{**FAST.__dict__, "client_id": client_id, **kw})).start()
        self.later(link.stop)
        assert link.wait_connected(10)
        return link

    def db(self):
        from edgeship.fleet.db import FleetDB

        db = FleetDB.open(self.tmp / "fleet.sqlite")
        self.later(db.close)
        return db

    def agent(self, pkg: Path):
        from edgeship.agent import Agent
        from edgeship.agent.config import parse_config

        agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(self.tmp / "state"),
                                              "device_id": "pi-life", "fleet": "life"},
                                    "runtime": {"threads": 1}}))
        self.later(agent.stop)
        return agent


# Each case builds one component on the rig and returns (component, thread name, prove): prove() gives a
# predicate that turns true once the running component has done one more piece of its work.

def _telemetry(rig: Rig):
    from edgeship.agent.telemetry import Telemetry

    t = Telemetry(rig.outbox(), "life", "pi-life", window_s=0.05)

    def prove():
        n = t.windows_sent
        return lambda: t.windows_sent > n
    return t, "telemetry", prove


def _state_reporter(rig: Rig):
    from edgeship.agent.telemetry import StateReporter

    ob = rig.outbox()
    s = StateReporter(ob, "life", "pi-life")
    version = iter(range(1, 1000))

    def stored_version():
        # The outbox keeps only the newest unsent state (retained): read which model it names.
        rows = [r for r in ob.peek(0, 100) if r.kind == "state"]
        return rows and (json.loads(rows[-1].payload)["model"] or {}).get("version")

    def prove():
        v = str(next(version))
        # A new model seen on the inference path: the reporter's thread (not the caller) stores the state.
        s.on_result(types.SimpleNamespace(model={"name": "m", "version": v, "sha256": "ab" * 32}))
        return lambda: stored_version() == v
    return s, "state-reporter", prove


def _forwarder(rig: Rig):
    from edgeship.agent.outbox import Forwarder

    ob = rig.outbox()
    f = Forwarder(ob, rig.link("life-fwd"))
    topic = protocol.device_topic("life", "pi-life", "feedback")

    def prove():
        msg = protocol.make_message("feedback", "pi-life", {"prediction_id": "p1", "kind": "correct"})
        ob.put("feedback", topic, protocol.encode(msg))
        return lambda: len(ob) == 0  # deleted only once the broker acknowledged it
    return f, "outbox-forwarder", prove


def _feedback_writer(rig: Rig):
    from edgeship.agent.feedback import FeedbackManager

    inputs = rig.tmp / "inputs"
    fm = FeedbackManager(rig.outbox(), "life", "pi-life", ring_size=100, inputs_dir=inputs, max_input_bytes=10**7)
    ids = iter(range(1000))

    def prove():
        n = len(list(inputs.glob("*.npz")))
        fm.remember(f"p{next(ids)}", label="c1", inputs={"input": np.ones(64, np.float32)})
        return lambda: len(list(inputs.glob("*.npz"))) > n  # the writer thread put it on disk
    return fm, "feedback-inputs", prove


def _adapt(rig: Rig):
    from test_adapt import _package

    from edgeship.agent.adapt import AdaptController

    agent = rig.agent(_package(rig.tmp)).start()
    ctl = AdaptController(agent, budget_ms=1000.0, measure_s=0.05, check_s=0.05, tune=False)
    rig.later(ctl.stop)

    def prove():
        at = ctl.last.get("at", 0.0)
        return lambda: ctl.last.get("at", 0.0) > at  # the check loop judged another window
    return ctl, "edgeship-adapt", prove


def _rollout_client(rig: Rig):
    from test_agent import build_mlp_package

    from edgeship.agent.rollout_client import RolloutClient

    agent = rig.agent(build_mlp_package(rig.tmp / "pkg")).start()
    c = RolloutClient(agent, rig.link("life-dev"), rig.outbox(), fleet="life", device="pi-life", trusted_keys=[],
                      state_dir=rig.tmp / "rollout", poll_s=0.05)
    pub = rig.link("life-plans")
    topic = protocol.rollout_plan_topic("life", "r1")

    def prove():
        n = c.counters["plans_refused"]
        # Sent again at each poll: the (re)subscription may not be in place at the first one.
        return lambda: pub.publish(topic, b"{}") is not None and c.counters["plans_refused"] > n
    return c, "rollout-pi-life", prove


def _collector(rig: Rig):
    from edgeship.fleet.collector import Collector

    col = Collector(rig.db(), rig.broker.url, "life", client_id="life-col", link_options=FAST)
    pub = rig.link("life-pub")
    topic = protocol.device_topic("life", "pi-life", "telemetry")

    def prove():
        assert col.wait_ready(10)
        n = col.stats()["stored"]
        msg = protocol.make_message("telemetry", "pi-life", {"window_s": 60.0, "counts": {"inferences": 1}})
        assert pub.publish(topic, protocol.encode(msg)).wait(10)
        return lambda: col.stats()["stored"] > n
    return col, "collector-life", prove


def _controller(rig: Rig):
    from edgeship.fleet.controller import RolloutController

    ctl = RolloutController(rig.db(), rig.broker.url, "life", tick_s=0.05, client_id="life-ctl")

    def prove():
        n = ctl.ticks
        return lambda: ctl.ticks > n
    return ctl, "rollout-controller-life", prove


def _demo_user(rig: Rig):
    from test_agent import build_mlp_package

    from edgeship.agent.link import FleetLink
    from edgeship.demo import DigitsStream, SimulatedUser

    agent = rig.agent(build_mlp_package(rig.tmp / "pkg"))
    FleetLink(state_dir=rig.tmp / "link", fleet="life", device="pi-life", ring_size=1000).attach(agent)
    user = SimulatedUser(agent, share=1.0)
    agent.start()
    rng = np.random.default_rng(0)
    agent.add_source(DigitsStream("digits", rng.standard_normal((20, 64)).astype(np.float32),
                                  rng.integers(0, 10, 20), rate_hz=100))
    agent.add_component(user)  # sees every batch from here on; the test starts and stops it
    user.stop()

    def prove():
        n = sum(user.sent.values()) + user.failed
        return lambda: sum(user.sent.values()) + user.failed > n  # its thread sent one more verdict
    return user, "demo-user", prove


CASES = {"telemetry": _telemetry, "state_reporter": _state_reporter, "forwarder": _forwarder,
         "feedback_writer": _feedback_writer, "adapt": _adapt, "rollout_client": _rollout_client,
         "collector": _collector, "controller": _controller, "demo_user": _demo_user}


@pytest.mark.mqtt
@pytest.mark.parametrize("case", list(CASES))
def test_every_component_starts_stops_and_restarts(case, tmp_path, mosquitto):
    rig = Rig(tmp_path, mosquitto)
    try:
        comp, name, prove = CASES[case](rig)
        before = _named(name)
        comp.start()
        mine = _named(name) - before
        assert len(mine) == 1, f"{case}: one thread named {name!r}"
        assert wait_until(prove(), 15), f"{case}: no work done after start"
        comp.start()                                   # idempotent: no second thread
        assert _named(name) - before == mine
        comp.stop()
        assert not (_named(name) - before), f"{case}: thread still running after stop"
        comp.stop()                                    # twice is fine
        comp.start()                                   # restart
        again = _named(name) - before
        assert len(again) == 1 and again != mine, f"{case}: no thread running after the restart"
        # The restarted thread keeps running (the old feedback writer's ended at once: its stop flag stayed set).
        assert not wait_until(lambda: not (_named(name) - before), 0.3), f"{case}: restarted thread ended"
        assert wait_until(prove(), 15), f"{case}: no work done after the restart"
        comp.stop()
        assert not (_named(name) - before)
    finally:
        rig.close()


def test_every_component_has_the_one_stop_default():
    from edgeship.agent.adapt import AdaptController
    from edgeship.agent.feedback import FeedbackManager, _InputWriter
    from edgeship.agent.outbox import Forwarder
    from edgeship.agent.rollout_client import RolloutClient
    from edgeship.agent.telemetry import StateReporter, Telemetry
    from edgeship.demo import SimulatedUser
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.controller import RolloutController

    loops = [Telemetry, StateReporter, Forwarder, _InputWriter, AdaptController, RolloutClient, Collector,
             RolloutController, SimulatedUser]
    assert all(issubclass(c, Loop) for c in loops)
    for c in [*loops, FeedbackManager]:
        assert inspect.signature(c.stop).parameters["timeout"].default == STOP_TIMEOUT_S, c.__name__
