"""Benchmark for issue 7 (telemetry, feedback, store-and-forward, collector), in one run.

    python benchmarks/outbox.py [--quick]

Starts its own Mosquitto (``/usr/sbin/mosquitto``) on a free loopback port and measures:

1. outbox enqueue: ``Outbox.put`` of feedback-sized (~250 B) and
   telemetry-sized (~2 KB) v1 messages, one durable commit each. Target >= 5,000 msg/s.
2. outbox flush to Mosquitto: N messages already in the outbox, ``Forwarder``
   (rate limit off, 100 in flight) until every PUBACK arrived and the rows are
   deleted. Target >= 1,000 msg/s. Also the default rate limit (200 msg/s) for reference,
   and with end-to-end receipts: a collector (SQLite) stores each message and receipts it,
   and a row is deleted only on its receipt (what receipts cost the outbox).
3. collector ingest into SQLite: (a) ``Collector.process`` on received
   messages (validate + de-duplicate + store, batches of 500); (b) end to end:
   a publisher floods Mosquitto, the collector (persistent session, ack after
   commit) stores; msg/s until the last row is in the DB. Target >= 2,000 msg/s.
4. inference never waits on the network: agent request latency (sensor MLP,
   sequential ``infer``) with no fleet link, with the broker up and with the
   broker down (outbox filling), while telemetry windows close every 0.5 s
   and every 10th prediction gets feedback. Ratio of p99 down/up (target: ~1
   within noise).

Prints each figure with its target and writes ``benchmarks/out/outbox.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
FLEET = "bench"


# ----------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, work: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"persistence_location {work}/\nmax_inflight_messages 100\nmax_queued_messages 1000000\n"
                        + ("user root\n" if os.geteuid() == 0 else "") + "log_type error\n")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def messages(n: int, kind: str, device: str = "dev-1") -> list[tuple[str, bytes]]:
    from edgeship import protocol

    out = []
    t = protocol.device_topic(FLEET, device, kind)
    for i in range(n):
        if kind == "feedback":
            body = {"prediction_id": f"run-{i}", "kind": "incorrect", "model": {"name": "m", "version": "1.0.0"}}
        else:
            body = {"window_s": 60.0, "counts": {"inferences": i, "errors": 0},
                    "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0, "hist": {"counts": {str(j): j for j in range(60)}}},
                    "model": {"name": "m", "version": "1.0.0", "sha256": "ab" * 32}, "classes": {f"c{j}": j for j in range(10)},
                    "pad": "x" * 800}
        out.append((t, protocol.encode(protocol.make_message(kind, device, body))))
    return out


def wait_for(fn, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(step)
    return fn()


# ----------------------------------------------------------------- 1. enqueue

def bench_enqueue(work: Path, n: int) -> dict:
    from edgeship.agent.outbox import Outbox

    res = {}
    for kind in ("feedback", "telemetry"):
        msgs = messages(n, kind)
        with Outbox(work / f"enqueue-{kind}.sqlite", 500_000_000) as ob:
            t0 = time.perf_counter()
            for t, p in msgs:
                ob.put(kind, t, p)
            dt = time.perf_counter() - t0
        res[kind] = {"n": n, "bytes_per_msg": round(sum(len(p) for _, p in msgs) / n), "msg_per_s": round(n / dt)}
        print(f"1. enqueue {kind:9s} ({res[kind]['bytes_per_msg']:5d} B): {n / dt:9.0f} msg/s   "
              f"target >= 5,000  ratio {n / dt / 5000:.1f}x")
    return res


# ----------------------------------------------------------------- 2. flush

def bench_flush(work: Path, broker: Mosquitto, n: int) -> dict:
    from edgeship.agent.outbox import Forwarder, Outbox
    from edgeship.mqtt import MqttLink

    res = {}
    for label, rate, count in (("unlimited", 0, n), ("default 200/s", 200, min(n, 1000))):
        ob = Outbox(work / f"flush-{rate}.sqlite", 500_000_000)
        for t, p in messages(count, "feedback", device=f"flush-{rate}"):
            ob.put("feedback", t, p)
        link = MqttLink(broker.url, client_id=f"bench-flush-{rate}").start()
        assert link.wait_connected(10)
        t0 = time.perf_counter()
        fw = Forwarder(ob, link, rate=rate).start()
        ok = fw.drain(120)
        dt = time.perf_counter() - t0
        fw.stop()
        link.stop()
        ob.close()
        res[label] = {"n": count, "drained": ok, "msg_per_s": round(count / dt)}
        target = "target >= 1,000" if rate == 0 else "(rate limit)   "
        print(f"2. flush {label:14s}: {count / dt:9.0f} msg/s   {target}"
              + (f"  ratio {count / dt / 1000:.1f}x" if rate == 0 else ""))
    res["receipts"] = bench_flush_receipts(work, broker, n)
    return res


def bench_flush_receipts(work: Path, broker: Mosquitto, n: int) -> dict:
    from edgeship.agent.outbox import Forwarder, Outbox
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB
    from edgeship.mqtt import MqttLink

    db = FleetDB.open(work / "flush-receipts-fleet.sqlite")
    col = Collector(db, broker.url, FLEET, client_id="bench-flush-collector").start()
    assert col.wait_ready(10)
    ob = Outbox(work / "flush-receipts.sqlite", 500_000_000)
    ob.set_receipt_mode(True)  # a device that has seen the collector's announcement before
    for t, p in messages(n, "feedback", device="flush-rc"):
        ob.put("feedback", t, p)
    link = MqttLink(broker.url, client_id="bench-flush-rc").start()
    assert link.wait_connected(10)
    t0 = time.perf_counter()
    fw = Forwarder(ob, link, rate=0, fleet=FLEET, device="flush-rc").start()
    ok = fw.drain(120)
    dt = time.perf_counter() - t0
    h = fw.health()
    fw.stop()
    link.stop()
    ob.close()
    col.stop()
    stored = len(db.message_ids("feedback"))
    db.close()
    res = {"n": n, "drained": ok, "stored": stored, "resends": h["resends"], "msg_per_s": round(n / dt)}
    print(f"2. flush with receipts  : {n / dt:9.0f} msg/s   target >= 1,000  ratio {n / dt / 1000:.1f}x  "
          f"(rows deleted on the collector's receipt; {stored}/{n} stored, {h['resends']} resent)")
    return res


# ----------------------------------------------------------------- 3. collector

def bench_collector(work: Path, broker: Mosquitto, n: int) -> dict:
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB
    from edgeship.mqtt import Inbound, MqttLink

    res = {}
    # (a) validate + de-duplicate + store, no network
    db = FleetDB.open(work / "ingest-direct.sqlite")
    col = Collector(db, broker.url, FLEET, client_id="bench-direct")
    half = n // 2
    items = [Inbound(t, p, 1, False, i) for i, (t, p) in enumerate(messages(half, "feedback", "d-a")
                                                                   + messages(n - half, "telemetry", "d-b"))]
    t0 = time.perf_counter()
    for i in range(0, len(items), 500):
        col.process(items[i:i + 500])
    dt = time.perf_counter() - t0
    assert col.stats()["stored"] == n
    db.close()
    res["process"] = {"n": n, "msg_per_s": round(n / dt)}
    print(f"3a. collector validate+store     : {n / dt:9.0f} msg/s   target >= 2,000  ratio {n / dt / 2000:.1f}x")

    # (b) end to end through Mosquitto
    db = FleetDB.open(work / "ingest-e2e.sqlite")
    col = Collector(db, broker.url, FLEET, client_id="bench-e2e").start()
    assert col.wait_ready(10)
    pub = MqttLink(broker.url, client_id="bench-pub", max_inflight=1000, max_queued=0).start()
    assert pub.wait_connected(10)
    msgs = messages(half, "feedback", "d-c") + messages(n - half, "telemetry", "d-d")
    t0 = time.perf_counter()
    handles = [pub.publish(t, p) for t, p in msgs]
    ok = wait_for(lambda: col.stats()["stored"] >= n, 120, 0.02)
    dt = time.perf_counter() - t0
    assert all(h.wait(10) for h in handles[-10:])
    s = col.stats()
    pub.stop()
    col.stop()
    db.close()
    res["end_to_end"] = {"n": n, "complete": ok, "stored": s["stored"], "duplicates": s["duplicates"],
                         "msg_per_s": round(s["stored"] / dt)}
    print(f"3b. collector via Mosquitto e2e  : {s['stored'] / dt:9.0f} msg/s   target >= 2,000  "
          f"ratio {s['stored'] / dt / 2000:.1f}x  ({s['stored']}/{n} stored)")
    return res


# ----------------------------------------------------------------- 4. latency broker up / down

def build_mlp_package(work: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    from edgeship import package

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((10, 64)) / 8).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w2"], ["logits"], transB=1)], "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    save(m, str(work / "mlp.onnx"))
    return package.build(work / "sensor.edgepkg", work / "mlp.onnx", name="sensor", version="1.0.0",
                         labels=[f"c{i}" for i in range(10)], example_input=np.zeros((1, 64), np.float32))


def latency_run(pkg: Path, state: Path, broker: str | None, n: int) -> dict:
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.link import FleetLink
    from edgeship.mqtt import LinkOptions

    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(state), "device_id": "lat", "fleet": FLEET},
                        "batcher": {"max_batch": 8, "max_delay_ms": 0.5}, "runtime": {"threads": 1}})
    agent = Agent(cfg)
    fl = None
    if broker is not None:
        fl = FleetLink(state_dir=state, fleet=FLEET, device="lat", broker=broker, window_s=0.5,
                       link_options=LinkOptions(backoff_base=0.2, backoff_cap=1.0)).attach(agent)
    x = np.random.default_rng(1).standard_normal((n, 64)).astype(np.float32)
    lat = []
    with agent:
        for i in range(200):  # warm-up
            agent.infer(x[i % n])
        for i in range(n):
            t0 = time.perf_counter()
            r = agent.infer(x[i])
            lat.append((time.perf_counter() - t0) * 1000.0)
            if fl is not None and i % 10 == 0:
                agent.feedback(r.prediction_id, "incorrect")
        stats = fl.health() if fl is not None else None
    a = np.asarray(lat)
    out = {"n": n, "p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}
    if stats is not None:
        out["outbox_pending_at_stop"] = stats["outbox"]["pending"]
        out["mqtt_connected"] = stats["mqtt"]["connected"]
    return out


def bench_latency(work: Path, broker: Mosquitto, n: int) -> dict:
    from edgeship import protocol
    from edgeship.mqtt import MqttLink

    # The collectors above announced receipts (retained) and are gone: clear it, as an operator
    # would, or these agents would rightly keep every row waiting for a receipt.
    admin = MqttLink(broker.url, client_id="bench-admin").start()
    assert admin.wait_connected(10) and admin.publish(protocol.collector_topic(FLEET), b"", retain=True).wait(10)
    admin.stop()
    pkg = build_mlp_package(work)
    down_url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: the broker is down for the whole run
    res = {}
    for label, url in (("no fleet link", None), ("broker up", broker.url), ("broker down", down_url)):
        res[label] = latency_run(pkg, work / f"state-{label.replace(' ', '-')}", url, n)
        print(f"4. agent latency, {label:13s}: p50 {res[label]['p50_ms']:.3f} ms  p99 {res[label]['p99_ms']:.3f} ms"
              + (f"  (outbox pending at stop: {res[label].get('outbox_pending_at_stop')})" if url else ""))
    ratio = res["broker down"]["p99_ms"] / res["broker up"]["p99_ms"]
    res["p99_down_over_up"] = round(ratio, 3)
    print(f"4. p99 broker down / broker up: {ratio:.2f}  (target ~1.0 within noise: inference never waits on MQTT)")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = ap.parse_args()
    n = 5000 if args.quick else 20000
    OUT.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-outbox-") as tmp:
        work = Path(tmp)
        broker = Mosquitto(work / "mosquitto")
        try:
            result = {
                "load_avg": load,
                "enqueue": bench_enqueue(work, n),
                "flush": bench_flush(work, broker, n // 2),
                "collector": bench_collector(work, broker, n // 2),
                "latency": bench_latency(work, broker, 1000 if args.quick else 3000),
            }
        finally:
            broker.stop()
    (OUT / "outbox.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT / 'outbox.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
