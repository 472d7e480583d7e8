"""What the aarch64 check does inside the arm64 chroot (run by its system python3, stdlib only).

    python3 aarch64-job.py JOB [VENV]   (VENV: $EDGESHIP_VENV, else /opt/venv)

JOB holds what tests/test_aarch64.py prepared on the host: ``dist/edgeship-*.whl``,
``tiny.edgepkg`` (the same MLP as ONNX and as TFLite), ``int8.tflite``, ``x.npy``,
``ref.npy`` (numpy's logits), ``ref_int8_host.npy`` (the host runtime's int8
logits), ``agent.toml`` and its inputs. Steps, each timed: ``pip install
edgeship-*.whl[agent,tflite]`` into an empty venv (as a Pi user installs the
wheel), ``import edgeship.agent``, ``edgeship bench`` on each backend,
``edgeship agent run --until-done``, and ``edgeship.runtime`` on the ONNX,
TFLite and int8 TFLite models. Everything lands in ``JOB/out``;
``figures.json`` is written last and only when every step passed, and the
test reads it.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import subprocess
import sys
import time

JOB = sys.argv[1] if len(sys.argv) > 1 else "/job"
VENV = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("EDGESHIP_VENV", "/opt/venv")
OUT = os.path.join(JOB, "out")
BIN = os.path.join(VENV, "bin")

# Runs in the venv: the runtime API on every model, compared with numpy's answer.
RUNTIME_CHECK = r"""
import json, sys, numpy as np
from edgeship.runtime import load
job = sys.argv[1]
x = np.load(job + "/x.npy")
out = {}
# The float models against numpy's answer; the int8 model against what the host's runtime answered.
for what, path, backend, ref in (("onnx", "tiny.edgepkg", "onnxruntime", "ref.npy"),
                                 ("tflite", "tiny.edgepkg", "tflite", "ref.npy"),
                                 ("tflite_int8", "int8.tflite", None, "ref_int8_host.npy")):
    ref = np.load(job + "/" + ref)
    with load(job + "/" + path, backend=backend) as runner:
        y = runner.run({runner.inputs[0].name: x})
        logits = np.asarray(next(iter(y.values())), dtype=np.float32)
        out[what] = {"backend": runner.backend, "max_abs_err": float(np.abs(logits - ref).max()),
                     "argmax_agree": float((logits.argmax(1) == ref.argmax(1)).mean())}
print(json.dumps(out))
"""


def step(name: str, args: list[str], timeout: float, **kw) -> tuple[float, str]:
    """Run one step; its output goes to out/NAME.log. Returns (seconds, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    took = time.perf_counter() - t0
    with open(os.path.join(OUT, f"{name}.log"), "w") as f:
        f.write(f"$ {' '.join(args)}\n# exit {proc.returncode} after {took:.1f} s\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        sys.exit(f"aarch64 job: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"aarch64 job: {name} {took:.1f} s", flush=True)
    return took, proc.stdout


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    fig: dict = {"machine": platform.machine(), "python": platform.python_version()}
    wheel = glob.glob(os.path.join(JOB, "dist", "edgeship-*.whl"))
    if len(wheel) != 1:
        sys.exit(f"aarch64 job: expected one edgeship wheel in {JOB}/dist, found {wheel}")
    # .ci/aarch64 ships an empty venv in its cached rootfs (python3 -m venv costs minutes under qemu).
    if not os.path.exists(os.path.join(BIN, "python")):
        fig["venv_s"], _ = step("venv", [sys.executable, "-m", "venv", VENV], 600)
    # --no-compile: byte-compiling every installed module costs minutes under emulation; the
    # modules the agent uses are compiled on first import (import_Agent_first_s below).
    fig["install_s"], _ = step("install", [f"{BIN}/pip", "install", "--no-compile", "--progress-bar", "off",
                                           f"{wheel[0]}[agent,tflite]"], 1500)
    _, listing = step("pip-list", [f"{BIN}/pip", "list", "--format", "json"], 300)
    fig["versions"] = {p["name"].lower(): p["version"] for p in json.loads(listing)}
    _, wheels = step("pip-inspect", [f"{BIN}/python", "-c", (
        "import importlib.metadata as m, json;"
        "print(json.dumps({d: [l for l in (m.distribution(d).read_text('WHEEL') or '').splitlines()"
        " if l.startswith('Tag:')] for d in ('onnxruntime', 'ai-edge-litert', 'numpy')}))")], 300)
    fig["wheel_tags"] = json.loads(wheels)
    # `import edgeship.agent` is lazy by design; `from edgeship.agent import Agent` loads the agent
    # (numpy, sources, batcher, store). Twice: the first run compiles .pyc, the second is what a restart pays.
    for key, stmt in (("import_agent_s", "import edgeship.agent"),
                      ("import_Agent_first_s", "from edgeship.agent import Agent"),
                      ("import_Agent_s", "from edgeship.agent import Agent")):
        _, t = step("import", [f"{BIN}/python", "-c", (
            f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)")], 300)
        fig[key] = float(t)
    fig["import_Agent_process_s"], _ = step("import-process", [f"{BIN}/python", "-c",
                                                               "from edgeship.agent import Agent"], 300)
    fig["bench"] = {}
    for backend in ("onnxruntime", "tflite"):
        took, text = step(f"bench-{backend}", [f"{BIN}/edgeship", "bench", f"{JOB}/tiny.edgepkg", "--json",
                                              "--backend", backend, "--seconds", "0.3"], 900)
        b = json.loads(text)
        fig["bench"][backend] = {"wall_s": took, "backend": b["backend"], "load_s": b["load_s"],
                                 "warmup_s": b["warmup_s"], "raw_p50_ms_b1": b["raw_latency_ms_b1"]["p50"],
                                 "agent_p50_ms_b1": b["agent_latency_ms_b1"]["p50"], "device": b["device"]}
    started = time.time()
    fig["agent_run_s"], _ = step("agent-run", [f"{BIN}/edgeship", "agent", "run", "--config", f"{JOB}/agent.toml",
                                               "--until-done"], 900, cwd=JOB)
    with open(os.path.join(OUT, "results.jsonl")) as f:
        first = min(json.loads(line)["ts"] for line in f if line.strip())
    # From launching `edgeship agent run` to the first answer written (interpreter, imports, load, warm-up).
    fig["agent_first_result_s"] = first - started
    _, text = step("runtime", [f"{BIN}/python", "-c", RUNTIME_CHECK, JOB], 600)
    fig["runtime"] = json.loads(text)
    tmp = os.path.join(OUT, "figures.json.tmp")
    with open(tmp, "w") as f:
        json.dump(fig, f, indent=1)
    os.replace(tmp, os.path.join(OUT, "figures.json"))


if __name__ == "__main__":
    main()
