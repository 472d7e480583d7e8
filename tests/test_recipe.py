"""Recipes end to end on tiny digits data: real training, real ONNX/TFLite, a real signed package."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "digits"))

import model as digits  # noqa: E402

from edgeship.converters.recipe import STEPS, load_recipe, run_recipe  # noqa: E402
from edgeship.errors import RecipeError  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = """\
name = "tinydigits"
version = "0.1.0"
out_dir = "build"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
preprocess = {{ scale = 0.0625, mean = [0.0], std = [1.0], layout = "NCHW", resize = [8, 8], color = "L" }}

[data]
train = "data/train.npz"
val = "data/calib.npz"
calib = "data/calib.npz"
eval = "data/eval.npz"

[teacher]
onnx = "data/teacher.onnx"

[student]
factory = "{model}:Student"

[distill]
epochs = 4
lr = 0.003

[quantize]
max_drop = {max_drop}
method = "static"
calibrations = ["minmax"]
recovery_steps = 0

[evaluate]
repeats = 5

[package]
signing_key = "{key}"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, signing_keys):
    """A recipe folder with small digits splits (500 / 100 / 200) and a briefly trained ONNX teacher."""
    from edgeship.converters.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("recipe")
    data = root / "data"
    data.mkdir()
    s = digits.load_digits_split(0)
    np.savez(data / "train.npz", input=s["x_train"][:500] / 16.0, labels=s["y_train"][:500])
    np.savez(data / "calib.npz", input=s["x_calib"][:100] / 16.0, labels=s["y_calib"][:100])
    np.savez(data / "eval.npz", input=s["x_eval"][:200] / 16.0, labels=s["y_eval"][:200])
    torch.manual_seed(0)  # the initial weights too (train_classifier seeds the rest): not what earlier tests drew
    teacher = digits.train_classifier(digits.Teacher(), s["x_train"][:800], s["y_train"][:800], epochs=4)
    export_onnx(teacher, s["x_eval"][:2] / 16.0, data / "teacher.onnx")
    return root


def write_recipe(root: Path, signing_keys, *, max_drop: float = 3.0, extra: str = "", name: str = "recipe.toml"
                 ) -> Path:
    text = RECIPE.format(model=ROOT / "examples" / "digits" / "model.py", key=signing_keys[0], max_drop=max_drop)
    path = root / name
    path.write_text(text + extra)
    return path


@pytest.fixture(scope="module")
def first_run(project, signing_keys):
    return run_recipe(write_recipe(project, signing_keys), quiet=True)


def test_end_to_end_signed_package_runs(first_run, project, signing_keys):
    from edgeship import runtime

    res = first_run
    assert [s.status for s in res.steps] == ["ran"] * len(STEPS)
    assert res.package == project / "build" / "tinydigits-0.1.0.edgepkg" and res.package.is_file()
    ids = [row["id"] for row in res.table]
    assert ids == ["teacher", "student_fp32", "student_int8_onnx", "student_int8_tflite"]
    fp32, int8 = res.table[1], res.table[2]
    assert int8["size"] < fp32["size"] / 2  # really int8 weights
    assert res.table[0]["params"] > 10 * fp32["params"]
    assert all(row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0 for row in res.table)

    z = np.load(project / "data" / "eval.npz")
    x, y = z["input"].astype(np.float32), z["labels"]
    with runtime.load(res.package, trusted_keys=[signing_keys[1]]) as runner:
        out = runner.run(x[:32])
        logits = next(iter(out.values()))
        assert logits.shape == (32, 10)
        top1 = float(np.mean(logits.argmax(1) == y[:32]))
        assert top1 > 0.6
    with runtime.load(res.package, variant="tflite-int8", trusted_keys=[signing_keys[1]]) as runner:
        logits = next(iter(runner.run(x[:1]).values()))
        assert logits.shape == (1, 10)

    md = res.report_md.read_text()
    for label in ("teacher (fp32 ONNX)", "student fp32 (ONNX)", "student int8 ONNX", "student int8 TFLite",
                  "latency b1 (ms)", "latency b32 (ms)", "parameters", "file size"):
        assert label in md
    for png in ("learning_curve", "accuracy_latency", "size"):
        p = project / "build" / "plots" / f"{png}.png"
        assert p.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{png}.png" in md


def test_package_refuses_an_untrusted_key(first_run, tmp_path):
    from edgeship import runtime, signing
    from edgeship.errors import SignatureError

    _, other_pub = signing.keygen(tmp_path / "other.key")
    with pytest.raises(SignatureError):
        runtime.load(first_run.package, trusted_keys=[other_pub])


def test_rerun_reuses_and_budget_change_does_not_retrain(first_run, project, signing_keys):
    recipe = write_recipe(project, signing_keys)
    again = run_recipe(recipe, quiet=True)
    assert [s.status for s in again.steps] == ["reused"] * len(STEPS)
    assert again.step("distill").key == first_run.step("distill").key

    student_pt = first_run.step("distill").folder / "student.pt"
    mtime = student_pt.stat().st_mtime_ns
    recipe = write_recipe(project, signing_keys, max_drop=2.5)
    plan = run_recipe(recipe, dry_run=True)
    assert {s.name: s.status for s in plan.steps} == {
        "distill": "would reuse", "export_onnx": "would reuse", "quantize": "would run", "tflite": "would reuse",
        "evaluate": "would run", "package": "would run"}
    assert "distill" in plan.plan_text() and "would reuse" in plan.plan_text()
    res = run_recipe(recipe, quiet=True)
    status = {s.name: s.status for s in res.steps}
    assert status["distill"] == "reused" and status["export_onnx"] == "reused" and status["tflite"] == "reused"
    assert status["quantize"] == "ran" and status["package"] == "ran"
    assert student_pt.stat().st_mtime_ns == mtime
    # Changing a distillation option retrains (dry run: nothing is touched).
    text = (project / "recipe.toml").read_text().replace("epochs = 4", "epochs = 5")
    (project / "recipe2.toml").write_text(text)
    plan = run_recipe(project / "recipe2.toml", dry_run=True)
    assert all(s.status == "would run" for s in plan.steps)


def test_dry_run_runs_nothing(project, signing_keys, tmp_path):
    text = write_recipe(project, signing_keys).read_text().replace('out_dir = "build"', f'out_dir = "{tmp_path}/b"')
    (project / "dry.toml").write_text(text)
    plan = run_recipe(project / "dry.toml", dry_run=True)
    assert [s.status for s in plan.steps] == ["would run"] * len(STEPS)
    assert plan.package is None and not (tmp_path / "b").exists()
    proc = run_cli("convert", "run", str(project / "dry.toml"), "--dry-run")
    assert "would run" in proc.stdout and "quantize" in proc.stdout


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("epochs = 4", "epochz = 4"), r"recipe\.toml:20: \[distill\] epochz: unknown key"),
    (lambda t: t.replace('eval = "data/eval.npz"', 'eval = "data/nope.npz"'),
     r"recipe\.toml:11: \[data\] eval: file not found: .*nope\.npz"),
    (lambda t: t.replace('version = "0.1.0"', 'version = "0.1.0"\ncolour = "red"'),
     r"recipe\.toml:3: colour: unknown key"),
    (lambda t: t.replace("[evaluate]", "[evaluation]"), r"\[evaluation\]: unknown section"),
    (lambda t: t.replace("max_drop = 3.0", 'max_drop = "lots"'), r"\[quantize\] max_drop: must be int or float"),
    (lambda t: t.replace('method = "static"', 'method = "fast"'), r"\[quantize\] method: must be one of"),
    (lambda t: t.replace('onnx = "data/teacher.onnx"', ""), r"\[teacher\]: give either onnx"),
    (lambda t: t.replace("[data]", "[data"), r"not valid TOML"),
])
def test_bad_recipe_names_key_and_line(project, signing_keys, edit, expected):
    bad = project / "bad" / "recipe.toml"
    bad.parent.mkdir(exist_ok=True)
    (bad.parent / "data").mkdir(exist_ok=True)
    for f in (project / "data").iterdir():
        dst = bad.parent / "data" / f.name
        if not dst.exists():
            os.symlink(f, dst)
    bad.write_text(edit(write_recipe(project, signing_keys).read_text()))
    with pytest.raises(RecipeError, match=expected) as err:
        load_recipe(bad)
    assert "\n" not in str(err.value)


def test_cli_prints_one_line_error(project, signing_keys):
    bad = project / "cli_bad.toml"
    bad.write_text(write_recipe(project, signing_keys).read_text().replace("lr = 0.003", "learning_rate = 0.003"))
    proc = run_cli("convert", "run", str(bad), check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[distill] learning_rate: unknown key" in lines[0]


def test_labels_missing_for_ce_fails_before_training(project, signing_keys, tmp_path):
    z = np.load(project / "data" / "train.npz")
    np.savez(tmp_path / "train_nl.npz", input=z["input"])
    text = write_recipe(project, signing_keys).read_text()
    text = text.replace('train = "data/train.npz"', f'train = "{tmp_path}/train_nl.npz"')
    text = text.replace('out_dir = "build"', f'out_dir = "{tmp_path}/build"')
    (project / "nolabels.toml").write_text(text)
    from edgeship.errors import DataError

    with pytest.raises(DataError, match="no labels but alpha=0.7"):
        run_recipe(project / "nolabels.toml", quiet=True)
    assert not list((tmp_path / "build" / ".cache").glob("distill-*[0-9a-f]"))  # nothing half-cached


def test_interrupted_step_is_not_reused(project, signing_keys, tmp_path):
    """A step folder is only trusted once complete (renamed from .partial with its step.json)."""
    text = write_recipe(project, signing_keys).read_text().replace('out_dir = "build"', f'out_dir = "{tmp_path}/b"')
    (project / "partial.toml").write_text(text)
    plan = run_recipe(project / "partial.toml", dry_run=True)
    folder = plan.step("distill").folder
    folder.mkdir(parents=True)
    (folder / "student.pt").write_bytes(b"half")
    assert run_recipe(project / "partial.toml", dry_run=True).step("distill").status == "would run"
    shutil.rmtree(tmp_path / "b")
