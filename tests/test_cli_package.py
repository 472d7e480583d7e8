"""``edgeship package ...`` through the real CLI in a subprocess: exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from models import make_mlp_onnx


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeship.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: ")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_pkg")
    make_mlp_onnx(d / "mlp.onnx")
    (d / "labels.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    np.save(d / "x.npy", np.zeros((1, 64), np.float32))
    (d / "report.json").write_text(json.dumps({"top1": 0.95}))
    assert run("package", "keygen", str(d / "dev")).returncode == 0
    assert run("package", "keygen", str(d / "other")).returncode == 0
    return d


def test_version_and_help():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("edgeship, version ")
    proc = run("package", "--help")
    assert proc.returncode == 0
    for cmd in ("keygen", "build", "sign", "verify", "inspect"):
        assert cmd in proc.stdout


def test_keygen_writes_private_key_0600(work):
    assert (work / "dev.key").stat().st_mode & 0o777 == 0o600
    assert (work / "dev.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert_one_line_error(run("package", "keygen", str(work / "dev")), "already exists")


def test_build_sign_verify_inspect(work):
    out = work / "mlp.edgepkg"
    proc = run("package", "build", str(work / "mlp.onnx"), "-o", str(out), "--name", "mlp", "--version", "1.0",
               "--labels", str(work / "labels.txt"), "--preprocess-json", '{"scale": 0.5}',
               "--example-input", str(work / "x.npy"), "--report", str(work / "report.json"))
    assert proc.returncode == 0, proc.stderr
    assert "unsigned" in proc.stdout
    # unsigned + keys -> refused, one line
    assert_one_line_error(run("package", "verify", str(out), "--key", str(work / "dev.pub")), "not signed")
    assert run("package", "verify", str(out)).returncode == 0
    proc = run("package", "sign", str(out), "--key", str(work / "dev.key"))
    assert proc.returncode == 0, proc.stderr
    proc = run("package", "verify", str(out), "--key", str(work / "dev.pub"))
    assert proc.returncode == 0 and proc.stdout.startswith("ok: mlp 1.0 ") and "signed by trusted key" in proc.stdout
    assert_one_line_error(run("package", "verify", str(out), "--key", str(work / "other.pub")),
                          "does not verify with any trusted key")
    proc = run("package", "inspect", str(out), "--json")
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert info["signed"] and info["labels"][0] == "c0" and info["preprocess"] == {"scale": 0.5}
    assert info["variants"][0]["id"] == "onnx-fp32"
    proc = run("package", "inspect", str(out))
    assert proc.returncode == 0 and "input: float32[batch, 64]" in proc.stdout and "signed     yes" in proc.stdout


def test_build_signed_from_toml(work):
    cfg = work / "pkg.toml"
    cfg.write_text('name = "digits"\nversion = "2.0"\nmodel = "mlp.onnx"\nlabels = "labels.txt"\n'
                   'output = "digits.edgepkg"\nkey = "dev.key"\n[provenance]\nteacher = "resnet"\n')
    proc = run("package", "build", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert run("package", "verify", str(work / "digits.edgepkg"), "--key", str(work / "dev.pub")).returncode == 0


def test_tampered_package_fails_verify_with_one_line(work, tmp_path):
    good = work / "t.edgepkg"
    assert run("package", "build", str(work / "mlp.onnx"), "-o", str(good), "--name", "t", "--version", "1",
               "--key", str(work / "dev.key")).returncode == 0
    bad = tmp_path / "bad.edgepkg"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            data = zin.read(n)
            if n == "model.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(n, data)
    assert_one_line_error(run("package", "verify", str(bad), "--key", str(work / "dev.pub")),
                          "model.onnx does not match its sha256")
    trunc = tmp_path / "trunc.edgepkg"
    trunc.write_bytes(good.read_bytes()[:100])
    assert_one_line_error(run("package", "verify", str(trunc)), "truncated or not a zip")
    assert_one_line_error(run("package", "inspect", str(trunc)), "truncated or not a zip")


def test_bad_arguments_are_one_line(work, tmp_path):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"nope")
    assert_one_line_error(run("package", "build", str(garbage), "--name", "g", "--version", "1"),
                          "is not an ONNX model")
    assert_one_line_error(run("package", "build", str(work / "mlp.onnx"), "--version", "1"), "needs --name")
    assert_one_line_error(run("package", "build", str(work / "mlp.onnx"), "--name", "a", "--version", "1",
                              "--preprocess-json", "{bad"), "--preprocess-json is not valid JSON")
    # --debug shows the traceback instead
    proc = run("--debug", "package", "build", str(garbage), "--name", "g", "--version", "1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
