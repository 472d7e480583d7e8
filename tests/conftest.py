"""Shared fixtures: real brokers, real keys, small real models.

Nothing here is a mock: the MQTT broker is a real Mosquitto process started
on a free loopback port, models are real ONNX files run by onnxruntime.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 10.0, up: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                if up:
                    return True
        except OSError:
            if not up:
                return True
        time.sleep(0.05)
    return False


class MosquittoBroker:
    """A real Mosquitto on 127.0.0.1:<free port>; can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            # Run as root, Mosquitto drops to user `mosquitto`, which cannot write
            # pytest's 0700 tmp dirs: persistence (sessions across a restart) would
            # silently fail. Keep the current user for these throwaway brokers.
            + ("user root\n" if os.geteuid() == 0 else "") +
            f"persistence_location {self.workdir}/\n"
            "max_inflight_messages 100\n"
            "max_queued_messages 100000\n"
            "log_type error\n"
            "log_dest stderr\n"
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> "MosquittoBroker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_port(self.host, self.port, timeout=10):
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None
        wait_port(self.host, self.port, timeout=5, up=False)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> MosquittoBroker:
    """One Mosquitto for the session (do not stop it; use `mosquitto_private` for that)."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture()
def mosquitto_private(tmp_path) -> MosquittoBroker:
    """A Mosquitto of the test's own, free to stop and restart."""
    broker = MosquittoBroker(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory):
    """(private_key_path, public_key_path) of a fresh Ed25519 key pair."""
    from edgeship import signing

    d = tmp_path_factory.mktemp("keys")
    return signing.keygen(d / "test.key")


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run the real `edgeship` CLI in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "edgeship.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgeship {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
