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


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<ver>/bin.
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, initdb'd in a temp dir.

    initdb refuses to run as root, so as root the server runs as the
    `postgres` system user (created by Debian's package) via runuser.
    """

    def __init__(self, workdir: Path) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL")
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            # pytest's tmp dirs are private to root (0700), so the cluster gets a
            # directory of its own that the postgres user owns and can reach.
            import tempfile

            self.workdir = Path(tempfile.mkdtemp(prefix="edgeship-pg-"))
            os.chmod(self.workdir, 0o755)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            self.data = self.workdir / "data"
            self.prefix = [runuser, "-u", "postgres", "--"]
        self.user = "postgres" if self.prefix else (os.environ.get("USER") or "postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stderr[-1000:]}")

    def start(self) -> "PostgresCluster":
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.workdir / "log"), "-w", "start")
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        if self.prefix:  # our own mkdtemp dir (see __init__), not pytest's
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg: pip install 'edgeship[fleet]'")
    cluster = PostgresCluster(tmp_path_factory.mktemp("pg"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db_url(request, tmp_path):
    """A fresh, empty fleet DB URL on each backend (PostgreSQL skipped where not installed)."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    cluster = request.getfixturevalue("postgres")
    import uuid

    return cluster.create_db(f"fleet_{uuid.uuid4().hex[:12]}")
