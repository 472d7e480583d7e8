"""The README and docs/*.md run as written (issue 16, item 4), the way sqlite-utils keeps its docs tested.

Every fenced block of README.md and docs/*.md is listed in ``BLOCKS``, keyed
by (file, its first line): either it runs (shell commands one by one through
bash, Python blocks verbatim with ``python``), or it is skipped with the
reason written next to it. A block that is not listed fails
``test_every_doc_block_is_run_or_skipped_with_a_reason``, so a new README
command cannot go untested by accident.

The README tour runs in order in one empty temp dir with the checkout's
``examples/digits`` copied in (the tour starts "from a source checkout").
What may differ from a user's run is only this substitution table:

==============================  ===================================================
as written                      in the test, and why
==============================  ===================================================
``mqtt://broker:1883``          the Mosquitto fixture's URL (no broker named "broker")
``--state-dir state``           ``--state-dir state --port N``: a free API port
                                (8765 may be taken on a shared test machine)
``PREDICTION_ID``               the id of a real prediction, from ``POST /v1/infer``
                                to the agent the block started
``fleet console --db``          ``fleet console --port N --db``: a free port
==============================  ===================================================

Commands that run until stopped (``agent run``, ``fleet collect``, ``fleet
rollout start`` with a 30 min soak, ``fleet console``) are started in the
background, checked to be up (health endpoint, DB row, port), left running
for the rest of their block, then stopped with SIGTERM; they must exit 0
(or by that signal). ``HOME`` and ``EDGESHIP_FLEET_CONFIG`` point into the
temp dir so nothing is written to the user's home.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, wait_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

RUN = "run"
# (file, first line of the block) -> RUN, or the reason it is not run.
BLOCKS: dict[tuple[str, str], str] = {
    ("README.md", "workstation                         device (Pi)                       fleet side"):
        "a diagram, not a command",
    ("README.md", 'pip install -c constraints.txt -e ".[all]" && edgeship demo'):
        "installs into the current environment; the install is tested by tests/test_install.py and "
        "`edgeship demo` by tests/test_demo.py",
    ("README.md", 'pip install -c constraints.txt -e ".[all,test]" && python -m pytest -q'):
        "it is the test suite itself",
    ("README.md", "python examples/digits/prepare.py --out data --teacher-epochs 1    "
                  "# data/{train,calib,eval}.npz + a trained teacher.onnx"): RUN,
    ("README.md", "python -c \"import numpy as np; np.save('x.npy', np.load('data/eval.npz')['input'][:1])\"   "
                  "# an example input"): RUN,
    ("README.md", "import numpy as np"): RUN,  # both Python snippets (runtime, then Agent) start with it
    ("README.md", "edgeship agent config --example --package digits-1.0.0.edgepkg --state-dir state \\"): RUN,
    ("README.md", "edgeship fleet collect --broker mqtt://broker:1883 --db fleet.sqlite     "
                  "# until stopped; or --db postgresql://user@host/db"): RUN,
    ("docs/architecture.md", "{"): "the manifest's schema (JSON data with elisions), not a command",
    ("docs/field-loop.md", "edgeship demo --loop            # a few minutes on 2 cores; --fast for a shorter run"):
        "minutes of training and a simulated fleet; run end to end by tests/test_loop_demo.py (--fast)",
    ("docs/field-loop.md", "edgeship fleet export-feedback --db fleet.sqlite --out field.npz --labels labels.txt "
                           "--holdout 0.2"):
        "needs a fleet DB with field feedback; the command is run by tests/test_loop_export.py",
    ("docs/field-loop.md", "[field]"): "a recipe section (TOML), not a command; run by tests/test_loop_recipe.py",
    ("docs/adapt.md", "[adapt]"):
        "an agent config section (TOML), not a command; parsed by tests/test_adapt_choice.py",
    ("docs/field-loop.md", "edgeship fleet rollout start build/digits-1.1.0.edgepkg --db fleet.sqlite "
                           "--broker mqtt://broker:1883 --key dev.key \\"):
        "needs a broker and a fleet; these gates and on_insufficient=wait are run by tests/test_loop_rollout.py "
        "and tests/test_loop_demo.py",
    ("docs/architecture.md", "from edgeship.runtime import load, Runner, TensorSpec"):
        "an API signature listing (keyword-only markers, elided arguments), not runnable code",
    ("docs/raspberry-pi.md", "sudo apt-get install -y python3-venv"):
        "a Raspberry Pi as root: apt, /opt, a package index; the wheel route is tested by tests/test_install.py "
        "and the aarch64 install by tests/test_aarch64.py",
    ("docs/raspberry-pi.md", '/opt/edgeship/bin/pip install "edgeship[agent]" "numpy<2" tflite-runtime'):
        "installs an old runtime into /opt on a Pi",
    ("docs/raspberry-pi.md", "sudo useradd --system --home /var/lib/edgeship --shell /usr/sbin/nologin edgeship"):
        "root + systemd: creates a user and a unit; the unit's content is tested by tests/test_pi.py and "
        "`install-service --output` runs in the README tour",
    ("docs/raspberry-pi.md", "[Journal]"): "a journald.conf snippet, not a command",
    ("docs/raspberry-pi.md", "/var/lib/edgeship/results*.jsonl {"):
        "a logrotate snippet (edgeship.agent.service.LOGROTATE_SNIPPET), not a command",
    ("docs/raspberry-pi.md", "sudo systemctl stop edgeship-agent"): "root + systemd on a Pi: upgrades /opt/edgeship",
    ("docs/raspberry-pi.md", "# on the workstation, in the checkout"):
        "copies a wheel to a Pi with scp; the wheel route itself is tested by tests/test_install.py",
    ("docs/http-api.md", '{"x": [0.1, 0.2, ...]}                          # one sample: an array with the model '
                         "input's sample shape"): "request body formats (with elisions), tested in tests/test_agent_api.py",
    ("docs/http-api.md", '{"samples": [[...], [...], ...], "input": "raw"}'):
        "a request body with elisions; batches are tested in tests/test_agent_api.py",
    ("docs/http-api.md", "curl -s --data-binary @cat.png -H 'Content-Type: image/png' http://127.0.0.1:8765/v1/infer"):
        "needs a running agent on 8765 and a cat.png; image uploads are tested in tests/test_agent_api.py",
    ("docs/http-api.md", "curl -s -F image=@a.png -F image=@b.png -F deadline_ms=200 http://127.0.0.1:8765/v1/infer"):
        "needs a running agent on 8765 and two images; multipart is tested in tests/test_agent_api.py",
    ("docs/http-api.md", '{"prediction_id": "...", "source": "http", "ts": 1767225600.1, "model": {"name": "digits", '
                         '"version": "1.2.0", "sha256": "..."},'): "a response body, not a command",
    ("docs/http-api.md", '{"input": "raw", "count": 3, "errors": 1,'): "a response body, not a command",
    ("docs/http-api.md", '{"x": [[0.12, -0.40, ...], ...], "input": "model", "stream": "kitchen-mic"}'):
        "a request body with elisions; streams are tested in tests/test_model_shapes_agent.py",
    ("docs/http-api.md", '{"prediction_id": "...", "model": {"name": "det", "version": "1", "sha256": "..."}, '
                         '"latency_ms": 14.2,'): "a response body, not a command",
    ("docs/http-api.md", 'curl -s -H "Authorization: Bearer $(cat /etc/edgeship/api-token)" '
                         "http://127.0.0.1:8765/v1/health"):
        "needs a running agent with a token file in /etc; token auth is tested in tests/test_agent_api.py",
    ("docs/bring-your-own-model.md", "edgeship convert export examples/digits/model.py:Student "
                                     "--weights build/student.pt \\"):
        "runs green in the tour (30 s) but would put it past its 300 s timeout on a loaded machine; the same "
        "command form (file.py:Class + weights + --input specs, --target both) runs in tests/test_byo_export.py",
    ("docs/bring-your-own-model.md", "edgeship convert export build/pruned/pruned.onnx --target both "
                                     "--example x.npy --out digits-pruned.edgepkg"):
        "runs green in the tour (40 s) but would put it past its 300 s timeout on a loaded machine; the same "
        "command form (.onnx, --target both, --example) runs in tests/test_byo_export.py",
    ("docs/bring-your-own-model.md", "from edgeship import package, runtime"): RUN,
    ("docs/bring-your-own-model.md", '{"prediction_id":"3f2a-17","source":"cam","ts":1764752400.1,"model":{"name":'
                                     '"det","version":"1"},"latency_ms":14.2,"detections":[{"label":"dog","class":1,'
                                     '"score":0.91,"box":[12.0,40.5,88.0,120.0]}]}'):
        "a result line, not a command; postprocess answers in JSON lines are tested in tests/test_byo_sinks.py",
    ("docs/bring-your-own-model.md", "curl -s -X POST http://127.0.0.1:8765/v1/infer -d '{\"x\": [...], "
                                     "\"input\": \"model\", \"stream\": \"kitchen-mic\", \"reset\": true}'"):
        "needs a running agent with a stateful model; the reset option is tested in tests/test_byo_streams.py",
    ("docs/bring-your-own-model.md", '{"ids": [101, 2023, 2003, 0], "mask": [1, 1, 1, 0], "label": "positive"}'):
        "the lines of a .jsonl data file, not a command; .jsonl loading is tested in tests/test_byo_data.py",
    ("docs/keys.md", "edgeship package keygen packages-2026"): RUN,
    ("docs/secure-broker.md", "edgeship fleet device add kitchen-01 --passwd-file edgeship.passwd "
                              "--acl-file edgeship.acl"): RUN,
    ("docs/secure-broker.md", "pattern write edgeship/v1/+/devices/%u/#"):
        "the ACL edgeship writes (a file, not a command); tests/test_secure_broker.py runs a broker with it",
    ("docs/secure-broker.md", "edgeship fleet device broker-config --passwd-file /etc/mosquitto/edgeship.passwd "
                              "--acl-file /etc/mosquitto/edgeship.acl --cafile /etc/mosquitto/ca.pem "
                              "--certfile /etc/mosquitto/server.pem --keyfile /etc/mosquitto/server.key"): RUN,
    ("docs/secure-broker.md", "per_listener_settings false"):
        "a mosquitto.conf (printed by the command above), not a command",
    ("docs/secure-broker.md", "[mqtt]"): "an agent.toml snippet, not a command",
}

FENCE = re.compile(r"^```([\w-]*)\s*$")


def doc_blocks(rel: str) -> list[tuple[str, list[str], int]]:
    """Fenced blocks of one markdown file: (language, lines, line number of the fence)."""
    out, lang, lines, start = [], None, [], 0
    for no, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, lines, start = m.group(1), [], no
        elif lang is not None and line.rstrip() == "```":
            out.append((lang, lines, start))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def block_key(rel: str, lines: list[str]) -> tuple[str, str]:
    return rel, lines[0].rstrip() if lines else ""


def commands(lines: list[str]) -> list[str]:
    """Shell lines of a block, backslash continuations joined; blank and comment-only lines dropped."""
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def test_every_doc_block_is_run_or_skipped_with_a_reason():
    seen = set()
    for rel in DOC_FILES:
        for _lang, lines, no in doc_blocks(rel):
            key = block_key(rel, lines)
            assert key in BLOCKS, (f"{rel}:{no}: a new block ({lines[0] if lines else ''!r}) is neither run by "
                                   "tests/test_docs.py nor listed there as skipped with a reason")
            seen.add(key)
    stale = set(BLOCKS) - seen
    assert not stale, f"BLOCKS lists blocks that are no longer in the docs: {sorted(stale)}"
    for key, how in BLOCKS.items():
        assert how == RUN or len(how) > 15, f"{key}: say why it is skipped"


# ------------------------------------------------------------------ running the tour
class Tour:
    """One temp dir, the commands in order, background processes for the forever-commands."""

    def __init__(self, workdir: Path, broker_url: str) -> None:
        self.dir = workdir
        self.broker_url = broker_url
        self.api_port = free_port()
        self.console_port = free_port()
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "HOME": str(workdir / "home"), "EDGESHIP_FLEET_CONFIG": str(workdir / "home" / "fleet.toml"),
                    "PYTHONUNBUFFERED": "1"}
        (workdir / "home").mkdir()
        self.background: list[tuple[str, subprocess.Popen]] = []
        self.ran: list[str] = []
        self.times: list[tuple[str, float]] = []

    def substitute(self, cmd: str) -> str:
        cmd = cmd.replace("mqtt://broker:1883", self.broker_url)
        if cmd.startswith("edgeship agent config"):
            cmd = cmd.replace("--state-dir state", f"--state-dir state --port {self.api_port}")
        if "PREDICTION_ID" in cmd:
            cmd = cmd.replace("PREDICTION_ID", self.prediction_id())
        cmd = cmd.replace("fleet console --db", f"fleet console --port {self.console_port} --db")
        return cmd

    def prediction_id(self) -> str:
        x = [[0.0] * 8] * 8  # one raw 8x8 digit
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/v1/infer", data=json.dumps(x).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["prediction_id"]

    def _agent_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/v1/health", timeout=2) as r:
                return json.loads(r.read())["status"] in ("ok", "degraded")
        except OSError:
            return False

    def _rollout_ready(self) -> bool:
        from edgeship.fleet.db import FleetDB

        db = FleetDB.open(self.dir / "fleet.sqlite")
        try:
            return db.rollout_get("tour") is not None
        finally:
            db.close()

    def forever(self, cmd: str):
        """The readiness check of a command that runs until stopped, or None for one that ends."""
        if cmd.startswith("edgeship agent run"):
            return self._agent_ready
        if cmd.startswith("edgeship fleet collect"):
            return lambda: (self.dir / "fleet.sqlite").exists()
        if cmd.startswith("edgeship fleet rollout start"):
            return self._rollout_ready
        if cmd.startswith("edgeship fleet console --"):
            return lambda: wait_port("127.0.0.1", self.console_port, timeout=0.5)
        return None

    def shell(self, cmd: str) -> None:
        run = self.substitute(cmd)
        t0 = time.monotonic()
        ready = self.forever(cmd)
        if ready is not None:
            proc = subprocess.Popen(["bash", "-c", f"exec {run}"], cwd=self.dir, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            self.background.append((cmd, proc))

            def up():
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    raise AssertionError(f"{cmd!r} exited ({proc.returncode}) instead of running:\n{out}\n{err}")
                return ready()
            assert wait_until(up, 120, step=0.2), f"{cmd!r} did not come up in 120 s"
        else:
            proc = subprocess.run(["bash", "-c", run], cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{cmd!r} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        self.ran.append(cmd)
        self.times.append((cmd.split("#")[0][:60], time.monotonic() - t0))

    def python(self, lines: list[str], no: int) -> None:
        path = self.dir / f"snippet_{no}.py"
        path.write_text("\n".join(lines) + "\n")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(path)], cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"the Python block at line {no} failed:\n{proc.stdout}\n{proc.stderr}"
        self.ran.append(f"python block at line {no}")
        self.times.append((f"python block at line {no}", time.monotonic() - t0))

    def end_block(self) -> None:
        """Stop what the block left running, newest first; each must stop cleanly."""
        while self.background:
            cmd, proc = self.background.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"{cmd!r} did not stop within 60 s of SIGTERM:\n{err[-3000:]}") from None
            assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), \
                f"{cmd!r} ended with {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"


def run_doc(rel: str, tour: Tour) -> None:
    for lang, lines, no in doc_blocks(rel):
        if BLOCKS.get(block_key(rel, lines)) != RUN:
            continue
        try:
            if lang == "python":
                tour.python(lines, no)
            else:
                for cmd in commands(lines):
                    tour.shell(cmd)
        finally:
            tour.end_block()


@pytest.mark.slow
@pytest.mark.mqtt
def test_readme_tour_runs_as_written(tmp_path, mosquitto):
    (tmp_path / "examples").mkdir()
    shutil.copytree(ROOT / "examples" / "digits", tmp_path / "examples" / "digits",
                    ignore=shutil.ignore_patterns("data", "build", ".cache", "__pycache__"))
    tour = Tour(tmp_path, mosquitto.url)
    t0 = time.monotonic()
    for rel in DOC_FILES:  # README first: the docs' commands may use what the tour made
        run_doc(rel, tour)
    total = time.monotonic() - t0
    print(f"README tour: {len(tour.ran)} commands/snippets in {total:.0f} s")
    for what, s in tour.times:
        print(f"  {s:6.1f} s  {what}")
    assert any(c.startswith("edgeship convert quantize") for c in tour.ran)
    assert (tmp_path / "digits-int8.edgepkg").is_file() and (tmp_path / "digits-1.0.0.edgepkg").is_file()
    assert (tmp_path / "edgeship-agent.service").is_file()
