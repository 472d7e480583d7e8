"""Run every benchmark and regenerate benchmarks/README.md from what they print.

    python benchmarks/run_all.py                 # all of them (~15-25 min on 2 cores)
    python benchmarks/run_all.py agent outbox    # only these

Each benchmark is a script in this folder that prints its figures (ratios
measured in one run) and exits 0. This script runs them one after another on
an otherwise idle machine, so they do not measure each other, and writes the
README: the machine, then for each benchmark the command that reproduces it
and what it printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Order: cheap and foundational first. Name -> (script, what it measures, issue).
BENCHMARKS = {
    "startup": ("startup.py", "import time and RSS of the agent; load + first inference", "foundation"),
    "quantize": ("quantize.py", "int8 vs fp32: size, latency, accuracy; auto-mode choices", "quantization"),
    "distill": ("distill.py", "teacher vs distilled vs plainly trained student", "distillation"),
    "agent": ("agent.py", "agent vs hand-written loops; request overhead; deadlines; RSS", "device agent"),
    "outbox": ("outbox.py", "outbox enqueue/flush, collector ingest, latency with the broker down", "telemetry"),
    "switch": ("switch.py", "zero-drop model switch time under steady load", "rollout"),
    "variant_load": ("variant_load.py", "load and switch to an 80 MB variant of an installed package", "verify once"),
    "collectors": ("collectors.py", "one vs two collectors on a shared subscription", "scale"),
    "drift": ("drift.py", "drift scores: clean vs shifted inputs", "monitoring"),
    "variant_choice": ("variant_choice.py", "start-up variant choice: per-variant timings and the served variant",
                       "device agent"),
    "adapt": ("adapt.py", "variant choice under a latency budget and CPU load", "monitoring"),
    "prune": ("prune.py", "channel pruning: accuracy/size/latency over ratios", "monitoring"),
    "console": ("console.py", "console page load with 1,000 devices / 100,000 telemetry rows", "console"),
    "loop": ("loop.py", "field loop: shift → retrain on field corrections → rollout; feedback, accuracy, curve",
             "field loop"),
}


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    import numpy

    versions = [f"numpy {numpy.__version__}"]
    for mod in ("onnxruntime", "torch"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem} RAM, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def run(name: str, timeout: float) -> tuple[int, str, float]:
    script, _, _ = BENCHMARKS[name]
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(HERE / script)], capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parent)
        out = proc.stdout + (f"\n[stderr tail]\n{proc.stderr[-1500:]}" if proc.returncode else "")
        return proc.returncode, out, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n[timed out after {timeout:.0f} s]", time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per benchmark")
    ap.add_argument("--readme", default=str(HERE / "README.md"))
    args = ap.parse_args(argv)
    names = args.names or [n for n, (s, _, _) in BENCHMARKS.items() if (HERE / s).exists()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    readme = Path(args.readme)
    # Keep sections of benchmarks not re-run this time.
    sections = _read_sections(readme)
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        rc, out, secs = run(name, args.timeout)
        print(out, flush=True)
        failed += rc != 0
        script, what, issue = BENCHMARKS[name]
        status = "" if rc == 0 else f" — **exit {rc}**"
        sections[name] = (f"## {name} ({issue}): {what}\n\n"
                          f"`python benchmarks/{script}` — {secs:.0f} s, "
                          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}{status}\n\n```\n{out.strip()}\n```\n")
    body = ["# Benchmarks\n",
            "Every figure edgeship claims, each with the command that reproduces it. "
            "Regenerate this page with `python benchmarks/run_all.py` on an idle machine "
            "(benchmarks measure ratios within one run, so they stay comparable across machines).\n",
            f"Measured on: {machine()}.\n"]
    body += [sections[n] for n in BENCHMARKS if n in sections]
    readme.write_text("\n".join(body))
    print(f"wrote {readme}")
    return 1 if failed else 0


def _read_sections(readme: Path) -> dict[str, str]:
    if not readme.exists():
        return {}
    out: dict[str, str] = {}
    current = None
    for chunk in readme.read_text().split("\n## ")[1:]:
        current = chunk.split(" ", 1)[0]
        if current in BENCHMARKS:
            out[current] = "## " + chunk.rstrip() + "\n"
    return out


if __name__ == "__main__":
    sys.exit(main())
