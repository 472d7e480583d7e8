"""``edgeship bench PKG``: what a package costs on this device.

Measures, in one process: load time, warm-up time, latency percentiles at
batch 1 (raw runtime and through the agent), throughput at batch 1/8/32
through the raw runtime (one ``run_unchecked`` per batch) and through the
agent (a synthetic source feeding the micro-batcher with that
``max_batch``), the process RSS, and the backend/threads chosen. All
latencies go through :class:`edgeship.metrics.Histogram`, like telemetry.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ..metrics import LATENCY_BOUNDS_MS, Histogram

__all__ = ["run_bench", "format_bench", "rss_mb"]

BATCHES = (1, 8, 32)


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident set size in MB from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _progress(total: int, quiet: bool, desc: str):
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _sample(runner) -> np.ndarray:
    ex = runner.example_input()
    x = next(iter(ex.values())) if isinstance(ex, dict) else ex
    return np.ascontiguousarray(np.asarray(x)[:1])


def run_bench(package: str | os.PathLike, *, threads: int | None = None, backend: str | None = None,
              seconds: float = 1.0, quiet: bool = False, variant: str | None = None) -> dict[str, Any]:
    from ..runtime import load  # noqa: PLC0415
    from .agent import Agent
    from .config import parse_config
    from .sources import SyntheticSource

    steps = 2 + len(BATCHES) * 2 + 1
    bar = _progress(steps, quiet, "bench")

    def tick():
        if bar is not None:
            bar.update(1)

    out: dict[str, Any] = {"package": str(package), "device": {"machine": os.uname().machine,
                                                               "cpus": os.cpu_count()}}
    t0 = time.perf_counter()
    runner = load(str(package), backend=backend, threads=threads, variant=variant)
    out["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.warmup(3)
    out["warmup_s"] = time.perf_counter() - t0
    out["backend"] = runner.backend
    out["threads"] = threads if threads is not None else "runtime default"
    out["model"] = {"name": runner.name, "version": runner.version}
    # Which variant was measured: `edgeship convert quantize --target-bench` compares fp32 and int8 by these.
    out["variant"] = runner.variant.get("id")
    out["precision"] = runner.variant.get("precision")
    tick()
    x1 = _sample(runner)
    name = runner.input_names[0]
    fixed = runner.batch_size
    # raw latency at batch 1
    h = Histogram(LATENCY_BOUNDS_MS)
    lat = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(lat) < 50:
        t = time.perf_counter()
        runner.run_unchecked({name: x1})
        lat.append((time.perf_counter() - t) * 1000)
    h.add_many(lat)
    out["raw_latency_ms_b1"] = h.summary()
    tick()
    raw_tp = {}
    for b in BATCHES:
        bb = b if fixed is None else fixed
        xb = np.ascontiguousarray(np.repeat(x1, bb, axis=0))
        n = 0
        t = time.perf_counter()
        deadline = t + seconds / 2
        while time.perf_counter() < deadline:
            runner.run_unchecked({name: xb})
            n += bb
        raw_tp[str(b)] = n / (time.perf_counter() - t)
        tick()
    out["raw_throughput"] = raw_tp
    runner.close()
    out["rss_mb_runtime"] = rss_mb()

    agent_tp = {}
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as state:
        base = {"agent": {"allow_unsigned": True, "package": str(package), "state_dir": state, "device_id": "bench"},
                "runtime": {"threads": threads, "backend": backend, "variant": variant}}
        base["runtime"] = {k: v for k, v in base["runtime"].items() if v is not None}
        cfg = parse_config({**base, "batcher": {"max_batch": 1, "max_delay_ms": 0}})
        with Agent(cfg) as agent:
            sample = x1[0]
            ah = Histogram(LATENCY_BOUNDS_MS)
            lat = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(lat) < 50:
                t = time.perf_counter()
                agent.infer(sample, preprocess=False)
                lat.append((time.perf_counter() - t) * 1000)
            ah.add_many(lat)
            out["agent_latency_ms_b1"] = ah.summary()
            out["rss_mb_agent"] = rss_mb()
        for b in BATCHES:
            cfg = parse_config({**base, "batcher": {"max_batch": b, "max_delay_ms": 2}})
            with Agent(cfg) as agent:
                src = SyntheticSource("bench", shape=list(x1.shape[1:]), distinct=64)
                agent.add_source(src, block_size=max(64, b))
                start_n = agent.metrics.counters["inferences"]
                t = time.perf_counter()
                time.sleep(seconds / 2)  # the measurement window itself
                n = agent.metrics.counters["inferences"] - start_n
                agent_tp[str(b)] = n / (time.perf_counter() - t)
            tick()
    out["agent_throughput"] = agent_tp
    if bar is not None:
        bar.close()
    return out


def format_bench(r: dict[str, Any]) -> str:
    def f(v, unit=""):
        return "-" if v is None else (f"{v:,.3f}{unit}" if isinstance(v, float) and v < 100 else f"{v:,.0f}{unit}")

    lines = [
        f"package    {r['package']} ({r['model']['name']} {r['model']['version']})",
        f"device     {r['device']['machine']}, {r['device']['cpus']} cpus",
        f"backend    {r['backend']}, threads: {r['threads']}",
        f"load       {1000 * r['load_s']:.1f} ms   warm-up {1000 * r['warmup_s']:.1f} ms",
        "",
        "latency at batch 1 (ms)      p50       p95       p99",
    ]
    for label, key in (("raw runtime", "raw_latency_ms_b1"), ("through the agent", "agent_latency_ms_b1")):
        s = r[key]
        lines.append(f"  {label:<22} {f(s['p50']):>9} {f(s['p95']):>9} {f(s['p99']):>9}")
    lines += ["", "throughput (samples/s)   " + "".join(f"{'b=' + b:>12}" for b in r["raw_throughput"])]
    for label, key in (("raw runtime", "raw_throughput"), ("through the agent", "agent_throughput")):
        lines.append(f"  {label:<22} " + "".join(f"{v:>12,.0f}" for v in r[key].values()))
    lines += ["", f"RSS        {f(r.get('rss_mb_agent'), ' MB')} with the agent running"]
    return "\n".join(lines)
