"""An agent that has no model yet (issue 16, items 5 and 6), and what `doctor` says about a config.

* With a broker configured and an empty store, the agent starts, reports
  itself (health "waiting", a state message the collector stores) and waits
  for a rollout to install its first model; it never exits (systemd would
  restart-loop it). Without a broker: one clear line.
* ``Agent.from_config(...)`` wires the config's components, so
  ``agent.feedback(...)`` works with ``[mqtt]`` set.
* ``agent doctor`` / ``agent run --check`` name what is missing: no
  package, a source that cannot be read, a port that is taken.

Real parts only: Mosquitto, the fleet collector and rollout controller on
SQLite, the package served over HTTP, onnxruntime.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import free_port, run_cli
from test_agent import build_mlp_package
from waiting import wait_until

from edgeship.agent import Agent, doctor
from edgeship.agent.config import example_config, load_config
from edgeship.errors import OverloadError, StoreError


def _write_config(tmp_path, *, broker: str | None = None, package=None, pub=None, api_port: int | None = None,
                  source: str | None = None, name: str = "agent.toml"):
    """A config made the way a user makes one: `edgeship agent config --example` with values filled in."""
    if source is None:
        source = str(tmp_path / "in.jsonl")
        (tmp_path / "in.jsonl").touch()  # an empty, readable source: requests come from the API here
    text = example_config(state_dir=str(tmp_path / "state"), broker=broker, port=api_port or free_port(),
                          package=str(package) if package else None, source=source,
                          trusted_keys=[str(pub)] if pub is not None else None)
    # What a first deployment changes besides: fast windows, no download jitter, its key, its device id.
    text = text.replace('device_id = "pi-kitchen-01"', 'device_id = "first-model-dev"')
    text = text.replace("window_s = 60", "window_s = 0.5").replace("jitter_s = 30", "jitter_s = 0")
    text = text.replace("health_window_s = 60", "health_window_s = 1")
    if pub is None and package is not None:  # these tests serve unsigned packages on purpose
        text = text.replace("# allow_unsigned = true", "allow_unsigned = true")
    path = tmp_path / name
    path.write_text(text)
    return path


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_example_config_without_broker_or_package_fails_in_one_line(tmp_path):
    cfg = _write_config(tmp_path)
    proc = run_cli("agent", "run", "--config", str(cfg), check=False, timeout=60)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "no model" in err[0] and "[mqtt] broker" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.mqtt
def test_empty_store_with_broker_waits_then_installs_first_model_from_a_rollout(tmp_path, mosquitto, signing_keys):
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.controller import RolloutController
    from edgeship.fleet.db import FleetDB

    priv, pub = signing_keys
    pkg = build_mlp_package(tmp_path / "pkgs", "2.0.0", seed=1, signing_key=priv)
    port = free_port()
    cfg_path = _write_config(tmp_path, broker=mosquitto.url, pub=pub, api_port=port)
    fleet = load_config(cfg_path).agent.fleet
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    collector = Collector(db, mosquitto.url, fleet, client_id="col-first-model").start()
    agent = Agent.from_config(cfg_path)
    ctl = None
    try:
        agent.start()  # the old code raised StoreError("no model: ...") here
        assert agent.running and agent.model is None
        h = agent.health()
        assert h["status"] == "waiting" and "first model" in h["waiting_for"]
        code, body = _health(port)  # the local API is up and says the same
        assert code == 503 and body["status"] == "waiting"
        with pytest.raises(OverloadError, match="no model yet"):
            agent.submit(np.zeros(64, np.float32))
        # It reports itself: the collector stores the device, online, with no model.
        assert wait_until(lambda: any(d["device"] == "first-model-dev" for d in db.devices(fleet)), 20), "the device's state in the fleet DB"

        ctl = RolloutController(db, mosquitto.url, fleet, signing_key=priv, tick_s=0.3).start()
        ctl.start_rollout(pkg, stages="100", soak_s=0.5, gates=[], salt="first")
        assert wait_until(lambda: agent.model is not None, 60), "the rollout's package to become the first model"
        assert agent.model["version"] == "2.0.0"
        assert agent.health()["status"] == "ok"
        r = agent.infer(np.random.default_rng(0).random(64, dtype=np.float32))
        assert r.model["version"] == "2.0.0" and r.label is not None
        assert _health(port)[0] == 200
    finally:
        if ctl is not None:
            ctl.stop(2)
        agent.stop(2)
        collector.stop(2)
        db.close()


@pytest.mark.mqtt
def test_agent_run_with_broker_and_empty_store_stays_up_and_stops_cleanly(tmp_path, mosquitto):
    """The systemd case: `edgeship agent run` must not exit while it waits for its first model."""
    port = free_port()
    cfg_path = _write_config(tmp_path, broker=mosquitto.url, api_port=port)
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def waiting():
            assert proc.poll() is None, proc.communicate(timeout=5)
            try:
                return _health(port)[1].get("status") == "waiting"
            except OSError:
                return False
        assert wait_until(waiting, 30), "the agent's API to say it is waiting"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "waiting for a rollout" in err


@pytest.mark.mqtt
def test_from_config_wires_feedback_with_mqtt(tmp_path, mosquitto):
    """The README's Python snippet: Agent.from_config(...) then agent.feedback(...) (FeedbackUnavailableError before)."""
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB

    pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0")
    cfg_path = _write_config(tmp_path, broker=mosquitto.url, package=pkg)
    fleet = load_config(cfg_path).agent.fleet
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    collector = Collector(db, mosquitto.url, fleet, client_id="col-from-config").start()
    try:
        with Agent.from_config(cfg_path) as agent:
            result = agent.infer(np.ones(64, np.float32))
            out = agent.feedback(result.prediction_id, "incorrect")
            assert out["msg_id"]
            assert wait_until(lambda: any(f["prediction_id"] == result.prediction_id for f in db.feedback()), 20), "the feedback in the fleet DB"
    finally:
        collector.stop(2)
        db.close()


def test_doctor_and_check_say_what_is_missing(tmp_path, signing_keys):
    # 1. The example as printed: no package, empty store, no broker; the example's source does not exist.
    cfg_path = tmp_path / "example.toml"
    cfg_path.write_text(example_config(state_dir=str(tmp_path / "state")))
    proc = run_cli("agent", "doctor", "--config", str(cfg_path), check=False, timeout=60)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    model = next(line for line in lines if line.split()[1:2] == ["model"])
    assert model.startswith("FAIL") and "no package" in model
    sources = next(line for line in lines if line.split()[1:2] == ["sources"])
    assert sources.startswith("FAIL") and "/run/sensors/imu.jsonl does not exist" in sources
    proc = run_cli("agent", "run", "--config", str(cfg_path), "--check", check=False, timeout=60)
    assert proc.returncode == 1 and "no package" in proc.stdout

    # 2. A port another process holds.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        taken = holder.getsockname()[1]
        pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0")
        (tmp_path / "in.jsonl").write_text("")
        cfg = load_config(_write_config(tmp_path, package=pkg, api_port=taken, source="in.jsonl", name="b.toml"))
        by_name = {c.name: c for c in doctor.serving_checks(cfg)}
        assert by_name["api"].status == "fail" and "port taken" in by_name["api"].detail
        assert by_name["model"].status == "ok" and by_name["sources"].status == "ok"
    finally:
        holder.close()
    assert doctor.check_api_port(cfg).status == "ok"

    # 3. A source that exists but cannot be read, a package path that does not exist.
    unreadable = tmp_path / "secret.jsonl"
    unreadable.write_text("")
    unreadable.chmod(0)
    cfg = load_config(_write_config(tmp_path, package=tmp_path / "gone.edgepkg", source=str(unreadable),
                                    name="c.toml"))
    by_name = {c.name: c for c in doctor.serving_checks(cfg)}
    assert by_name["model"].status == "fail" and "does not exist" in by_name["model"].detail
    if os.geteuid() != 0:  # root reads anything
        assert by_name["sources"].status == "fail" and "not readable" in by_name["sources"].detail

    # 4. A broker and an empty store: not a failure, the agent will wait for a rollout.
    cfg = load_config(_write_config(tmp_path, broker="mqtt://127.0.0.1:1", name="d.toml"))
    assert doctor.check_model(cfg).status == "warn" and "wait for a rollout" in doctor.check_model(cfg).detail


def test_from_config_without_mqtt_still_serves(tmp_path):
    pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0")
    with Agent.from_config(_write_config(tmp_path, package=pkg)) as agent:
        assert agent.infer(np.ones(64, np.float32)).model["version"] == "1.0.0"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="no model"):  # no broker: nothing could install a model
        Agent.from_config(_write_config(empty)).start()
