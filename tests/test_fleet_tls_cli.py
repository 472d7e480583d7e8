"""#17.6: the fleet side takes the broker's CA, client certificate and login like the agent does.

A real Mosquitto with TLS, password file and ACL (the ``secure`` fixture of
test_secure_broker.py), the real ``edgeship fleet collect`` in a subprocess,
and the real collector and rollout controller of :class:`FleetStack`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli
from test_secure_broker import _link, secure  # noqa: F401 - secure is a fixture
from waiting import wait_until

from edgeship import protocol
from edgeship.errors import ConfigError
from edgeship.fleet.db import FleetDB
from edgeship.fleet.stack import FleetStack
from edgeship.mqtt import LinkOptions

pytestmark = pytest.mark.mqtt


def _password_file(tmp_path, secure_):
    p = tmp_path / "fleet-side.password"
    p.write_text(secure_["creds"]["fleet-side"] + "\n")
    p.chmod(0o600)
    return p


def test_fleet_collect_over_tls_with_a_login_stores_a_devices_telemetry(secure, tmp_path):  # noqa: F811
    db_path = tmp_path / "fleet.sqlite"
    FleetDB.open(db_path).close()  # created (and migrated) before the collector and this test read it
    cmd = [sys.executable, "-m", "edgeship.cli", "fleet", "collect", "--broker", secure["url"], "--db", str(db_path),
           "--fleet", "tls", "--client-id", "col-tls", "--quiet", "--mqtt-ca", secure["ca"],
           "--mqtt-username", "fleet-side", "--mqtt-password-file", str(_password_file(tmp_path, secure))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    d1 = _link(secure, "d1")
    db = FleetDB.open(db_path)
    try:
        assert d1.wait_connected(10)

        def sent_and_stored():
            # Until the collector has subscribed the broker drops what d1 sends: send until one is stored.
            msg = protocol.make_message("telemetry", "d1", {"window_s": 1.0, "counts": {"inferences": 5}})
            d1.publish(protocol.device_topic("tls", "d1", "telemetry"), protocol.encode(msg), qos=1).wait(5)
            return bool(db.telemetry(device="d1"))

        assert wait_until(sent_and_stored, 30, step=0.3), "no telemetry stored through the TLS collector"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        d1.stop()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        db.close()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stored"] >= 1


def test_missing_ca_file_is_refused_in_one_line(secure, tmp_path, signing_keys):  # noqa: F811
    for args in (("fleet", "collect", "--broker", secure["url"], "--db", str(tmp_path / "f.sqlite"),
                  "--mqtt-ca", str(tmp_path / "missing-ca.pem"), "--duration", "1"),
                 ("fleet", "rollout", "run", "--broker", secure["url"], "--db", str(tmp_path / "f.sqlite"),
                  "--key", str(signing_keys[0]), "--mqtt-ca", str(tmp_path / "missing-ca.pem"))):
        proc = run_cli(*args, check=False, timeout=60)
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(err) == 1, proc.stderr
        assert err[0] == f"error: MQTT CA file {str(tmp_path / 'missing-ca.pem')!r} does not exist"
    proc = run_cli("fleet", "collect", "--db", str(tmp_path / "f.sqlite"), "--mqtt-ca", secure["ca"],
                   "--duration", "1", check=False, timeout=60)
    assert proc.returncode == 1 and "only with --broker" in proc.stderr


def test_fleet_stack_gives_collector_and_controller_the_login(secure, tmp_path):  # noqa: F811
    opts = LinkOptions.from_files(ca_file=secure["ca"], username="fleet-side",
                                  password_file=str(_password_file(tmp_path, secure)))
    start = time.monotonic()
    with FleetStack(tmp_path / "fleet.sqlite", broker_url=secure["url"], fleet="tls", collect=True,
                    controller="loop", link_options=opts, ready_timeout=15) as stack:
        assert stack.collector.link.wait_connected(5) and stack.controller.link.wait_connected(5)
    assert time.monotonic() - start < 30


def test_link_options_from_files_refuse_what_cannot_work(tmp_path):
    empty = tmp_path / "empty.password"
    empty.write_text("\n")
    cert = tmp_path / "client.pem"
    cert.write_text("x")
    for kwargs, text in (({"username": "u", "password_file": str(empty)}, "is empty"),
                         ({"password_file": str(cert)}, "needs a user name"),
                         ({"cert_file": str(cert)}, "needs both files"),
                         ({"key_file": str(tmp_path / "gone.key")}, "client key file")):
        with pytest.raises(ConfigError, match=text):
            LinkOptions.from_files(**kwargs)
    opts = LinkOptions.from_files(username="u", password_file=str(cert), protocol="5")
    assert (opts.username, opts.password, opts.protocol, opts.ca_file) == ("u", "x", "5", None)
