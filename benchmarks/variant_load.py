"""Benchmark for issue 21.5 (verify once): loading and switching to a large variant of an installed package.

    python benchmarks/variant_load.py [--hidden 270000] [--repeats 3]

A package holds a tiny default variant and a large one (the 64-hidden-10 MLP
of tests/models.py with ``--hidden`` units: ~81 MB of ONNX at the default).
A real Agent installs it and starts on the tiny one; then, ``--repeats``
times, ``load_candidate(sha, variant="big")`` + ``switch_to`` and back.
Install verifies the package once; a load hashes only the file it loads, so
the switch time is the read, one hash and onnxruntime's session of that file.

Figures: agent start (install + load of the default), median load_candidate
of the big variant, median load_candidate + switch_to.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(hidden: int = 270_000, repeats: int = 3) -> dict:
    from models import make_mlp_onnx

    from edgeship import package
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config

    d = Path(tempfile.mkdtemp(prefix="edgeship-variant-load-"))
    big = make_mlp_onnx(d / "big.onnx", hidden=hidden, seed=0)
    small = make_mlp_onnx(d / "small.onnx", hidden=8, seed=1)
    pkg = package.build(d / "two.edgepkg", {"small.onnx": small, "big.onnx": big}, name="two", version="1.0.0",
                        example_input=np.zeros((1, 64), np.float32),
                        variants=[{"id": "small", "file": "small.onnx", "default": True},
                                  {"id": "big", "file": "big.onnx"}])
    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(d / "state")},
                        "runtime": {"threads": 1, "warmup": 1}})
    t0 = time.perf_counter()
    agent = Agent(cfg).start()
    start_s = time.perf_counter() - t0
    sha = agent.model["sha256"]
    loads, switches = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            h = agent.load_candidate(sha, variant="big")
            loads.append(time.perf_counter() - t0)
            agent.switch_to(h)
            switches.append(time.perf_counter() - t0)
            agent.switch_to(agent.load_candidate(sha, variant="small"))
    finally:
        agent.stop()
    return {"package_mb": pkg.stat().st_size / 1e6, "big_mb": big.stat().st_size / 1e6, "start_s": start_s,
            "load_s": statistics.median(loads), "switch_s": statistics.median(switches), "loads": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=270_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    r = run(a.hidden, a.repeats)
    print(f"package {r['package_mb']:.1f} MB, big variant {r['big_mb']:.1f} MB of ONNX")
    print(f"  agent start (install + load the default variant): {r['start_s']:.3f} s")
    print(f"  load_candidate(big): median {r['load_s']:.3f} s  {[round(x, 3) for x in r['loads']]}")
    print(f"  load_candidate + switch_to(big): median {r['switch_s']:.3f} s")


if __name__ == "__main__":
    main()
