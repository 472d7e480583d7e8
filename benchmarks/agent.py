"""Benchmark for issues 6 and 19 (device agent): the agent against hand-written loops, in one run.

    python benchmarks/agent.py [--quick] [--only digits|real] [--reps 3]

Builds two packages here with ``onnx.helper`` (random He-initialised
weights: throughput does not depend on what the weights learnt):

* sensor MLP 64 -> 64 -> 10 (~5k parameters), no preprocess;
* digits CNN with the layout of ``examples/digits/model.py::Teacher``
  (conv 64, 128, 256 with two max-pools, 1024 -> 256 -> 10; ~0.63M
  parameters; ~0.3 ms per image at batch 1 on 2 cores, the calibration
  the issue quotes),
  preprocess ``examples/digits/model.py::PREPROCESS`` (8x8 "L" images, x/16).

and measures, printing every figure with its target:

1. sensor stream: a JSON-lines file of 64-feature rows; a hand-written
   per-line loop (``json.loads``, ``session.run``, ``json.dumps`` a result
   line) vs the agent (jsonl source -> batcher ``max_batch=64`` -> jsonl sink)
   writing the same fields, with the source parsing in a child process
   (``reader = "process"``, the headline) and in the agent's own process
   (the default). Target >= 5x.
2. image folder: 8x8 digit PNGs; hand-written loop (PIL decode, x/16,
   ``session.run``, write) vs the agent (folder source, 2 prefetch workers,
   ``max_batch=32``). Target >= 1.3x.
3. request API (digits CNN, ``preprocess=False`` so both sides run the same
   tensor): raw ``session.run`` p50 at batch 1 vs ``agent.submit`` with
   ``max_batch=1`` from 4 threads: per-request overhead = wall time per
   request - raw p50, target <= 15 % of raw p50; request latency p99 <= 2x p50.
   Also one thread at a time (pure latency overhead).
4. max requests/s (sensor MLP) through ``submit`` (4 threads, 64 in flight
   each) and through ``POST /v1/infer`` (4 keep-alive connections).
5. deadline 20 ms at 50 % of the maximum sustainable rate (digits CNN,
   open-loop Poisson arrivals, latency from the scheduled arrival): >= 99 % met.
6. ``edgeship agent run`` as a process with the digits CNN: time from spawn
   to the first result line (<= 1.5 s) and RSS while serving (<= 120 MB).

7. real-size workloads (issue 19; ``--only real`` runs just these), the agent
   with the DEFAULT config, ratios from ``--reps`` interleaved repetitions:
   a MobileNetV3-style 224x224 CNN (benchmarks/real_models.py) over 300 JPEG
   photo crops: hand loop (read, resize, ``session.run``, write a line) vs a
   2-thread decode prefetch loop vs the agent (>= 1.3x and >= the pool loop);
   ``edgeship agent run --until-done`` vs the raw script as processes: spawn
   -> first result (<= 1.5x) and peak RSS (VmHWM, <= raw + 40 MB); a 640x480
   camera at 30 fps (FakeCapture behind CameraSource) with a 100 ms deadline
   while a busy process holds one core (>= 99 % met); a 1-D audio CNN over a
   WAV file in 1 s windows (a WAV source behind the Source interface).

Writes ``benchmarks/out/agent.json`` (``agent_<only>.json`` with ``--only``) and ``benchmarks/out/agent.png``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

LABELS = [str(i) for i in range(10)]
DIGITS_PREPROCESS = {"scale": 1.0 / 16.0, "mean": [0.0], "std": [1.0], "layout": "NCHW", "resize": [8, 8],
                     "color": "L", "dtype": "float32"}


# -- models -------------------------------------------------------------------------------

def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_mlp(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, b1 = _he(rng, (64, 64), 64), np.zeros(64, np.float32)
    w2, b2 = _he(rng, (10, 64), 64), np.zeros(10, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))]
    nodes = [helper.make_node("Gemm", ["input", "W1", "B1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W2", "B2"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "sensor_mlp",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=inits)
    return _save(g, path)


def build_cnn(path: Path) -> Path:
    """The digits CNN in the layout of examples/digits/model.py::Teacher (~0.63M parameters)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    t = {"C1": _he(rng, (64, 1, 3, 3), 9), "c1": np.zeros(64, np.float32),
         "C2": _he(rng, (128, 64, 3, 3), 576), "c2": np.zeros(128, np.float32),
         "C3": _he(rng, (256, 128, 3, 3), 1152), "c3": np.zeros(256, np.float32),
         "W1": _he(rng, (256, 1024), 1024), "b1": np.zeros(256, np.float32),
         "W2": _he(rng, (10, 256), 256), "b2": np.zeros(10, np.float32),
         "shape": np.array([-1, 1024], np.int64)}
    inits = [numpy_helper.from_array(a, n) for n, a in t.items()]
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["input", "C1", "c1"], ["a1"], pads=pads),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "C2", "c2"], ["a2"], pads=pads),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p2", "C3", "c3"], ["a3"], pads=pads),
             helper.make_node("Relu", ["a3"], ["r3"]),
             helper.make_node("MaxPool", ["r3"], ["p3"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p3", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "W2", "b2"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "digits_cnn",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=inits)
    return _save(g, path)


def build_packages(work: Path) -> dict:
    from edgeship import package

    mlp = package.build(work / "sensor.edgepkg", build_mlp(work / "mlp.onnx"), name="sensor", version="1.0.0",
                        labels=LABELS, example_input=np.zeros((1, 64), np.float32))
    cnn = package.build(work / "digits.edgepkg", build_cnn(work / "cnn.onnx"), name="digits", version="1.0.0",
                        labels=LABELS, preprocess=DIGITS_PREPROCESS, example_input=np.zeros((1, 1, 8, 8), np.float32))
    return {"mlp": mlp, "cnn": cnn, "mlp_onnx": work / "mlp.onnx", "cnn_onnx": work / "cnn.onnx"}


def session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def agent_for(pkg, state: Path, threads: int, **sections):
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config

    data = {"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(state), "device_id": "bench"},
            "runtime": {"threads": threads} if threads else {}}
    data.update(sections)
    return Agent(parse_config(data))


def wait_for(fn, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.002)
    return False


# -- 1. sensor stream --------------------------------------------------------------------------

def bench_sensor(pk, work: Path, n: int, threads: int) -> dict:
    from edgeship.agent.procsource import ProcessSource
    from edgeship.agent.sources import JsonLinesSource

    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    src = work / "sensor.jsonl"
    with open(src, "w") as f:
        for row in x:
            f.write("[" + ",".join(f"{v:.3f}" for v in row) + "]\n")
    # hand-written loop: read one line, parse, run, write one result line
    sess = session(pk["mlp_onnx"], threads)
    out_hand = work / "hand_sensor.jsonl"
    model = {"name": "sensor", "version": "1.0.0"}
    t0 = time.perf_counter()
    with open(src) as fin, open(out_hand, "w") as fout:
        for i, line in enumerate(fin):
            t_in = time.perf_counter()
            xi = np.asarray(json.loads(line), dtype=np.float32)[None]
            y = sess.run(None, {"input": xi})[0][0]
            k = int(y.argmax())
            score = float(1.0 / np.exp(y - y[k]).sum())
            fout.write(json.dumps({"prediction_id": f"h-{i}", "source": "imu", "ts": time.time(), "label": LABELS[k],
                                   "score": round(score, 5), "latency_ms": (time.perf_counter() - t_in) * 1000,
                                   "model": model}) + "\n")
    hand_s = time.perf_counter() - t0
    lines_hand = sum(1 for _ in open(out_hand))
    res = {"samples": n, "hand_per_s": n / hand_s, "target": 5.0}
    # The same config but for [[sources]] reader: parsing in the agent's process (default) or in a
    # child process (reader = "process"; the time includes starting that process).
    for reader in ("thread", "process"):
        out_agent = work / f"agent_sensor_{reader}.jsonl"
        agent = agent_for(pk["mlp"], work / f"st-sensor-{reader}", threads,
                          batcher={"max_batch": 64, "max_delay_ms": 2},
                          sinks=[{"type": "jsonl", "path": str(out_agent), "flush_every": 0}])
        with agent:
            source = (JsonLinesSource("imu", path=str(src)) if reader == "thread" else
                      ProcessSource("jsonl", "imu", {"path": str(src)}, block_size=256))
            t0 = time.perf_counter()
            agent.add_source(source, block_size=256, read_ahead=4096)
            # The sustained rate, from the first result on: a stream runs for hours and its
            # source starts once (for reader=process that start, ~0.25 s here, is a new
            # Python process; reported apart as first_result_s).
            assert wait_for(lambda agent=agent: agent.metrics.counters["inferences"] > 0, 60)
            t_first = time.perf_counter()
            done_first = agent.metrics.counters["inferences"]
            assert agent.wait_idle(300)
            t_end = time.perf_counter()
            batch_p50 = agent.metrics.batch_size.percentile(50)
            rejected = agent.metrics.counters["rejected"]
        lines_agent = sum(1 for _ in open(out_agent))
        assert lines_agent == lines_hand == n and rejected == 0, (reader, lines_agent, lines_hand, rejected)
        rate = (n - done_first) / (t_end - t_first)
        res[reader] = {"agent_per_s": rate, "ratio": rate / res["hand_per_s"], "agent_batch_p50": batch_p50,
                       "first_result_s": t_first - t0, "whole_run_per_s": n / (t_end - t0)}
    res["ratio"] = res["process"]["ratio"]
    res["agent_per_s"] = res["process"]["agent_per_s"]
    return res


# -- 2. image folder --------------------------------------------------------------------------------

def bench_images(pk, work: Path, n: int, threads: int) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    from edgeship.agent.sources import FolderSource

    imgs = load_digits().images.astype(np.uint8)  # 0..16, 8x8
    folder = work / "digits_png"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(imgs[i % len(imgs)]).save(folder / f"img{i:05d}.png")
    files = sorted(folder.glob("*.png"))
    sess = session(pk["cnn_onnx"], threads)
    out_hand = work / "hand_images.jsonl"
    model = {"name": "digits", "version": "1.0.0"}
    t0 = time.perf_counter()
    with open(out_hand, "w") as fout:
        for i, path in enumerate(files):
            t_in = time.perf_counter()
            with Image.open(path) as im:
                a = np.asarray(im.convert("L"), dtype=np.float32)
            xi = (a * (1.0 / 16.0)).reshape(1, 1, 8, 8)
            y = sess.run(None, {"input": xi})[0][0]
            k = int(y.argmax())
            score = float(1.0 / np.exp(y - y[k]).sum())
            fout.write(json.dumps({"prediction_id": f"h-{i}", "source": "cam", "ts": time.time(), "label": LABELS[k],
                                   "score": round(score, 5), "latency_ms": (time.perf_counter() - t_in) * 1000,
                                   "model": model, "ref": path.name}) + "\n")
    hand_s = time.perf_counter() - t0
    out_agent = work / "agent_images.jsonl"
    workers = 2
    agent = agent_for(pk["cnn"], work / "st-img", threads, batcher={"max_batch": 32, "max_delay_ms": 2},
                      sinks=[{"type": "jsonl", "path": str(out_agent), "flush_every": 0}])
    with agent:
        t0 = time.perf_counter()
        agent.add_source(FolderSource("cam", path=str(folder)), block_size=16, read_ahead=512, workers=workers)
        assert agent.wait_idle(300)
        agent_s = time.perf_counter() - t0
        batch_p50 = agent.metrics.batch_size.percentile(50)
    lines = sum(1 for _ in open(out_agent))
    assert lines == n, lines
    return {"images": n, "hand_per_s": n / hand_s, "agent_per_s": n / agent_s, "ratio": hand_s / agent_s,
            "prefetch_workers": workers, "agent_batch_p50": batch_p50, "target": 1.3}


# -- 3. request overhead -------------------------------------------------------------------------------

def bench_requests(pk, work: Path, n: int, threads: int) -> dict:
    from edgeship.metrics import Histogram

    x = (np.random.default_rng(3).integers(0, 17, (1, 1, 8, 8)) / 16.0).astype(np.float32)
    sess = session(pk["cnn_onnx"], threads)
    for _ in range(50):
        sess.run(None, {"input": x})
    raw = Histogram()
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        raw.add((time.perf_counter() - t) * 1000)
    raw_p50 = raw.percentile(50)
    out = {"raw_p50_ms": raw_p50, "raw_p99_ms": raw.percentile(99)}
    sample = x[0]
    per_thread = n // 4

    def four_clients(agent, count: int = per_thread) -> tuple[float, Histogram]:
        lat = Histogram()
        lock = threading.Lock()

        def client():
            mine = []
            for _ in range(count):
                t = time.perf_counter()
                agent.submit(sample, preprocess=False).result(10)
                mine.append((time.perf_counter() - t) * 1000)
            with lock:
                lat.add_many(mine)

        ts = [threading.Thread(target=client) for _ in range(4)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return (time.perf_counter() - t0) * 1000 / (count * 4), lat

    def warm(agent) -> None:
        # Warm the pattern that is measured, as the raw loop is warmed above: the
        # first concurrent round meets new batch sizes and cold threads.
        for _ in range(50):
            agent.infer(sample, preprocess=False)
        four_clients(agent, max(50, per_thread // 4))

    agent = agent_for(pk["cnn"], work / "st-req", threads, batcher={"max_batch": 1, "max_delay_ms": 0})
    with agent:
        sample = x[0]
        for _ in range(50):
            agent.infer(sample, preprocess=False)
        # one request at a time: pure latency overhead
        one = Histogram()
        for _ in range(n):
            t = time.perf_counter()
            agent.infer(sample, preprocess=False)
            one.add((time.perf_counter() - t) * 1000)
        out["seq_p50_ms"] = one.percentile(50)
        out["seq_overhead_ms"] = one.percentile(50) - raw_p50
        warm(agent)
        per_req_b1, _ = four_clients(agent)  # max_batch=1: every request is its own model call
    # Single-sample requests from 4 threads, batched by concurrency only (max_delay 0: never waits).
    agent = agent_for(pk["cnn"], work / "st-req4", threads, batcher={"max_batch": 32, "max_delay_ms": 0})
    with agent:
        warm(agent)
        per_req_ms, lat = four_clients(agent)
        mean_batch = agent.metrics.batch_size.mean
    out.update({"client_threads": 4, "per_request_ms": per_req_ms, "mean_batch": mean_batch,
                "overhead_ms": per_req_ms - raw_p50, "overhead_pct_of_raw_p50": 100 * (per_req_ms - raw_p50) / raw_p50,
                "per_request_ms_max_batch_1": per_req_b1,
                "req_p50_ms": lat.percentile(50), "req_p99_ms": lat.percentile(99),
                "p99_over_p50": lat.percentile(99) / lat.percentile(50), "target_overhead_pct": 15,
                "target_p99_over_p50": 2.0})
    return out


# -- 4. max request rate -----------------------------------------------------------------------------

def max_submit_rate(pkg, state: Path, threads: int, seconds: float, x, batcher: dict, window: int = 64) -> float:
    agent = agent_for(pkg, state, threads, batcher=batcher)
    done = [0] * 4
    stop = threading.Event()

    def client(i):
        pending = []
        while not stop.is_set():
            while len(pending) < window:
                try:
                    pending.append(agent.submit(x, preprocess=False))
                except Exception:  # an overload refusal under the block policy: back off by collecting
                    break
            f = pending.pop(0)
            f.result(10)
            done[i] += 1
        for f in pending:
            f.result(10)

    with agent:
        return _clients_rate(client, [(i,) for i in range(4)], done, stop, seconds)


def _clients_rate(client, args: list[tuple], done: list[int], stop: threading.Event, seconds: float) -> float:
    """Run one ``client`` thread per ``args``; completions per second over a window after a 0.2 s ramp-up."""
    ts = [threading.Thread(target=client, args=a) for a in args]
    for t in ts:
        t.start()
    time.sleep(0.2)  # ramp-up, then the measured window
    a = sum(done)
    t0 = time.perf_counter()
    time.sleep(seconds)
    rate = (sum(done) - a) / (time.perf_counter() - t0)
    stop.set()
    for t in ts:
        t.join(30)
    return rate


def max_http_rate(pkg, state: Path, threads: int, seconds: float, x) -> dict:
    agent = agent_for(pkg, state, threads, batcher={"max_batch": 32, "max_delay_ms": 0.5},
                      api={"enabled": True, "port": 0})
    body = json.dumps({"x": x.tolist(), "preprocess": False}).encode()
    done = [0] * 4
    errors = [0]
    stop = threading.Event()

    def client(i, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            conn.request("POST", "/v1/infer?outputs=0", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors[0] += 1
            done[i] += 1
        conn.close()

    with agent:
        rate = _clients_rate(client, [(i, agent.api.port) for i in range(4)], done, stop, seconds)
    return {"rate": rate, "errors": errors[0], "connections": 4}


# -- 5. deadlines --------------------------------------------------------------------------------

def bench_deadline(pk, work: Path, threads: int, seconds: float) -> dict:
    x = (np.random.default_rng(4).integers(0, 17, (1, 8, 8)) / 16.0).astype(np.float32).reshape(1, 8, 8)
    batcher = {"max_batch": 32, "max_delay_ms": 0.5}
    max_rate = max_submit_rate(pk["cnn"], work / "st-dl-max", threads, seconds, x, batcher)
    rate = 0.5 * max_rate
    agent = agent_for(pk["cnn"], work / "st-dl", threads, batcher=batcher)
    n = int(rate * seconds * 2)
    rng = np.random.default_rng(5)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    lat = np.full(n, np.nan)
    all_done = threading.Event()
    left_n = [n]
    lock = threading.Lock()
    with agent:
        t0 = time.perf_counter()
        # Like an app, the client keeps no reference to answered requests (holding
        # every future would grow the heap and make the garbage collector's full
        # passes, not the agent, the source of the tail).
        for i, a in enumerate(arrivals):
            due = t0 + a
            left = due - time.perf_counter()
            if left > 0:  # open loop: arrivals follow the schedule, not the answers (no busy spin)
                time.sleep(left)
            f = agent.submit(x, deadline=0.020, preprocess=False)

            def done(_f, due=due, i=i):
                lat[i] = (time.perf_counter() - due) * 1000
                with lock:
                    left_n[0] -= 1
                    if left_n[0] == 0:
                        all_done.set()

            f.add_done_callback(done)
        all_done.wait(30)
        missed_counter = agent.metrics.counters["deadline_missed"]
    lat_a = lat[~np.isnan(lat)]
    return {"max_rate": max_rate, "offered_rate": rate, "requests": len(lat_a),
            "met_pct": 100.0 * float((lat_a <= 20.0).mean()), "p50_ms": float(np.percentile(lat_a, 50)),
            "p99_ms": float(np.percentile(lat_a, 99)),
            "agent_counted_missed": missed_counter, "target_pct": 99.0}


# -- 6. the process: start-up and RSS ---------------------------------------------------------------

def bench_process(pk, work: Path, threads: int) -> dict:
    cfg = work / "agent.toml"
    out = work / "proc_results.jsonl"
    cfg.write_text(f"""
[agent]
allow_unsigned = true
state_dir = "{work / 'st-proc'}"
package = "{pk['cnn']}"
[runtime]
threads = {threads}
[[sources]]
type = "synthetic"
id = "cam"
shape = [1, 8, 8]
rate_hz = 200
[[sinks]]
type = "jsonl"
path = "{out}"
[api]
enabled = true
port = 0
""")
    # First run installs the package into the store (a device does that once), second run is a restart.
    figures = {}
    for run in ("first", "restart"):
        if out.exists():
            out.unlink()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            ok = wait_for(lambda: out.exists() and out.stat().st_size > 0, 30)
            first = time.perf_counter() - t0
            wait_for(lambda: False, 1.0)  # serve for a second before reading RSS
            rss = None
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) / 1024
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        figures[run] = {"first_result_s": first if ok else None, "rss_mb": rss, "exit_code": proc.returncode}
    return {**figures, "target_first_result_s": 1.5, "target_rss_mb": 120}


# -- 7. real-size workloads (issue 19) ---------------------------------------------------------------
#
# A MobileNetV3-style 224x224 CNN over a folder of real JPEG photo crops, a 30 fps camera-like stream
# with a 100 ms deadline under CPU load, and a 1-D audio CNN over a WAV file in 1 s windows. Models
# come from benchmarks/real_models.py (edgeship.demo_data.zoo, exported and packaged, cached). The
# agent runs with the DEFAULT config: no [batcher] or [[sources]] tuning, runtime threads = cores.

HAND_SCRIPT = r'''
import json, sys, time
import numpy as np
import onnxruntime as ort
from PIL import Image
model, folder_list, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
labels = sys.argv[5].split(",")
mean = np.array([0.485, 0.456, 0.406], np.float32); std = np.array([0.229, 0.224, 0.225], np.float32)
with open(out, "w", buffering=1) as f:
    for path in open(folder_list).read().split():
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
        x = np.ascontiguousarray(((a * (1 / 255.0) - mean) / std).transpose(2, 0, 1)[None])
        y = sess.run(None, {"input": x})[0][0]
        f.write(json.dumps({"ref": path.rsplit("/", 1)[-1], "label": labels[int(y.argmax())], "ts": time.time()}) + "\n")
'''


def _photo_row(path: Path) -> np.ndarray:
    """The hand-written loops' decode: what the manifest preprocess asks for, written out by hand."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(((a * (1 / 255.0) - mean) / std).transpose(2, 0, 1)[None])


def _default_source_kw() -> dict:
    """The prefetch settings a ``[[sources]]`` entry gets when it sets none: the default config."""
    from edgeship.agent.config import SourceConfig

    d = SourceConfig(type="folder")
    return {"block_size": d.block_size, "read_ahead": d.read_ahead, "workers": d.workers,
            "read_ahead_bytes": d.read_ahead_bytes}


def _peak_rss_run(argv: list, out: Path, timeout: float = 120, env: dict | None = None) -> dict:
    """Spawn ``argv``; seconds from spawn to the first line in ``out``, to exit, and the peak RSS.

    The peak is the child's VmHWM, polled until it exits. Not ``wait4``'s ru_maxrss: Linux carries the
    forked copy of this (big) benchmark process's high-water mark across exec into it.
    """
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first = None
    deadline = t0 + timeout
    hwm = 0.0
    while True:  # os.waitpid, not proc.poll(): /proc/<pid> must still be there to read the last VmHWM
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = max(hwm, next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:")))
        except (OSError, StopIteration):
            pass
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        if first is None and out.exists() and out.stat().st_size > 0:
            first = time.perf_counter() - t0
        if time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.002)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if first is None and out.exists() and out.stat().st_size > 0:
        first = total
    lines = sum(1 for _ in open(out)) if out.exists() else 0
    return {"first_result_s": first, "total_s": total, "peak_rss_mb": hwm, "lines": lines,
            "exit": os.waitstatus_to_exitcode(status), "stderr_tail": err.strip().splitlines()[-1:] if status else []}


def bench_real_folder(rm: dict, work: Path, n: int, reps: int, threads: int) -> dict:
    """Folder of ``n`` JPEG photos, 224x224 CNN: hand loop, 2-thread decode prefetch loop, agent (default config)."""
    from concurrent.futures import ThreadPoolExecutor

    from edgeship.agent.sources import FolderSource
    from edgeship.demo_data import zoo

    folder = work / "photos"
    zoo.write_jpegs(folder, n)
    files = sorted(folder.glob("*.jpg"))
    labels = zoo.PHOTO_CLASSES
    sess = session(rm["photo"]["onnx"], threads)
    sess.run(None, {"input": _photo_row(files[0])})  # both sides start warm

    def hand() -> tuple[float, dict]:
        got = {}
        t0 = time.perf_counter()
        with open(work / "hand_photo.jsonl", "w") as fout:
            for p in files:
                y = sess.run(None, {"input": _photo_row(p)})[0][0]
                got[p.name] = labels[int(y.argmax())]
                fout.write(json.dumps({"ref": p.name, "label": got[p.name], "ts": time.time()}) + "\n")
        return n / (time.perf_counter() - t0), got

    def pool() -> tuple[float, dict]:
        got = {}
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as ex, open(work / "pool_photo.jsonl", "w") as fout:
            window = 8  # decode at most 8 files ahead
            futs = [ex.submit(_photo_row, p) for p in files[:window]]
            for i, p in enumerate(files):
                x = futs[i].result()
                futs[i] = None
                if i + window < n:
                    futs.append(ex.submit(_photo_row, files[i + window]))
                y = sess.run(None, {"input": x})[0][0]
                got[p.name] = labels[int(y.argmax())]
                fout.write(json.dumps({"ref": p.name, "label": got[p.name], "ts": time.time()}) + "\n")
        return n / (time.perf_counter() - t0), got

    def agent(rep: int) -> tuple[float, dict]:
        out = work / f"agent_photo_{rep}.jsonl"
        a = agent_for(rm["photo"]["pkg"], work / f"st-photo-{rep}", None,
                      sinks=[{"type": "jsonl", "path": str(out), "flush_every": 0}])
        with a:
            t0 = time.perf_counter()
            a.add_source(FolderSource("cam", path=str(folder)), **_default_source_kw())
            assert a.wait_idle(300)
            rate = n / (time.perf_counter() - t0)
            batch = a.metrics.batch_size.mean
        got = {d["ref"]: d["label"] for d in map(json.loads, open(out))}
        return rate, got, batch

    runs: dict = {"hand": [], "pool": [], "agent": []}
    same = []
    batch_mean = None
    for rep in range(reps):  # interleaved, so machine load lands on every approach alike
        r_h, g_h = hand()
        r_p, g_p = pool()
        r_a, g_a, batch_mean = agent(rep)
        runs["hand"].append(r_h)
        runs["pool"].append(r_p)
        runs["agent"].append(r_a)
        same.append(sum(g_a.get(k) == v for k, v in g_h.items()) / n)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"images": n, "reps": reps, "runs_per_s": runs, "hand_per_s": med["hand"], "pool_per_s": med["pool"],
            "agent_per_s": med["agent"], "ratio_hand": med["agent"] / med["hand"],
            "ratio_pool": med["agent"] / med["pool"], "labels_agree": min(same), "agent_batch_mean": batch_mean,
            "labels_distinct": len(set(g_h.values())), "default_source": _default_source_kw(),
            "target_ratio_hand": 1.3, "target_ratio_pool": 1.0}


def bench_real_process(rm: dict, work: Path, n: int, reps: int, threads: int) -> dict:
    """Spawn -> first result and peak RSS: ``edgeship agent run`` (default config) vs the raw script."""
    from edgeship.demo_data import zoo

    folder = work / "photos_proc"
    files = zoo.write_jpegs(folder, n, seed=3)
    lst = work / "photos_proc.txt"
    lst.write_text("\n".join(str(p) for p in files))
    script = work / "hand_loop.py"
    script.write_text(HAND_SCRIPT)
    out_raw, out_agent = work / "raw_proc.jsonl", work / "agent_proc.jsonl"
    cfg = work / "photo_agent.toml"
    cfg.write_text(f"""
[agent]
allow_unsigned = true
state_dir = "{work / 'st-photo-proc'}"
package = "{rm['photo']['pkg']}"
[[sources]]
type = "folder"
id = "cam"
path = "{folder}"
[[sinks]]
type = "jsonl"
path = "{out_agent}"
""")
    raw_argv = [sys.executable, str(script), str(rm["photo"]["onnx"]), str(lst), str(out_raw), str(threads),
                ",".join(zoo.PHOTO_CLASSES)]
    agent_argv = [sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg), "--until-done"]
    # One run first, not measured: the agent installs the package into its store (a device does
    # that once), and both get their files into the page cache. Both children may write bytecode
    # (to a cache here, not the tree), as an installed package has it: under PYTHONDONTWRITEBYTECODE
    # an editable checkout compiled edgeship's modules from source at every spawn, while the raw
    # script's imports (numpy, onnxruntime, Pillow) had theirs from pip.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    _peak_rss_run(agent_argv, out_agent, env=env)
    _peak_rss_run(raw_argv, out_raw, env=env)
    runs: dict = {"raw": [], "agent": []}
    for _ in range(reps):
        runs["raw"].append(_peak_rss_run(raw_argv, out_raw, env=env))
        runs["agent"].append(_peak_rss_run(agent_argv, out_agent, env=env))
    for k, rs in runs.items():
        assert all(r["lines"] == n for r in rs), (k, [(r["lines"], r["stderr_tail"]) for r in rs])

    def med(k, f):
        return float(np.median([r[f] for r in runs[k]]))

    res = {"images": n, "reps": reps, "runs": runs}
    for k in runs:
        res[k] = {"first_result_s": med(k, "first_result_s"), "peak_rss_mb": med(k, "peak_rss_mb"),
                  "whole_run_per_s": n / med(k, "total_s")}
    res["first_result_ratio"] = res["agent"]["first_result_s"] / res["raw"]["first_result_s"]
    res["rss_over_raw_mb"] = res["agent"]["peak_rss_mb"] - res["raw"]["peak_rss_mb"]
    res.update({"target_first_result_ratio": 1.5, "target_rss_over_raw_mb": 40})
    return res


class _Busy:
    """A busy process spinning on one core: 50 % CPU load on a 2-core machine."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(10)


class _LatencySink:
    """Records, per result, capture-to-result seconds (from the source block's wall-clock ``ts``)."""

    def __init__(self) -> None:
        self.lat: list[float] = []

    def write(self, batch) -> None:
        now = time.time()
        ts = batch.ts if isinstance(batch.ts, (list, np.ndarray)) else [batch.ts] * batch.n
        self.lat.extend(now - float(t) for t in ts)

    def close(self) -> None:
        pass


def bench_real_camera(rm: dict, work: Path, seconds: float) -> dict:
    """A 640x480 camera at 30 fps (FakeCapture behind CameraSource), 100 ms deadline, with a busy process."""
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.sources import CameraSource, FakeCapture

    sink = _LatencySink()
    data = {"agent": {"allow_unsigned": True, "package": str(rm["photo"]["pkg"]), "state_dir": str(work / "st-cam"),
                      "device_id": "bench"}}
    frames = int(30 * seconds)
    with _Busy(), Agent(parse_config(data), sinks=[sink]) as a:
        cap = FakeCapture(640, 480, fps=30, fail_after=frames)
        a.add_source(CameraSource("cam", capture=cap),
                     deadline_ms=100, restart=False, **_default_source_kw())
        wait_for(lambda: len(sink.lat) >= frames, seconds + 30)
        missed = a.metrics.counters["deadline_missed"]
    lat = np.asarray(sink.lat) * 1000
    return {"frames": frames, "results": len(lat), "met_pct": 100.0 * float((lat <= 100).mean()) if len(lat) else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "agent_counted_missed": missed, "load": "1 busy process (50 % of 2 cores)", "target_pct": 99.0}


class WavWindows:
    """A source over a 16-bit mono WAV file in fixed windows (``window`` samples, no overlap): (n, 1, window)."""

    kind = "wav"
    decodes = False

    def __init__(self, source_id: str, path: str, window: int) -> None:
        self.id, self.path, self.window = source_id, path, window
        self.exhausted = False
        self._w = None

    def open(self) -> None:
        import wave

        self._w = wave.open(self.path, "rb")
        self.exhausted = False

    def read(self, max_n: int, timeout: float):
        from edgeship.agent.sources import RawBlock

        pcm = np.frombuffer(self._w.readframes(max_n * self.window), "<i2")
        k = len(pcm) // self.window
        if k < max_n:
            self.exhausted = True
        if k == 0:
            return None
        x = (pcm[:k * self.window].astype(np.float32) / 32767.0).reshape(k, 1, self.window)
        return RawBlock(data=x, ts=time.time())

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
        self._w = None


def bench_real_audio(rm: dict, work: Path, clips: int, reps: int, threads: int) -> dict:
    """1-D audio CNN over a WAV file in 1 s windows: hand loop (wave + session.run per window) vs the agent."""
    import wave

    from edgeship.demo_data import zoo

    x, _ = zoo.synth_audio(clips)
    wav = zoo.write_wav(work / "stream.wav", x.reshape(-1))
    win = x.shape[1]
    sess = session(rm["audio"]["onnx"], threads)

    def hand() -> float:
        t0 = time.perf_counter()
        with wave.open(str(wav), "rb") as w, open(work / "hand_audio.jsonl", "w") as fout:
            i = 0
            while True:
                pcm = np.frombuffer(w.readframes(win), "<i2")
                if len(pcm) < win:
                    break
                xi = (pcm.astype(np.float32) / 32767.0).reshape(1, 1, win)
                y = sess.run(None, {"input": xi})[0][0]
                fout.write(json.dumps({"ref": f"w{i}", "label": int(y.argmax()), "ts": time.time()}) + "\n")
                i += 1
        return clips / (time.perf_counter() - t0)

    def agent(rep: int) -> float:
        out = work / f"agent_audio_{rep}.jsonl"
        a = agent_for(rm["audio"]["pkg"], work / f"st-audio-{rep}", None,
                      sinks=[{"type": "jsonl", "path": str(out), "flush_every": 0}])
        with a:
            t0 = time.perf_counter()
            a.add_source(WavWindows("mic", str(wav), win), **_default_source_kw())
            assert a.wait_idle(300)
            rate = clips / (time.perf_counter() - t0)
        assert sum(1 for _ in open(out)) == clips
        return rate

    hand()
    runs: dict = {"hand": [], "agent": []}
    for rep in range(reps):
        runs["hand"].append(hand())
        runs["agent"].append(agent(rep))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"windows": clips, "window_samples": win, "runs_per_s": runs, "hand_per_s": med["hand"],
            "agent_per_s": med["agent"], "ratio": med["agent"] / med["hand"]}


# -- main --------------------------------------------------------------------------------------------

def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [("sensor stream\n(x, >= 5)", res["sensor"]["ratio"], 5.0, True),
             ("image folder\n(x, >= 1.3)", res["images"]["ratio"], 1.3, True),
             ("submit overhead\n(% raw p50, <= 15)", res["requests"]["overhead_pct_of_raw_p50"], 15, False),
             ("p99/p50\n(<= 2)", res["requests"]["p99_over_p50"], 2.0, False),
             ("deadline met\n(%, >= 99)", res["deadline"]["met_pct"], 99, True),
             ("RSS MB\n(<= 120)", res["process"]["restart"]["rss_mb"] or 0, 120, False),
             ("first result s\n(<= 1.5)", res["process"]["restart"]["first_result_s"] or 0, 1.5, False)]
    fig, axes = plt.subplots(1, len(items), figsize=(2.2 * len(items), 3.2))
    for ax, (label, v, target, higher) in zip(axes, items):
        ok = v >= target if higher else v <= target
        ax.bar([0], [v], color="tab:green" if ok else "tab:red")
        ax.axhline(target, color="black", linestyle="--", linewidth=1)
        ax.set_title(label, fontsize=8)
        ax.set_xticks([])
        ax.text(0, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("edgeship agent vs targets (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, noisier figures)")
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads, same for the loops and the agent (default 1)")
    ap.add_argument("--only", choices=("digits", "real"), help="run only the digits sections or the real-size ones")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the real-size sections (default 3)")
    args = ap.parse_args()
    q = args.quick
    OUT.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    res: dict = {"threads": {"onnxruntime_intra_op": args.threads, "batcher": 1, "prefetch_reader_per_source": 1},
                 "loadavg_at_start": load, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="edgeship-agent-bench-") as tmp:
        work = Path(tmp)
        steps = []
        if args.only != "real":
            pk = build_packages(work)
            steps += [("sensor", lambda: bench_sensor(pk, work, 20_000 if q else 200_000, args.threads)),
                      ("images", lambda: bench_images(pk, work, 500 if q else 3000, args.threads)),
                      ("requests", lambda: bench_requests(pk, work, 1000 if q else 4000, args.threads)),
                      ("max_rate", lambda: {
                          "submit_per_s": max_submit_rate(pk["mlp"], work / "st-max", args.threads, 1.0 if q else 3.0,
                                                          np.zeros(64, np.float32),
                                                          {"max_batch": 64, "max_delay_ms": 1}),
                          "submit_clients": "4 threads x 64 in flight", "http": max_http_rate(
                              pk["mlp"], work / "st-http", args.threads, 1.0 if q else 3.0, np.zeros(64, np.float32))}),
                      ("deadline", lambda: bench_deadline(pk, work, args.threads, 1.0 if q else 3.0)),
                      ("process", lambda: bench_process(pk, work, args.threads))]
        if args.only != "digits":
            from real_models import build_all

            rm = build_all()
            cores = default_cores()
            reps = 1 if q else args.reps
            steps += [("real_folder", lambda: bench_real_folder(rm, work, 300, reps, cores)),
                      ("real_process", lambda: bench_real_process(rm, work, 300, reps, cores)),
                      ("real_camera", lambda: bench_real_camera(rm, work, 4.0 if q else 10.0)),
                      ("real_audio", lambda: bench_real_audio(rm, work, 100 if q else 300, reps, cores))]
        for name, fn in steps:
            t = time.perf_counter()
            res[name] = fn()
            # The sensor and image sections write ~100 MB of inputs and results: write them
            # back now, so the kernel's writeback does not land in the next section's timings.
            os.sync()
            print(f"[{name} done in {time.perf_counter() - t:.1f} s]", file=sys.stderr, flush=True)
    res["loadavg_at_end"] = os.getloadavg()

    def line(what, value, target, ok):
        print(f"  {what:<58} {value:>18}   target {target:<10} {'ok' if ok else 'MISSED'}")

    print(f"edgeship agent benchmark  (cpus {res['cpus']}, load avg {load[0]:.2f} -> {res['loadavg_at_end'][0]:.2f}; "
          f"onnxruntime threads {args.threads}, 1 batcher thread, 1 reader + n workers per source)")
    if "sensor" in res:
        print_digits(res, line)
    if "real_folder" in res:
        print_real(res, line)
    name = "agent" if not args.only else f"agent_{args.only}"
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=2, default=float))
    if "sensor" in res:
        plot(res, OUT / "agent.png")
    print(f"wrote {OUT / (name + '.json')}")
    return 0


def default_cores() -> int:
    """What [runtime] threads defaults to (one intra-op thread per usable core): the hand loops use the same."""
    from edgeship.runtime._backends import default_threads

    return default_threads()


def print_real(res: dict, line) -> None:
    f, p, c, a = (res[k] for k in ("real_folder", "real_process", "real_camera", "real_audio"))
    print(f"  real-size workloads, DEFAULT agent config, median of {f['reps']} interleaved reps "
          f"(224x224 MobileNetV3-style CNN, {f['images']} JPEG photos)")
    line(f"photo folder: agent / hand loop ({f['agent_per_s']:,.0f} vs {f['hand_per_s']:,.0f}/s)",
         f"{f['ratio_hand']:.2f}x", ">= 1.3x", f["ratio_hand"] >= 1.3)
    line(f"photo folder: agent / 2-thread prefetch loop ({f['pool_per_s']:,.0f}/s)", f"{f['ratio_pool']:.2f}x",
         ">= 1.0x", f["ratio_pool"] >= 1.0)
    line(f"  labels agree with the hand loop ({f['labels_distinct']} classes seen); agent mean batch "
         f"{f['agent_batch_mean']:.1f}", f"{100 * f['labels_agree']:.0f} %", "100 %", f["labels_agree"] == 1.0)
    ra, rr = p["agent"], p["raw"]
    line(f"spawn -> first result: agent / raw script ({ra['first_result_s']:.2f} vs {rr['first_result_s']:.2f} s)",
         f"{p['first_result_ratio']:.2f}x", "<= 1.5x", p["first_result_ratio"] <= 1.5)
    line(f"peak RSS: agent - raw script ({ra['peak_rss_mb']:.0f} vs {rr['peak_rss_mb']:.0f} MB)",
         f"{p['rss_over_raw_mb']:+.0f} MB", "<= +40 MB", p["rss_over_raw_mb"] <= 40)
    line(f"  whole process run, images/s: agent {ra['whole_run_per_s']:,.0f}, raw script", f"{rr['whole_run_per_s']:,.0f}/s",
         "(info)", True)
    line(f"camera 30 fps, 100 ms deadline, 50 % CPU load: met (p99 {c['p99_ms']:.0f} ms)", f"{c['met_pct']:.2f} %",
         ">= 99 %", c["met_pct"] >= 99)
    line(f"audio CNN, 1 s WAV windows: agent / hand loop ({a['agent_per_s']:,.0f} vs {a['hand_per_s']:,.0f}/s)",
         f"{a['ratio']:.2f}x", "(report)", True)


def print_digits(res: dict, line) -> None:
    s, im, r, m, d, p = (res[k] for k in ("sensor", "images", "requests", "max_rate", "deadline", "process"))
    sp, st = s["process"], s["thread"]
    line(f"sensor stream, reader=process: agent / hand loop ({sp['agent_per_s']:,.0f} vs "
         f"{s['hand_per_s']:,.0f}/s)", f"{sp['ratio']:.2f}x", ">= 5x", sp["ratio"] >= 5)
    line(f"  its first result after {sp['first_result_s']:.2f} s (child start); whole run incl. that",
         f"{sp['whole_run_per_s'] / s['hand_per_s']:.2f}x", "(info)", True)
    line(f"  same, reader=thread (parse in the agent's process: {st['agent_per_s']:,.0f}/s)",
         f"{st['ratio']:.2f}x", "(info)", True)
    line(f"image folder: agent / hand loop ({im['agent_per_s']:,.0f} vs {im['hand_per_s']:,.0f}/s, "
         f"{im['prefetch_workers']} workers)", f"{im['ratio']:.2f}x", ">= 1.3x", im["ratio"] >= 1.3)
    line(f"submit overhead, 4 threads, 1-sample requests ({r['overhead_ms'] * 1000:.0f} us vs raw p50 "
         f"{r['raw_p50_ms'] * 1000:.0f} us; mean batch {r['mean_batch']:.1f})",
         f"{r['overhead_pct_of_raw_p50']:.1f} %", "<= 15 %", r["overhead_pct_of_raw_p50"] <= 15)
    line("  same with max_batch=1 (one model call per request): ms per request",
         f"{r['per_request_ms_max_batch_1']:.3f} ms", "(info)", True)
    line(f"submit latency p99 / p50, 4 threads ({r['req_p99_ms']:.3f} / {r['req_p50_ms']:.3f} ms)",
         f"{r['p99_over_p50']:.2f}", "<= 2", r["p99_over_p50"] <= 2)
    line("one request at a time: agent p50 - raw p50", f"{r['seq_overhead_ms'] * 1000:.0f} us", "(info)", True)
    line("max requests/s, sensor MLP, submit (4 threads x 64 in flight)", f"{m['submit_per_s']:,.0f}/s", "(report)", True)
    line("max requests/s, sensor MLP, POST /v1/infer (4 connections)", f"{m['http']['rate']:,.0f}/s", "(report)",
         m["http"]["errors"] == 0)
    line(f"20 ms deadline met at 50 % of max rate ({d['offered_rate']:,.0f}/s of {d['max_rate']:,.0f}/s)",
         f"{d['met_pct']:.2f} %", ">= 99 %", d["met_pct"] >= 99)
    for run in ("first", "restart"):
        pr = p[run]
        fr = pr["first_result_s"]
        line(f"agent process ({run} start): spawn -> first result", f"{fr:.2f} s" if fr else "none", "<= 1.5 s",
             bool(fr) and fr <= 1.5)
        line(f"agent process ({run} start): RSS with the digits CNN loaded", f"{pr['rss_mb']:.0f} MB", "<= 120 MB",
             (pr["rss_mb"] or 1e9) <= 120)


if __name__ == "__main__":
    sys.exit(main())
