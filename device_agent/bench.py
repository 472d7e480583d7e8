"""``edgeship bench PKG``: what a package costs on this device.

Measures, in one process: load time, warm-up time, latency percentiles at
batch 1 (raw runtime and through the agent), throughput at batch 1/8/32
through the raw runtime (one ``run_unchecked`` per batch) and through the
agent (a source of model-ready samples through prefetch and the
micro-batcher with that ``max_batch``, default prefetch settings, measured
for ``seconds`` once results flow), the process RSS, and the backend/threads
chosen. ``agent_batch_cap`` says where ``[batcher] max_bytes_in_flight``
lowered the batch (the agent runs so too). All
latencies go through :class:`edgeship.metrics.Histogram`, like telemetry.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ..errors import InputError
from ..metrics import LATENCY_BOUNDS_MS, Histogram
from .prefetch import BLOCK_CAP

__all__ = ["run_bench", "format_bench", "rss_mb", "bench_agent_rate", "agent_rate"]

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
    if len(runner.inputs) != 1:  # the pools below hold one tensor per sample (#20: say so, in one line)
        runner.close()
        raise InputError(f"edgeship bench feeds models one input tensor; {runner.name} takes "
                         f"{', '.join(runner.input_names)} (several inputs or a declared state): measure it "
                         "through the agent's API instead")
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
    # raw latency at batch 1 (a model with a fixed batch of k: one run of k rows, as the agent pads it)
    h = Histogram(LATENCY_BOUNDS_MS)
    lat = []
    x_lat = np.ascontiguousarray(np.repeat(x1, fixed or 1, axis=0))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(lat) < 50:
        t = time.perf_counter()
        runner.run_unchecked({name: x_lat})
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
        deadline = t + seconds
        while time.perf_counter() < deadline:
            runner.run_unchecked({name: xb})
            n += bb
        raw_tp[str(b)] = n / (time.perf_counter() - t)
        tick()
    out["raw_throughput"] = raw_tp
    runner.close()
    out["rss_mb_runtime"] = rss_mb()

    agent_tp = {}
    caps: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as state:
        base = {"agent": {"allow_unsigned": True, "package": str(package), "state_dir": state, "device_id": "bench"},
                "runtime": {"threads": threads, "backend": backend, "variant": variant},
                "adapt": {"choose": "default"}}  # the variant asked for (or the default), not the fastest
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
            # One state dir for every agent here: the working memory per sample is measured once
            # (kept in the store), so all of them cap their batch alike.
            r = bench_agent_rate(package, state, b, x1[0], seconds, runtime=base["runtime"])
            agent_tp[str(b)], caps[str(b)] = r["per_s"], r["batch_cap"]
            tick()
    out["agent_throughput"] = agent_tp
    out["agent_batch_cap"] = caps
    if bar is not None:
        bar.close()
    return out


class _PoolSource:
    """Model-ready samples (no preprocess needed) handed out as views of a pool built up front.

    Built before the measurement, not in ``open()``: the old synthetic source
    drew its 64-sample pool inside the measured window (38 MB of random
    numbers for a 224x224 model) and gathered a copy per block.
    """

    kind = "bench"
    decodes = False
    model_ready = True  # rows are model input already: a package's preprocess (resize, mean/std) is not applied

    def __init__(self, sample: np.ndarray, rows: int = 64) -> None:
        from .sources import RawBlock  # noqa: PLC0415

        self.id = "bench"
        self.exhausted = False
        self._raw = RawBlock
        self._pool = np.ascontiguousarray(np.repeat(sample[None], rows, axis=0))

    def open(self) -> None:
        self.exhausted = False

    def read(self, max_n: int, timeout: float):
        return self._raw(data=self._pool[:max_n], ts=time.time())

    def close(self) -> None:
        pass


def bench_agent_rate(package: str | os.PathLike, state: str | os.PathLike, max_batch: int, sample: np.ndarray,
                     seconds: float, runtime: dict | None = None) -> dict[str, float]:
    """One agent as ``edgeship bench`` runs it for ``b=max_batch``: ``per_s`` (samples/s) and ``batch_cap``.

    The agent's default config but for ``max_batch`` and a 2 ms delay; the
    cap is where ``[batcher] max_bytes_in_flight`` lowered the batch.
    """
    from .agent import Agent  # noqa: PLC0415
    from .config import parse_config  # noqa: PLC0415

    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(package), "state_dir": str(state),
                                  "device_id": "bench"}, "runtime": dict(runtime or {}),
                        "batcher": {"max_batch": max_batch, "max_delay_ms": 2}})
    with Agent(cfg) as agent:
        return {"per_s": agent_rate(agent, sample, seconds), "batch_cap": agent._max_batch}


def agent_rate(agent, sample: np.ndarray, seconds: float) -> float:
    """Samples/s through a started agent's source path (prefetch -> batcher -> runner), default prefetch settings.

    The window opens once results flow (the first batches meet new shapes and
    cold threads, as a served stream does only once) and lasts ``seconds``.
    """
    pool_rows = max(1, min(BLOCK_CAP, (16 << 20) // max(1, sample.nbytes)))  # any block size; at most 16 MB
    agent.add_source(_PoolSource(sample, pool_rows))
    m = agent.metrics.counters
    deadline = time.monotonic() + 30
    while m["inferences"] < 2 * agent._max_batch and time.monotonic() < deadline:
        time.sleep(0.01)
    n0, t0 = m["inferences"], time.perf_counter()
    time.sleep(seconds)
    return (m["inferences"] - n0) / (time.perf_counter() - t0)


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
