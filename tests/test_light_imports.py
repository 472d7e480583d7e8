"""Device weight: the agent and the runtime never import torch, TensorFlow, onnx or the converters.

Checked in a fresh interpreter (``sys.modules`` of the test process is
polluted by other tests). The list of agent modules grows as the agent does:
every module under ``edgeship.agent`` that exists is imported.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "tensorflow", "onnx", "edgeship.converters", "litert_torch", "ai_edge_quantizer", "jax")

_PROBE = r"""
import importlib, json, pkgutil, sys
targets = sys.argv[1:]
for t in targets:
    importlib.import_module(t)
    if t == "edgeship.agent":
        import edgeship.agent as agent
        # Every agent module present now and later (agent.py, store.py, ...): importing it stays light too.
        for info in pkgutil.iter_modules(agent.__path__):
            importlib.import_module(f"edgeship.agent.{info.name}")
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in {"torch", "tensorflow", "onnx", "litert_torch", "ai_edge_quantizer", "jax"}
               or m.startswith("edgeship.converters"))
print(json.dumps(heavy))
"""


def _heavy_after(*modules: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["edgeship", "edgeship.runtime", "edgeship.package", "edgeship.agent"])
def test_import_stays_light(module):
    assert _heavy_after(module) == []


def test_agent_main_module_stays_light():
    import importlib.util

    if importlib.util.find_spec("edgeship.agent.agent") is None:
        pytest.skip("edgeship.agent.agent does not exist yet")
    assert _heavy_after("edgeship.agent.agent") == []


def test_loading_and_running_models_stays_light(tmp_path):
    """Loading a package and running both runtimes (what the agent does) imports no converter tooling."""
    from models import make_mlp_onnx, make_mlp_tflite

    from edgeship import package as P

    pkg = P.build(tmp_path / "m.edgepkg", {"model.onnx": make_mlp_onnx(tmp_path / "m.onnx"),
                                          "model.tflite": make_mlp_tflite(tmp_path / "m.tflite")},
                  name="m", version="1")
    code = ("import json, sys, numpy as np\n"
            "from edgeship.runtime import load\n"
            f"for b in ('onnxruntime', 'tflite'):\n"
            f"    load({str(pkg)!r}, backend=b).run(np.zeros((2, 64), np.float32))\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{set(h for h in HEAVY if '.' not in h)!r} or m.startswith('edgeship.converters'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_ai_edge_litert_does_not_pull_tensorflow():
    proc = subprocess.run([sys.executable, "-c", "import sys, ai_edge_litert.interpreter; "
                           "print(any(m.split('.')[0] == 'tensorflow' for m in sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named 'ai_edge_litert'" in proc.stderr:
        pytest.skip("ai_edge_litert is not installed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def _requirement_closure(extra: str) -> set[str]:
    """Installed distributions reachable from edgeship's ``extra`` requirements (by installed metadata)."""
    import importlib.metadata as md
    import re

    def name_of(req: str) -> str:
        return re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")

    def active(req: str, extras: set[str]) -> bool:
        if ";" not in req:
            return True
        marker = req.split(";", 1)[1]
        if "extra" in marker:
            return any(f'extra == "{e}"' in marker for e in extras)
        return "python_version < \"3" not in marker  # platform markers: count them (conservative)

    seen: set[str] = set()
    todo = [name_of(r) for r in md.requires("edgeship") or [] if active(r, {extra}) or ";" not in r]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo.extend(name_of(r) for r in reqs if active(r, set()))
    return seen


@pytest.mark.parametrize("extra", ["agent", "tflite"])
def test_device_extras_do_not_pull_torch_or_tensorflow(extra):
    closure = _requirement_closure(extra)
    assert "onnxruntime" in closure or extra != "agent"
    assert not closure & {"torch", "tensorflow", "tensorflow-cpu", "tf-nightly", "jax", "onnx", "litert-torch"}, closure
