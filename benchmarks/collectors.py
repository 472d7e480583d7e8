"""One collector vs two on an MQTT shared subscription, in one run.

    python benchmarks/collectors.py [--messages 20000] [--devices 200]

Starts its own Mosquitto on a free loopback port. Two publisher processes
flood telemetry windows from ``--devices`` simulated devices (QoS 1) while
one collector, then two collectors sharing ``$share/bench/...``, validate,
de-duplicate and store them. Measured: messages/s from the first publish to
the last row committed, for the SQLite fleet DB (both collectors write the
same file) and, when a PostgreSQL server can be started here, for
PostgreSQL. The ratio two/one says whether a second collector helps: with
SQLite the single writer lock is the ceiling; with PostgreSQL the collectors
write in parallel. Prints a table and writes ``benchmarks/out/collectors.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the real-broker / PostgreSQL helpers of the test suite


def _publisher(url: str, fleet: str, devices: list[str], count: int, tag: str) -> None:
    from edgeship import protocol
    from edgeship.mqtt import LinkOptions, MqttLink

    link = MqttLink(url, LinkOptions(client_id=f"bench-pub-{tag}", max_inflight=200, max_queued=count + 10))
    link.start()
    if not link.wait_connected(10):
        raise SystemExit("publisher could not connect")
    last = None
    for i in range(count):
        dev = devices[i % len(devices)]
        body = {"counts": {"inferences": 60, "errors": 0, "rejected": 0, "dropped": 0}, "window_s": 60.0,
                "latency_ms": {"p50": 1.2, "p95": 2.5, "p99": 3.1}, "model": {"name": "digits", "version": "1.0.0"}}
        msg = protocol.make_message("telemetry", dev, body, msg_id=f"{tag}-{i}")
        last = link.publish(protocol.topic(fleet, "telemetry", dev), protocol.encode(msg), qos=1)
    if last is not None:
        last.wait(60)
    link.stop(10)


def run_case(broker_url: str, db_url: str, n_collectors: int, messages: int, devices: int, tag: str) -> dict:
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB

    fleet = f"bench{tag}"
    dbs = [FleetDB.open(db_url) for _ in range(n_collectors)]
    collectors = [Collector(dbs[i], broker_url, fleet, share_group="bench" if n_collectors > 1 else None,
                            client_id=f"bench-col-{tag}-{i}").start() for i in range(n_collectors)]
    for c in collectors:
        if not c.wait_ready(10):
            raise SystemExit("collector could not connect")
    time.sleep(0.5)  # subscriptions settle on the broker before the flood starts
    names = [f"dev{i:04d}" for i in range(devices)]
    half = messages // 2
    ctx = mp.get_context("spawn")
    pubs = [ctx.Process(target=_publisher, args=(broker_url, fleet, names[k::2], half, f"{tag}p{k}")) for k in range(2)]
    start = time.perf_counter()
    for p in pubs:
        p.start()
    deadline = time.monotonic() + 300
    stored = 0
    while time.monotonic() < deadline:
        stored = sum(c.stats()["stored"] for c in collectors)
        if stored >= 2 * half:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    for p in pubs:
        p.join(60)
    split = [c.stats()["stored"] for c in collectors]
    for c in collectors:
        c.stop(10)
    rows = dbs[0].message_counts()
    for db in dbs:
        db.close()
    return {"collectors": n_collectors, "messages": 2 * half, "stored": stored, "split": split,
            "rows": sum(rows.values()) if isinstance(rows, dict) else rows,
            "seconds": round(elapsed, 3), "msg_per_s": round(stored / elapsed, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--devices", type=int, default=200)
    args = ap.parse_args()
    from conftest import MosquittoBroker, PostgresCluster  # noqa: E402

    work = Path(tempfile.mkdtemp(prefix="edgeship-bench-"))
    broker = MosquittoBroker(work / "mqtt").start()
    results: dict[str, list[dict]] = {}
    pg = None
    try:
        for n in (1, 2):
            results.setdefault("sqlite", []).append(
                run_case(broker.url, str(work / f"fleet{n}.sqlite"), n, args.messages, args.devices, f"s{n}"))
        try:
            import psycopg  # noqa: F401

            pg = PostgresCluster(work / "pg")
            pg.start()
        except Exception as exc:  # pytest.skip raises an Exception subclass too
            print(f"PostgreSQL: skipped ({type(exc).__name__}: {exc})")
            pg = None
        if pg is not None:
            for n in (1, 2):
                results.setdefault("postgresql", []).append(
                    run_case(broker.url, pg.create_db(f"bench{n}"), n, args.messages, args.devices, f"p{n}"))
    finally:
        if pg is not None:
            pg.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'backend':<11} {'collectors':>10} {'stored':>8} {'seconds':>8} {'msg/s':>9}  split")
    for backend, rows in list(results.items()):
        for r in rows:
            print(f"{backend:<11} {r['collectors']:>10} {r['stored']:>8} {r['seconds']:>8.2f} {r['msg_per_s']:>9.0f}  {r['split']}")
        ratio = rows[1]["msg_per_s"] / rows[0]["msg_per_s"]
        print(f"{backend}: two collectors / one = {ratio:.2f}x")
        results[backend + "_ratio"] = round(ratio, 3)  # type: ignore[assignment]
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "collectors.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
