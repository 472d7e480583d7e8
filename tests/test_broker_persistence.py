"""#17.7 (minimum): the embedded broker says it does not persist; `agent doctor` says the broker must.

The embedded broker (amqtt) does not keep what it accepted; the test below
shows it, so the docs' claim fails here the day that changes.
"""
from __future__ import annotations

import pytest
from conftest import run_cli
from waiting import wait_until

from edgeship.agent import doctor
from edgeship.fleet.embedded_broker import EmbeddedBroker
from edgeship.mqtt import MqttLink

pytestmark = pytest.mark.mqtt


def test_fleet_collect_says_the_embedded_broker_does_not_persist(tmp_path):
    proc = run_cli("fleet", "collect", "--db", str(tmp_path / "f.sqlite"), "--duration", "0.3", timeout=60)
    first = proc.stderr.splitlines()[0]
    assert first.startswith("embedded MQTT broker on mqtt://127.0.0.1:")
    assert "in memory only" in first and "persistence true" in first


def test_the_embedded_broker_does_not_keep_what_it_accepted_for_an_away_subscriber():
    """Seen with amqtt 0.12: a QoS 1 message for a persistent session that is away is acked and dropped."""
    with EmbeddedBroker() as broker:
        def publish() -> None:
            pub = MqttLink(broker.url, client_id="pub-persist").start()
            try:
                assert pub.wait_connected(10) and pub.publish("t/x", b"kept?", qos=1).wait(10)
            finally:
                pub.stop()

        def subscriber() -> MqttLink:
            link = MqttLink(broker.url, client_id="sub-persist", persistent_session=True,
                            subscriptions=(("t/#", 1),)).start()
            assert link.wait_connected(10)
            return link

        def received(link: MqttLink) -> bool:
            got = []
            wait_until(lambda: got.append(link.get(0.1)) or any(m is not None for m in got), 3)
            return any(m is not None and m.payload == b"kept?" for m in got)

        link = subscriber()
        try:
            publish()
            assert received(link), "control: a connected subscriber gets the message"
        finally:
            link.stop()  # away now; a persisting broker would queue for this session
        publish()
        link = subscriber()
        try:
            assert not received(link), "the embedded broker now keeps queued messages: update docs/secure-broker.md"
        finally:
            link.stop()


def test_doctor_says_the_broker_must_persist(mosquitto):
    check = doctor.check_broker(mosquitto.url)
    assert check.status == doctor.OK and "persistence true" in check.detail
