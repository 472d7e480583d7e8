"""`edgeship agent run` as a real process: SIGTERM drains and exits 0, SIGKILL + restart, systemd notify."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_agent import build_mlp_package

from edgeship.agent.store import ModelStore


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("life-pkgs")
    return {"v1": build_mlp_package(d, "1.0.0", seed=0), "v2": build_mlp_package(d, "2.0.0", seed=1)}


def write_config(tmp_path: Path, pkg: Path, rate_hz: float = 400) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
allow_unsigned = true
device_id = "test-dev"
state_dir = "state"
package = "{pkg}"
drain_timeout_s = 3

[batcher]
max_batch = 16
max_delay_ms = 2

[[sources]]
type = "synthetic"
id = "syn"
shape = [64]
rate_hz = {rate_hz}

[[sinks]]
type = "jsonl"
path = "results.jsonl"
""")
    return cfg


def start(cfg: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)  # also closes the pipes


def wait_lines(path: Path, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} result lines in {path} after {timeout} s")


def test_sigterm_drains_and_exits_zero(tmp_path, pkgs):
    cfg = write_config(tmp_path, pkgs["v1"])
    proc = start(cfg)
    try:
        wait_lines(tmp_path / "results.jsonl", 20)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 0, err
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line complete: the sink was flushed and closed
    assert all(r["model"]["version"] == "1.0.0" for r in rows)
    assert "Traceback" not in err


def test_sigkill_mid_run_and_restart_keeps_model_and_state(tmp_path, pkgs):
    cfg = write_config(tmp_path, pkgs["v1"])
    state = tmp_path / "state"
    store = ModelStore(state)
    sha2 = store.install(pkgs["v2"])
    store.activate(sha2)  # as a rollout would have left it: v2 active, config still names v1
    results = tmp_path / "results.jsonl"
    for delay in (0.0, 0.3, None):  # kill during start-up, early, and mid-run
        proc = start(cfg)
        try:
            if delay is None:
                wait_lines(results, (len(results.read_text().splitlines()) if results.exists() else 0) + 30)
            else:
                time.sleep(delay)  # kill at an arbitrary instant, on purpose
        finally:
            kill(proc)
        st = json.loads((state / "state.json").read_text())  # never torn
        assert st["active"] == sha2
        assert not list((state / "store").glob(".tmp-*")) or delay is not None
    after = ModelStore(state)  # sweeps leftovers of an interrupted install
    assert not list((state / "store").glob(".tmp-*"))
    for m in after.installed():
        after.verify(m["sha256"])
    n_before = len(results.read_text().splitlines())
    proc = start(cfg)
    try:
        lines = wait_lines(results, n_before + 10)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 0
    new = [json.loads(line) for line in lines[n_before + 1:]]  # the line cut by SIGKILL may be partial
    assert new and all(r["model"]["version"] == "2.0.0" for r in new)
    assert ModelStore(state).active == sha2


def test_systemd_ready_watchdog_stopping(tmp_path, pkgs):
    cfg = write_config(tmp_path, pkgs["v1"], rate_hz=50)
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    proc = start(cfg, env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000"})
    got: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in got)
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        proc.communicate(timeout=20)
    finally:
        sock.close()
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 0
    assert "STATUS=serving sensor 1.0.0" in next(m for m in got if m.startswith("READY=1"))
