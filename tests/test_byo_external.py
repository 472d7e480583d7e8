"""#20 item 1: ONNX external data (``model.onnx`` + ``model.onnx.data``) is carried inline, or refused.

The package builder inlines the weights; verify, unpack and the runtime
refuse a graph whose weights live in a file outside it. Every case runs the
real builder, onnxruntime and the CLI in a subprocess.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from models import make_mlp_onnx, mlp_reference

from edgeship import package as pkgmod
from edgeship import runtime
from edgeship._onnx_external import external_refs
from edgeship.errors import ConfigError, IntegrityError


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", *args], capture_output=True, text=True,
                          timeout=280, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess, *, only: bool = True) -> str:
    """The CLI's one ``error:`` line and no traceback; with ``only``, nothing else on stderr either
    (``only=False`` where torch/LiteRT log their own start-up lines first)."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: ")]
    if not only:
        lines = [ln for ln in lines if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def external_mlp(folder, name: str = "model.onnx"):
    """The digits MLP saved the way torch's dynamo exporter saves weights: graph + ``<name>.data``."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    src = make_mlp_onnx(folder / "inline.onnx")
    m = onnx.load(str(src))
    onnx.save(m, str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{name}.data", size_threshold=0)
    src.unlink()
    return folder / name


def old_style_package(tmp_path, monkeypatch, extra_files=None):
    """A package as edgeship built it before #20: the graph alone, its weights left behind."""
    model = external_mlp(tmp_path / "src")
    monkeypatch.setattr(pkgmod, "_self_contained_onnx", lambda data, src: data)
    monkeypatch.chdir(model.parent)  # where onnxruntime found the weights when the package was built
    out = pkgmod.build(tmp_path / "old.edgepkg", model, name="old", version="1", extra_files=extra_files)
    monkeypatch.undo()
    return out


def test_external_refs_reads_the_graph_without_onnx(tmp_path):
    model = external_mlp(tmp_path)
    refs = external_refs(model.read_bytes())
    assert sorted(r.tensor for r in refs) == ["B1", "B2", "W1", "W2"]
    assert {r.location for r in refs} == {"model.onnx.data"}
    assert external_refs(make_mlp_onnx(tmp_path / "inline.onnx").read_bytes()) == []
    assert external_refs(b"\xff\xff\xff") is None  # not a protobuf: no claim either way


def test_build_inlines_external_data_and_the_package_loads_anywhere(tmp_path, monkeypatch):
    model = external_mlp(tmp_path / "src")
    graph_only = model.stat().st_size
    pkg_path = pkgmod.build(tmp_path / "m.edgepkg", model, name="m", version="1")
    # The package is moved away from the data file and loaded from another directory.
    moved = tmp_path / "elsewhere" / "m.edgepkg"
    moved.parent.mkdir()
    shutil.move(pkg_path, moved)
    shutil.rmtree(tmp_path / "src")
    monkeypatch.chdir(moved.parent)
    pkg = pkgmod.verify(moved)
    assert pkg.files["model.onnx"]["size"] > graph_only + 4 * 64 * 64  # the weights are in the member
    assert external_refs(pkg.read("model.onnx")) == []
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with runtime.load(moved) as r:
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-4)
    dest = pkgmod.unpack(moved, tmp_path / "store" / "m")
    with runtime.load(dest) as r:
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-4)


def test_build_refuses_missing_external_data_and_writes_nothing(tmp_path):
    model = external_mlp(tmp_path / "src")
    (tmp_path / "src" / "model.onnx.data").unlink()
    out = tmp_path / "m.edgepkg"
    with pytest.raises(ConfigError, match="model.onnx.data"):
        pkgmod.build(out, model, name="m", version="1")
    assert not out.exists()
    line = one_error_line(run("package", "build", str(model), "--name", "m", "--version", "1", "-o", str(out),
                              cwd=tmp_path))
    assert "external data file(s) model.onnx.data" in line and "no package written" in line
    assert not out.exists() and not list(tmp_path.glob("*.edgepkg"))


def test_verify_refuses_a_graph_whose_external_data_is_not_in_the_package(tmp_path, monkeypatch):
    old = old_style_package(tmp_path, monkeypatch)
    with pytest.raises(IntegrityError, match="external data file model.onnx.data, which is not in the package"):
        pkgmod.verify(old)
    line = one_error_line(run("package", "verify", str(old), cwd=tmp_path))
    assert "model.onnx.data" in line and "not in the package" in line
    # The runtime and the store refuse it too (even from the folder where the data file lies).
    monkeypatch.chdir(tmp_path / "src")
    with pytest.raises(IntegrityError, match="not in the package"):
        runtime.load(old)
    with pytest.raises(IntegrityError, match="not in the package"):
        pkgmod.unpack(old, tmp_path / "store" / "old")
    assert not (tmp_path / "store" / "old").exists()


def test_verify_refuses_external_data_shipped_beside_the_graph(tmp_path, monkeypatch):
    """Carrying the data file as another member is not enough: the runtime loads the graph from memory."""
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\0" * 16)
    old = old_style_package(tmp_path, monkeypatch, extra_files={"model.onnx.data": data})
    with zipfile.ZipFile(old) as zf:
        assert "model.onnx.data" in zf.namelist()
    with pytest.raises(IntegrityError, match="is in the package, but edgeship loads a graph from memory"):
        pkgmod.verify(old)


@pytest.mark.slow
def test_dynamo_export_with_external_data_builds_a_self_contained_package(tmp_path):
    """The real thing: torch's dynamo exporter writes model.onnx + model.onnx.data; the package carries both."""
    import torch

    from edgeship.converters.onnx_export import export_onnx
    from edgeship.demo_data.zoo import ResNetLike

    torch.manual_seed(0)
    model = ResNetLike(width=8).eval()
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    info = export_onnx(model, x, tmp_path / "src" / "model.onnx", exporter="dynamo", external_data=True)
    assert (tmp_path / "src" / "model.onnx.data").is_file()
    assert not list((tmp_path / "src").glob(".*"))  # no temporary left behind
    assert external_refs(info["path"].read_bytes())
    pkg = pkgmod.build(tmp_path / "r.edgepkg", info["path"], name="r", version="1")
    shutil.rmtree(tmp_path / "src")
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    with runtime.load(pkg) as r:
        np.testing.assert_allclose(next(iter(r.run(x).values())), want, atol=1e-4)
