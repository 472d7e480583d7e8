"""The Raspberry Pi path: wheels exist for aarch64, the systemd unit, the doctor."""
from __future__ import annotations

import configparser
import http.server
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from edgeship.agent import doctor
from edgeship.agent.service import ServiceSpec, install_service, render_unit
from edgeship.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# Every manylinux tag Bookworm's glibc 2.36 accepts: pip download takes --platform literally, and a
# list with gaps hid ai-edge-litert 2.x (manylinux_2_27) and resolved the old 1.4.0 instead.
PI_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]


def _extra(name: str) -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [line.strip() for line in cfg["options.extras_require"][name].splitlines() if line.strip()]


def _core() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]


def _pip_download(tmp_path: Path, reqs: list[str], no_deps: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--disable-pip-version-check", "-q", "-d", str(tmp_path)]
    for p in PI_PLATFORMS:
        args += ["--platform", p]
    if no_deps:
        args.append("--no-deps")
    return subprocess.run(args + reqs, capture_output=True, text=True, timeout=540)


@pytest.mark.network
@pytest.mark.parametrize("extras", [("agent",), ("agent", "tflite")])
def test_agent_dependencies_resolve_for_raspberry_pi(tmp_path, extras):
    # A pure-Python probe first: if even that cannot be fetched there is no
    # registry to ask, so the check is skipped rather than failed.
    probe = _pip_download(tmp_path / "probe", ["click"], no_deps=True)
    if probe.returncode != 0:
        pytest.skip(f"no package registry reachable: {probe.stderr.strip().splitlines()[-1:]}")
    reqs = _core() + [r for e in extras for r in _extra(e)]
    proc = _pip_download(tmp_path / "wheels", reqs)
    assert proc.returncode == 0, f"[{','.join(extras)}] has a dependency without aarch64/cp311 wheels:\n{proc.stderr[-2000:]}"
    names = {p.name.split("-")[0].lower().replace("_", "-") for p in (tmp_path / "wheels").glob("*.whl")}
    assert "onnxruntime" in names and "numpy" in names
    # The device must never pull the workstation stack.
    assert not names & {"torch", "tensorflow", "onnx", "jax", "jaxlib"}, names


def test_agent_extra_is_light():
    heavy = {"torch", "tensorflow", "onnx", "litert-torch", "jax", "ai-edge-quantizer"}
    for extra in ("agent", "tflite"):
        names = {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for r in _extra(extra)}
        assert not names & heavy, (extra, names & heavy)


def test_unit_has_restart_watchdog_and_state_dir(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    text = render_unit(ServiceSpec(config=str(cfg), user="pi", state_dir="/var/lib/edgeship", watchdog_s=20))
    lines = set(text.splitlines())
    for expected in ("Type=notify", "Restart=always", "WatchdogSec=20", "User=pi", "StateDirectory=edgeship",
                     "KillSignal=SIGTERM", "WantedBy=multi-user.target"):
        assert expected in lines, expected
    assert f"--config {cfg}" in text
    assert "[Unit]" in text and "[Service]" in text and "[Install]" in text


def test_unit_outside_var_lib_uses_readwritepaths(tmp_path):
    text = render_unit(ServiceSpec(config="/etc/e.toml", state_dir="/data/edgeship"))
    assert "ReadWritePaths=/data/edgeship" in text.splitlines()
    assert not any(line.startswith("StateDirectory=") for line in text.splitlines())


def test_unit_rejects_relative_state_dir():
    with pytest.raises(ConfigError, match="absolute"):
        render_unit(ServiceSpec(config="/etc/e.toml", state_dir="state"))


def test_install_service_writes_atomically(tmp_path):
    target = tmp_path / "systemd" / "edgeship-agent.service"
    path = install_service(ServiceSpec(config="/etc/edgeship/agent.toml"), path=target)
    assert path == target
    assert target.read_text() == render_unit(ServiceSpec(config="/etc/edgeship/agent.toml"))
    assert not list(target.parent.glob("*.tmp"))


def test_install_service_cli_prints_unit(tmp_path):
    from conftest import run_cli

    out = tmp_path / "unit.service"
    run_cli("agent", "install-service", "--config", "/etc/edgeship/agent.toml", "--user", "pi", "--output", str(out))
    assert "User=pi" in out.read_text().splitlines()


def test_doctor_broker_reachable_and_not(mosquitto):
    ok = doctor.check_broker(mosquitto.url)
    assert ok.status == "ok", ok
    from conftest import free_port

    bad = doctor.check_broker(f"mqtt://127.0.0.1:{free_port()}", timeout=1)
    assert bad.status == "fail" and bad.fix


def test_doctor_trust(signing_keys, tmp_path):
    _, pub = signing_keys
    assert doctor.check_keys([str(pub)]).status == "ok"
    assert doctor.check_keys([]).status == "warn"
    assert doctor.check_keys([str(tmp_path)]).status == "fail"  # a folder with no .pub


def test_clock_skew_is_measured_against_a_real_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        skew = 0.0

        def do_HEAD(self):  # noqa: N802 - http.server API
            self.send_response_only(200)  # send_response would add its own (correct) Date first
            self.send_header("Date", formatdate(time.time() - self.skew, usegmt=True))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert doctor.check_clock(url).status == "ok"
        Handler.skew = 120.0  # the server is 2 minutes behind us: our clock is ahead
        bad = doctor.check_clock(url)
        assert bad.status == "fail" and "+1" in bad.detail
    finally:
        server.shutdown()
        server.server_close()


def test_clock_skew_pure():
    assert doctor.clock_skew_s("Thu, 01 Jan 2026 00:00:00 GMT", 1767225600.0 + 5) == pytest.approx(5)


def test_doctor_table_and_exit_code(tmp_path, mosquitto):
    from conftest import run_cli

    proc = run_cli("agent", "doctor", "--state-dir", str(tmp_path / "state"), "--broker", mosquitto.url, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "onnxruntime" in proc.stdout and "broker" in proc.stdout
    proc = run_cli("agent", "doctor", "--state-dir", str(tmp_path / "state"), "--broker", "mqtt://127.0.0.1:1",
                   check=False)
    assert proc.returncode != 0
    assert "fix:" in proc.stdout
    assert "Traceback" not in proc.stderr
