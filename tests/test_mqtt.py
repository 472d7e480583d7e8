"""MqttLink against a real Mosquitto and the embedded amqtt broker; pure backoff schedule."""
from __future__ import annotations

import threading
import time

import pytest

from edgeship.errors import ConfigError
from edgeship.mqtt import MqttLink, Will, backoff_delay, parse_broker_url

pytestmark = pytest.mark.mqtt


# ----------------------------------------------------------------- pure

def test_backoff_grows_exponentially_and_caps():
    seq = [backoff_delay(a, base=0.5, cap=8.0, jitter=0.0) for a in range(8)]
    assert seq == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    # Huge attempt counts neither overflow nor exceed the cap.
    assert backoff_delay(10_000, base=0.5, cap=30.0, jitter=0.0) == 30.0


def test_backoff_jitter_stays_within_bounds():
    assert backoff_delay(3, base=1, cap=100, jitter=0.5, rand=0.0) == 8.0
    assert backoff_delay(3, base=1, cap=100, jitter=0.5, rand=0.999999) == pytest.approx(4.0, rel=1e-5)
    vals = {backoff_delay(2, base=1, cap=100, jitter=0.5) for _ in range(50)}
    assert all(2.0 <= v <= 4.0 for v in vals) and len(vals) > 1
    with pytest.raises(ValueError):
        backoff_delay(-1)


def test_parse_broker_url():
    assert parse_broker_url("mqtt://127.0.0.1:1884") == {"host": "127.0.0.1", "port": 1884, "tls": False,
                                                         "username": None, "password": None}
    u = parse_broker_url("mqtts://bob:s%40cret@broker.local")
    assert (u["port"], u["tls"], u["username"], u["password"]) == (8883, True, "bob", "s@cret")
    with pytest.raises(ConfigError, match="scheme"):
        parse_broker_url("http://x:1")
    with pytest.raises(ConfigError, match="protocol"):
        MqttLink("mqtt://127.0.0.1:1", protocol="4")
    with pytest.raises(ConfigError, match="TLS"):
        MqttLink("mqtt://127.0.0.1:1", cert_file="c.pem").start()


# ----------------------------------------------------------------- real brokers

def _roundtrip(url: str, protocol: str, n: int = 50) -> None:
    sub = MqttLink(url, client_id=f"sub-{protocol}", protocol=protocol, subscriptions=(("t/rt/#", 1),)).start()
    pub = MqttLink(url, client_id=f"pub-{protocol}", protocol=protocol).start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        handles = [pub.publish(f"t/rt/{i}", f"m{i}".encode()) for i in range(n)]
        assert all(h.wait(10) for h in handles), "every QoS1 publish must be acknowledged"
        got = []
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            m = sub.get(0.5)
            if m is not None:
                got.append(m.payload)
        assert got == [f"m{i}".encode() for i in range(n)]  # in order
        h = pub.health()
        assert h["connected"] and h["network_thread_alive"] and h["acked"] >= n and h["last_ack"] is not None
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_roundtrip_mosquitto(mosquitto, protocol):
    _roundtrip(mosquitto.url, protocol)


def test_roundtrip_embedded_amqtt():
    from edgeship.fleet.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        _roundtrip(b.url, "3.1.1", n=20)
    # Stopped cleanly: the port is free again.
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", b.port)) != 0


def test_reconnects_after_broker_restart_and_resubscribes(mosquitto_private):
    url = mosquitto_private.url
    sub = MqttLink(url, client_id="sub-rs", subscriptions=(("t/rs", 1),), backoff_base=0.1, backoff_cap=0.5).start()
    pub = MqttLink(url, client_id="pub-rs", backoff_base=0.1, backoff_cap=0.5).start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        mosquitto_private.stop()
        deadline = time.monotonic() + 10
        while (sub.connected or pub.connected) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pub.connected and not pub.health()["connected"]
        assert pub.health()["network_thread_alive"]
        mosquitto_private.start()
        assert sub.wait_connected(15) and pub.wait_connected(15)
        assert pub.publish("t/rs", b"after").wait(10)
        m = sub.get(10)
        assert m is not None and m.payload == b"after"
        assert pub.health()["connects"] >= 2
    finally:
        pub.stop()
        sub.stop()


def test_last_will_on_abrupt_disconnect(mosquitto):
    watcher = MqttLink(mosquitto.url, client_id="will-watch", subscriptions=(("t/will/#", 1),)).start()
    dev = MqttLink(mosquitto.url, client_id="will-dev", keepalive=5,
                   will=Will("t/will/dev", b"gone", qos=1, retain=False)).start()
    try:
        assert watcher.wait_connected(10) and dev.wait_connected(10)
        # Kill the TCP connection under paho (what a power cut looks like to the broker).
        dev._client.socket().close()  # noqa: SLF001 - simulating a network failure
        m = watcher.get(10)
        assert m is not None and m.topic == "t/will/dev" and m.payload == b"gone"
    finally:
        dev.stop()
        watcher.stop()


def test_clean_stop_sends_no_will(mosquitto):
    watcher = MqttLink(mosquitto.url, client_id="nowill-watch", subscriptions=(("t/nowill/#", 1),)).start()
    dev = MqttLink(mosquitto.url, client_id="nowill-dev", will=Will("t/nowill/dev", b"gone", retain=False)).start()
    assert watcher.wait_connected(10) and dev.wait_connected(10)
    dev.stop()
    probe = MqttLink(mosquitto.url, client_id="nowill-probe").start()
    try:
        assert probe.wait_connected(10)
        assert probe.publish("t/nowill/marker", b"m").wait(10)
        m = watcher.get(10)
        assert m is not None and m.topic == "t/nowill/marker"  # the marker, not a will, came first
    finally:
        probe.stop()
        watcher.stop()


def test_watchdog_restarts_a_dead_network_thread(mosquitto):
    link = MqttLink(mosquitto.url, client_id="wd").start()
    try:
        assert link.wait_connected(10)
        # Replace the network thread by one that has died (what paho #894 looks like from outside).
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        link._stop.set()  # noqa: SLF001 - make the live loop exit first
        link._thread.join(5)  # noqa: SLF001
        link._stop.clear()  # noqa: SLF001
        link._thread = dead  # noqa: SLF001
        h = link.health()  # noticing it restarts it
        assert h["thread_restarts"] == 1
        assert link.wait_connected(10)
        assert link.publish("t/wd", b"x").wait(10)
    finally:
        link.stop()


def test_inbound_queue_is_bounded(mosquitto):
    sub = MqttLink(mosquitto.url, client_id="bounded-sub", inbound_max=5, subscriptions=(("t/bounded", 1),)).start()
    pub = MqttLink(mosquitto.url, client_id="bounded-pub").start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        assert all(h.wait(10) for h in [pub.publish("t/bounded", b"x") for _ in range(20)])
        deadline = time.monotonic() + 10
        while sub.health()["received"] < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        h = sub.health()
        assert h["inbound_queued"] == 5 and h["inbound_dropped"] == 15
    finally:
        pub.stop()
        sub.stop()


def test_username_password(tmp_path):
    import shutil
    import subprocess

    from conftest import MosquittoBroker

    pw = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not shutil.which(pw):
        pytest.skip("mosquitto_passwd not installed")
    b = MosquittoBroker(tmp_path / "auth")
    pwfile = tmp_path / "auth" / "passwd"
    subprocess.run([pw, "-c", "-b", str(pwfile), "dev", "s3cret"], check=True, capture_output=True)
    b.conf.write_text(b.conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {pwfile}"))
    b.start()
    try:
        good = MqttLink(b.url, client_id="auth-good", username="dev", password="s3cret").start()
        bad = MqttLink(b.url, client_id="auth-bad", username="dev", password="wrong", backoff_base=0.1,
                       backoff_cap=0.2).start()
        try:
            assert good.wait_connected(10)
            assert good.publish("t/auth", b"x").wait(10)
            assert not bad.wait_connected(1.5)
            assert "refused" in (bad.health()["last_error"] or "")
        finally:
            good.stop()
            bad.stop()
    finally:
        b.stop()


def _tls_files(d):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgeship test CA")).issuer_name(name("edgeship test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])),
                     ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1)))
        if san is not None:
            b = b.add_extension(san, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (d / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, d / f"{who}.key")
        out[who] = (d / f"{who}.pem", d / f"{who}.key")
    return out


def test_tls_with_ca_and_client_certificate(tmp_path):
    from conftest import MosquittoBroker

    files = _tls_files(tmp_path)
    b = MosquittoBroker(tmp_path / "tls")
    b.conf.write_text(b.conf.read_text() + f"cafile {files['ca']}\ncertfile {files['server'][0]}\n"
                      f"keyfile {files['server'][1]}\nrequire_certificate true\n")
    b.start()
    url = f"mqtts://127.0.0.1:{b.port}"
    try:
        good = MqttLink(url, client_id="tls-good", ca_file=str(files["ca"]), cert_file=str(files["client"][0]),
                        key_file=str(files["client"][1])).start()
        nocert = MqttLink(url, client_id="tls-nocert", ca_file=str(files["ca"]), backoff_base=0.1,
                          backoff_cap=0.2).start()
        try:
            assert good.wait_connected(10)
            assert good.publish("t/tls", b"secret").wait(10)
            assert not nocert.wait_connected(1.5)  # the broker requires a client certificate
            assert nocert.health()["last_error"]
        finally:
            good.stop()
            nocert.stop()
        with pytest.raises(ConfigError, match="TLS files"):
            MqttLink(url, ca_file=str(tmp_path / "missing.pem")).start()
    finally:
        b.stop()


def test_subscriptions_added_while_the_link_subscribes_are_never_lost(mosquitto):
    """A subscription added while the network thread issues the list used to be marked issued unsent.

    Seen in the demo: a device's rollout-plan subscription was lost when the outbox added its
    receipt route at the same moment, and that device never received a plan.
    """
    links = []
    try:
        for i in range(12):
            link = MqttLink(mosquitto.url, client_id=f"race-{i}").start()
            # Several threads add subscriptions while the link connects and subscribes.
            ts = [threading.Thread(target=link.subscribe, args=(f"race/{i}/{k}", 1)) for k in range(6)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(5)
            links.append(link)
        pub = MqttLink(mosquitto.url, client_id="race-pub").start()
        try:
            for i, link in enumerate(links):
                assert link.wait_connected(10), f"race-{i} never subscribed"
            assert pub.wait_connected(10)
            for i in range(len(links)):
                for k in range(6):
                    pub.publish(f"race/{i}/{k}", b"x", qos=1)
            assert pub.flush(10)
        finally:
            pub.stop()
        for i, link in enumerate(links):
            got: set = set()
            deadline = time.monotonic() + 5
            while len(got) < 6 and time.monotonic() < deadline:
                m = link.get(0.1)
                if m is not None:
                    got.add(m.topic)
            assert len(got) == 6, f"race-{i} lost subscriptions: got {sorted(got)}"
    finally:
        for link in links:
            link.stop()


def test_a_publish_accepted_while_disconnected_completes_after_the_connection_comes(tmp_path):
    """paho keeps a QoS 1 message published while disconnected and sends it on connecting, but its
    ``is_published()`` raises "not currently connected" for it forever. The rollout controller
    published a plan right after starting and crashed on that (CI, session 5)."""
    from conftest import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "late")  # port chosen, nothing listening yet
    sub = None
    pub = MqttLink(broker.url, client_id="pub-late", backoff_base=0.05, backoff_cap=0.2).start()
    try:
        h = pub.publish("t/late", b"early", qos=1, retain=True)
        assert not pub.connected and not h.failed()
        assert h.wait(0.3) is False and not h.acked()   # not yet: no broker
        broker.start()
        assert h.wait(15), "the message accepted while disconnected was never acknowledged"
        assert h.acked()
        sub = MqttLink(broker.url, client_id="sub-late", subscriptions=(("t/late", 1),)).start()
        m = sub.get(10)
        assert m is not None and m.payload == b"early"
    finally:
        pub.stop()
        if sub is not None:
            sub.stop()
        broker.stop()
