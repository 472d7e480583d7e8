"""Benchmark for issue 3 (foundation): what the device pays to start.

    python benchmarks/startup.py [--runs 7]

Each case runs in a fresh ``python`` subprocess, several times; the table
shows medians of the process's wall time (fork to exit) and peak RSS
(the child's own ``VmHWM`` from /proc, read as its last statement: rusage
of a child would include the parent's size from before ``exec``), and the ratio to a bare
``python -c pass``:

1. ``import edgeship.agent`` (and ``edgeship.agent.agent`` once it exists)
2. ``import edgeship.runtime``
3. load + verify + first inference of a small signed package (the 64-64-10
   MLP of tests/models.py), ONNX variant and TFLite variant; the child also
   reports the load and first-inference times it measured itself.

Writes ``benchmarks/out/startup.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LOAD_CODE = """
import json, time
t0 = time.perf_counter()
import numpy as np
from edgeship.runtime import load
t1 = time.perf_counter()
r = load({pkg!r}, backend={backend!r}, trusted_keys=[{pub!r}])
t2 = time.perf_counter()
r.run(np.zeros((1, 64), np.float32))
t3 = time.perf_counter()
print(json.dumps({{"import_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3, "first_ms": (t3 - t2) * 1e3,
                  "backend": r.backend}}))
"""


HWM = ("\nfor _l in open('/proc/self/status'):\n    if _l.startswith('VmHWM:'):\n"
       "        print('VmHWM', _l.split()[1])\n")


def measure(code: str, runs: int) -> dict:
    walls, rss, inner = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code + HWM], capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark child failed ({code[:60]!r}...):\n{proc.stderr[-2000:]}")
        lines = proc.stdout.strip().splitlines()
        rss.append(int(lines[-1].split()[1]) / 1024)  # KiB -> MiB
        if len(lines) > 1 and lines[-2].startswith("{"):
            inner.append(json.loads(lines[-2]))
    res = {"wall_ms": statistics.median(walls) * 1e3, "rss_mib": statistics.median(rss), "runs": runs}
    if inner:
        for key in ("import_ms", "load_ms", "first_ms"):
            res[key] = statistics.median(d[key] for d in inner)
        res["backend"] = inner[0]["backend"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    from models import make_mlp_onnx, make_mlp_tflite

    from edgeship import package as P
    from edgeship import signing

    tmp = Path(tempfile.mkdtemp(prefix="edgeship-startup-"))
    key, pub = signing.keygen(tmp / "bench.key")
    pkg = P.build(tmp / "mlp.edgepkg", {"model.onnx": make_mlp_onnx(tmp / "mlp.onnx"),
                                        "model.tflite": make_mlp_tflite(tmp / "mlp.tflite")},
                  name="mlp", version="1", example_input=None, signing_key=key)

    agent_import = "import edgeship.agent"
    if importlib.util.find_spec("edgeship.agent.agent") is not None:
        agent_import += "; import edgeship.agent.agent"
    cases = {
        "python -c pass": "pass",
        "import numpy": "import numpy",
        agent_import: agent_import,
        "import edgeship.runtime": "import edgeship.runtime",
        "load + first inference (onnxruntime)": LOAD_CODE.format(pkg=str(pkg), backend="onnxruntime", pub=str(pub)),
        "load + first inference (tflite)": LOAD_CODE.format(pkg=str(pkg), backend="tflite", pub=str(pub)),
    }
    results = {}
    for name, code in cases.items():
        results[name] = measure(code, args.runs)
        print(f"  measured: {name}", file=sys.stderr, flush=True)
    base = results["python -c pass"]
    try:
        load_avg = os.getloadavg()
    except OSError:
        load_avg = (float("nan"),) * 3
    print(f"startup benchmark: medians of {args.runs} fresh processes, {os.cpu_count()} cores, "
          f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    print(f"package: {pkg.stat().st_size} bytes, signed, verified at load")
    print()
    print(f"{'case':<48} {'wall ms':>8} {'x bare':>7} {'RSS MiB':>8} {'+MiB':>6}  in-process")
    for name, r in results.items():
        extra = ""
        if "load_ms" in r:
            extra = (f"import {r['import_ms']:.0f} ms, load+verify {r['load_ms']:.1f} ms, "
                     f"first run {r['first_ms']:.2f} ms [{r['backend']}]")
        print(f"{name:<48} {r['wall_ms']:8.0f} {r['wall_ms'] / base['wall_ms']:7.2f} {r['rss_mib']:8.1f} "
              f"{r['rss_mib'] - base['rss_mib']:6.1f}  {extra}")
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps({"results": results, "load_average": load_avg,
                                                  "cpus": os.cpu_count()}, indent=1))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
