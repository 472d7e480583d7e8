"""A flood larger than the collector's inbound queue: nothing lost, nothing stalled."""
from __future__ import annotations

import time

import pytest

from edgeship import protocol
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

pytestmark = pytest.mark.mqtt


def _flood(url: str, fleet: str, n: int) -> None:
    pub = MqttLink(url, LinkOptions(client_id=f"flood-{fleet}", max_inflight=200, max_queued=n + 10)).start()
    assert pub.wait_connected(10)
    last = None
    for i in range(n):
        dev = f"d{i % 20}"
        msg = protocol.make_message("feedback", dev, {"prediction_id": f"p{i}", "kind": "correct"}, msg_id=f"m{i}")
        last = pub.publish(protocol.topic(fleet, "feedback", dev), protocol.encode(msg), qos=1)
    assert last.wait(30)
    pub.stop(5)


def test_flood_beyond_inbound_queue_is_stored_exactly_once(mosquitto, tmp_path):
    # A 16-message inbound queue against a 3,000-message flood: the link must
    # hold the broker back (backpressure) rather than drop unacknowledged
    # messages, which would fill the broker's in-flight window and stall delivery.
    fleet = "flood"
    block_s = 5.0
    n = 3000
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    opts = LinkOptions(inbound_max=16, inbound_block_s=block_s, backoff_base=0.05, backoff_cap=0.5)
    col = Collector(db, mosquitto.url, fleet, client_id=f"col-{fleet}", batch_max=8, link_options=opts).start()
    try:
        assert col.wait_ready(10)
        time.sleep(0.3)  # the subscription reaches the broker before the flood
        _flood(mosquitto.url, fleet, n)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and col.stats()["stored"] < n:
            time.sleep(0.05)
        stats = col.stats()
        assert stats["stored"] == n, stats
        assert db.message_counts().get("feedback") == n
        assert stats["link"]["inbound_dropped"] == 0 and stats["duplicates"] == 0
    finally:
        col.stop(5)
        db.close()
