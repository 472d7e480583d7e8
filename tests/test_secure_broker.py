"""#17.5: per-device broker logins. A real Mosquitto with TLS, password file and ACL as edgeship writes them."""
from __future__ import annotations

import json
import os
import time

import pytest
from conftest import MosquittoBroker
from test_mqtt import _tls_files
from waiting import wait_until

from edgeship import protocol
from edgeship.fleet import broker_auth
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

pytestmark = pytest.mark.mqtt


@pytest.fixture()
def secure(tmp_path):
    files = _tls_files(tmp_path)
    pw, acl = tmp_path / "edgeship.passwd", tmp_path / "edgeship.acl"
    creds = {name: broker_auth.add_credentials(pw, acl, name, role=role)
             for name, role in (("d1", "device"), ("d2", "device"), ("fleet-side", "fleet"))}
    b = MosquittoBroker(tmp_path / "broker")
    conf = broker_auth.mosquitto_conf(port=b.port, bind="127.0.0.1", cafile=str(files["ca"]),
                                      certfile=str(files["server"][0]), keyfile=str(files["server"][1]),
                                      password_file=str(pw), acl_file=str(acl),
                                      persistence_dir=f"{b.workdir}/")
    if os.geteuid() == 0:
        conf += "user root\n"
    b.conf.write_text(conf + "log_type error\nlog_dest stderr\n")
    b.start()
    yield {"broker": b, "url": f"mqtts://127.0.0.1:{b.port}", "ca": str(files["ca"]), "creds": creds,
           "passwd": pw, "acl": acl}
    b.stop()


def _link(s, user, password=None, **kw):
    return MqttLink(s["url"], client_id=f"{user}-{time.monotonic_ns()}", username=user,
                    password=password if password is not None else s["creds"][user], ca_file=s["ca"],
                    backoff_base=0.1, backoff_cap=0.3, **kw).start()


def test_password_hashes_are_mosquittos_own_format(tmp_path):
    h = broker_auth.hash_password("s3cret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and broker_auth.check_password("s3cret", h)
    assert not broker_auth.check_password("wrong", h)
    pw, acl = tmp_path / "p", tmp_path / "a"
    first = broker_auth.add_credentials(pw, acl, "dev-1")
    second = broker_auth.add_credentials(pw, acl, "dev-1")  # re-issued: replaces the old login
    assert first != second and pw.read_text().count("dev-1:") == 1
    assert oct(pw.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Exception, match="not a valid device id"):
        broker_auth.add_credentials(pw, acl, "../etc")


def test_logins_are_checked_by_a_real_mosquitto(secure):
    good = _link(secure, "d1")
    wrong = _link(secure, "d1", password="not-the-password")
    anon = MqttLink(secure["url"], client_id="anon", ca_file=secure["ca"], backoff_base=0.1, backoff_cap=0.3).start()
    try:
        assert good.wait_connected(10)
        assert not wrong.wait_connected(1.5) and not anon.wait_connected(0.5)
    finally:
        for link in (good, wrong, anon):
            link.stop()


def test_a_device_cannot_publish_as_another_or_touch_plans(secure, tmp_path):
    """d2 forges telemetry as d1 and clears a retained plan: the broker drops both; d1's own message is stored."""
    fleet = "sec"
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = Collector(db, secure["url"], fleet, client_id="col-sec",
                    link_options=LinkOptions(username="fleet-side", password=secure["creds"]["fleet-side"],
                                             ca_file=secure["ca"])).start()
    d1, d2 = _link(secure, "d1"), _link(secure, "d2")
    ctl = _link(secure, "fleet-side")
    try:
        assert d1.wait_connected(10) and d2.wait_connected(10) and ctl.wait_connected(10)
        plan_topic = protocol.rollout_plan_topic(fleet, "r1")
        assert ctl.publish(plan_topic, b'{"kept": true}', qos=1, retain=True).wait(10)

        def telemetry(device, n):
            msg = protocol.make_message("telemetry", device, {"window_s": 1.0, "counts": {"inferences": n}})
            return protocol.device_topic(fleet, device, "telemetry"), protocol.encode(msg)

        d2.publish(*telemetry("d1", 900), qos=1)         # forged: d2's login on d1's topic
        d2.publish(plan_topic, b"", qos=1, retain=True)   # the clear-the-plan attack
        assert d1.publish(*telemetry("d1", 7), qos=1).wait(10)
        assert wait_until(lambda: db.telemetry(device="d1"), 20), "d1's own telemetry was not stored"
        time.sleep(0.5)
        assert [r["inferences"] for r in db.telemetry(device="d1")] == [7]
        # The retained plan is still there for a new subscriber.
        got = []
        reader = MqttLink(secure["url"], client_id="reader", username="d1", password=secure["creds"]["d1"],
                          ca_file=secure["ca"], subscriptions=((plan_topic, 1),)).start()
        try:
            assert wait_until(lambda: got.append(reader.get(0.2)) or any(m is not None for m in got), 10), \
                "the retained plan was not delivered"
            msg = next(m for m in got if m is not None)
            assert json.loads(msg.payload) == {"kept": True}
        finally:
            reader.stop()
    finally:
        for link in (d1, d2, ctl):
            link.stop()
        col.stop(2)
        db.close()


def test_cli_issues_logins_and_prints_the_broker_config(tmp_path):
    import subprocess
    import sys

    pw, acl = tmp_path / "edgeship.passwd", tmp_path / "edgeship.acl"
    run = [sys.executable, "-m", "edgeship.cli", "fleet", "device"]
    out = subprocess.run(run + ["add", "kitchen-01", "--passwd-file", str(pw), "--acl-file", str(acl)],
                         capture_output=True, text=True, check=True).stdout
    password = out.split("password ", 1)[1].split()[0]
    user, _, hashed = pw.read_text().strip().partition(":")
    assert user == "kitchen-01" and broker_auth.check_password(password, hashed) and password not in pw.read_text()
    subprocess.run(run + ["add", "fleet-side", "--role", "fleet", "--passwd-file", str(pw), "--acl-file", str(acl)],
                   capture_output=True, text=True, check=True)
    assert "user fleet-side" in acl.read_text() and "pattern write edgeship/v1/+/devices/%u/#" in acl.read_text()
    bad = subprocess.run(run + ["add", "../etc", "--passwd-file", str(pw), "--acl-file", str(acl)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    conf = subprocess.run(run + ["broker-config", "--passwd-file", str(pw), "--acl-file", str(acl), "--cafile", "ca",
                                 "--certfile", "c", "--keyfile", "k"], capture_output=True, text=True, check=True).stdout
    assert "allow_anonymous false" in conf and "persistence true" in conf and f"acl_file {acl}" in conf
