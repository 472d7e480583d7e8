"""The Raspberry Pi path for real: edgeship's wheel in an aarch64 Python 3.11.

`.ci/aarch64` gives a Debian bookworm arm64 rootfs (what Raspberry Pi OS 64-bit
is built on) run under qemu-user; `.ci/aarch64-job.py` runs inside it. Here,
on the host, we build what a workstation would ship: the wheel (`pip wheel`)
and a small package made from a numpy-built MLP (ONNX + TFLite, no torch),
plus the inputs and the agent config. The chroot installs
`edgeship-*.whl[agent,tflite]` into a fresh venv with pip from the registry, runs
`edgeship bench` on both backends, `edgeship agent run --until-done` over a
jsonl and a folder source, and `edgeship.runtime` on ONNX, TFLite and int8
TFLite; this test checks what came back.

Skips only when the machine cannot do it (`.ci/aarch64` exits 77: not root,
no binfmt); everything else is a failure. Cold, the rootfs costs a
debootstrap (minutes, cached afterwards under /var/cache/edgeship-aarch64).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp_int8_tflite, make_mlp_onnx, make_mlp_tflite, mlp_reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "aarch64"
SKIP = 77
LABELS = [f"c{i}" for i in range(10)]
JSONL_ROWS = 40
FOLDER_FILES = 6

pytestmark = [pytest.mark.aarch64, pytest.mark.network, pytest.mark.slow]


def _ci(*args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not the SIGKILL subprocess.run sends: the script then unmounts and removes its chroot.
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        raise AssertionError(f".ci/aarch64 {' '.join(args)} took over {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, or new and not ignored). pip builds a wheel
    in the tree it is given, and setuptools' build/ there keeps modules that were since deleted."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, timeout=60, check=False)
    if listing.returncode != 0:  # not a git checkout (an unpacked sdist): copy all but build output
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                  "__pycache__"))
        return dest
    for name in filter(None, listing.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _prepare_job(job: Path) -> None:
    """The wheel, the package, the inputs and the agent config: what a workstation ships to a Pi."""
    from edgeship import package
    from edgeship.runtime import load

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(_source_copy(job / "src")),
                           "-w", str(job / "dist")], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = job / "models"
    onnx_path = make_mlp_onnx(models / "mlp.onnx")
    tflite_path = make_mlp_tflite(models / "mlp.tflite")
    int8_path = make_mlp_int8_tflite(job / "int8.tflite")
    package.build(job / "tiny.edgepkg", [onnx_path, tflite_path], name="tiny", version="1.0.0", labels=LABELS,
                  example_input=np.zeros((1, 64), np.float32))
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(16, 64)).astype(np.float32)
    np.save(job / "x.npy", x)
    np.save(job / "ref.npy", mlp_reference(x))
    with load(int8_path) as runner:
        np.save(job / "ref_int8_host.npy", runner.run({runner.inputs[0].name: x})[runner.output_names[0]])
    rows = rng.uniform(-1, 1, size=(JSONL_ROWS, 64)).astype(np.float32)
    (job / "rows.jsonl").write_text("".join(json.dumps([round(float(v), 6) for v in r]) + "\n" for r in rows))
    (job / "incoming").mkdir()
    for i in range(FOLDER_FILES):
        np.save(job / "incoming" / f"s{i}.npy", rows[i])
    # Paths are relative to the config file, so the config works wherever the job is mounted.
    (job / "agent.toml").write_text(
        '[agent]\ndevice_id = "pi-aarch64"\nstate_dir = "state"\npackage = "tiny.edgepkg"\n'
        'allow_unsigned = true  # an unsigned test package: this check is about the platform\n'
        '[api]\nenabled = false\n[rollout]\nenabled = false\n'
        '[[sources]]\ntype = "jsonl"\nid = "rows"\npath = "rows.jsonl"\n'
        '[[sources]]\ntype = "folder"\nid = "files"\npath = "incoming"\nwatch = false\n'
        '[[sinks]]\ntype = "jsonl"\npath = "out/results.jsonl"\n')
    (job / "out").mkdir()
    shutil.copy(ROOT / ".ci" / "aarch64-job.py", job / "job.py")


@pytest.fixture(scope="module")
def aarch64_run(tmp_path_factory):
    # Cold this includes debootstrap (a few minutes); cached it is the tar unpack only.
    prep = _ci("prepare", timeout=1800)
    if prep.returncode == SKIP:
        pytest.skip(prep.stderr.strip().splitlines()[-1])
    assert prep.returncode == 0, prep.stderr[-3000:]
    job = tmp_path_factory.mktemp("aarch64-job")
    _prepare_job(job)
    proc = _ci("run", str(job), "python3", "/job/job.py", "/job", timeout=2400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    figures = json.loads((job / "out" / "figures.json").read_text())
    # The figures this check reports (install, import, first result), in the test log with -s / -rA.
    print(json.dumps(figures, indent=1))
    return job, figures


@pytest.mark.timeout(2700)
def test_wheel_installs_the_agent_extra_on_aarch64(aarch64_run):
    _, fig = aarch64_run
    assert fig["machine"] == "aarch64" and fig["python"].startswith("3.11"), fig
    versions = fig["versions"]
    assert {"edgeship", "onnxruntime", "ai-edge-litert", "numpy", "paho-mqtt"} <= set(versions), versions
    # The device stays light: the agent extra never pulls the workstation stack.
    assert not set(versions) & {"torch", "tensorflow", "onnx", "jax", "jaxlib"}, versions
    # ai-edge-litert's 2.x line does ship Linux aarch64 wheels (docs/raspberry-pi.md says which).
    assert int(versions["ai-edge-litert"].split(".")[0]) >= 2, versions["ai-edge-litert"]
    assert all(t.endswith("aarch64") for tags in fig["wheel_tags"].values() for t in tags), fig["wheel_tags"]


@pytest.mark.timeout(2700)
def test_bench_runs_both_backends_on_aarch64(aarch64_run):
    _, fig = aarch64_run
    for backend, b in fig["bench"].items():
        assert b["device"]["machine"] == "aarch64"
        assert b["backend"].startswith("onnxruntime" if backend == "onnxruntime" else "ai_edge_litert"), b
        assert b["load_s"] > 0 and 0 < b["raw_p50_ms_b1"] and 0 < b["agent_p50_ms_b1"], b


@pytest.mark.timeout(2700)
def test_agent_run_answers_every_input_on_aarch64(aarch64_run):
    job, fig = aarch64_run
    rows = [json.loads(line) for line in (job / "out" / "results.jsonl").read_text().splitlines()]
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
        assert r["label"] in LABELS, r
    assert by_source == {"rows": JSONL_ROWS, "files": FOLDER_FILES}, by_source
    assert 0 < fig["agent_first_result_s"] < fig["agent_run_s"], fig


@pytest.mark.timeout(2700)
def test_runtime_runs_onnx_and_tflite_on_aarch64(aarch64_run):
    job, fig = aarch64_run
    rt = fig["runtime"]
    assert rt["onnx"]["backend"].startswith("onnxruntime") and rt["tflite"]["backend"].startswith("ai_edge_litert")
    for what in ("onnx", "tflite"):
        assert rt[what]["max_abs_err"] < 1e-4 and rt[what]["argmax_agree"] == 1.0, (what, rt[what])
    # int8 kernels differ between x86 and ARM builds by at most rounding: one output step.
    ref = np.load(job / "ref_int8_host.npy")
    step = np.diff(np.unique(ref)).min()
    assert rt["tflite_int8"]["max_abs_err"] <= 1.01 * step, (rt["tflite_int8"], step)


def test_script_refuses_without_a_command():
    # Cheap and runs everywhere: the script's usage errors are one line and a non-zero status.
    proc = _ci("run", timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "aarch64: usage: .ci/aarch64 run JOB CMD...", proc.stderr
    assert os.access(SCRIPT, os.X_OK)
