"""Field loop, retrain (#22.3): a recipe takes the field export next to the original data; its gate compares the
new model with the serving one on the original test set and the held-out field set. Real training, real
onnxruntime, a real SQLite fleet DB for the export, real signed packages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from test_recipe import RECIPE as BASE  # noqa: E402

from edgeship import protocol  # noqa: E402
from edgeship.converters.recipe import run_recipe  # noqa: E402
from edgeship.demo_loop import partition, shift_digits  # noqa: E402
from edgeship.errors import AccuracyBudgetError  # noqa: E402
from edgeship.fleet.db import FleetDB  # noqa: E402
from edgeship.fleet.field import export_field_data  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sdk" / "demo_data" / "model.py"

# test_recipe's recipe, retargeted: a version and folder per build, hard labels only (alpha 0: the teacher never
# saw the field's shift), no TFLite (not what these tests are about).
RECIPE = (BASE.replace('version = "0.1.0"', 'version = "{version}"').replace('out_dir = "build"', 'out_dir = "{out}"')
          .replace("[distill]\nepochs = 4", "[distill]\nalpha = 0.0\nepochs = 8")
          + '\n[export]\nexporter = "torchscript"\n\n[tflite]\nenabled = false\n')


def _recipe(root: Path, key, *, version: str, out: str, field: str = "") -> Path:
    p = root / f"{out}.toml"
    p.write_text(RECIPE.format(version=version, out=out, model=MODEL, key=key, max_drop=3.0) + field)
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory, signing_keys):
    """Digits splits, a briefly trained teacher, v1 (no field data) and a field export from 8 shifted devices."""
    from edgeship.converters.onnx_export import export_onnx
    from edgeship.demo_data.model import Teacher, load_digits_split, train_classifier

    root = tmp_path_factory.mktemp("loop-recipe")
    data = root / "data"
    data.mkdir()
    s = load_digits_split(0)
    np.savez(data / "train.npz", input=s["x_train"][:600] / 16.0, labels=s["y_train"][:600])
    np.savez(data / "calib.npz", input=s["x_calib"][:100] / 16.0, labels=s["y_calib"][:100])
    np.savez(data / "eval.npz", input=s["x_eval"][:200] / 16.0, labels=s["y_eval"][:200])
    torch.manual_seed(0)
    teacher = train_classifier(Teacher(), s["x_train"][:600], s["y_train"][:600], epochs=3)
    export_onnx(teacher, s["x_eval"][:2] / 16.0, data / "teacher.onnx")
    v1 = run_recipe(_recipe(root, signing_keys[0], version="1.0.0", out="v1"), quiet=True).package
    # The field: 8 devices write the digits the original training set never saw, turned and thick.
    x, y = s["x_train"][600:1200], s["y_train"][600:1200]
    export = _export(root / "field.npz", shift_digits(x) / 16.0, y, devices=8)
    return {"root": root, "v1": v1, "export": export, "key": signing_keys, "split": s}


def _export(path: Path, x: np.ndarray, y: np.ndarray, *, devices: int):
    """A field export of ``devices`` devices correcting the inputs ``x`` (interleaved) to ``y``, via a fleet DB."""
    msgs = []
    for d in range(devices):
        for k, i in enumerate(partition(len(x), devices, d)):
            xs = x[i].astype("<f4")
            body = {"prediction_id": f"p{d}-{k}", "kind": "label", "value": str(int(y[i])), "predicted": "0",
                    "model": {"name": "fielddigits", "version": "1.0.0"},
                    "input": {"input": protocol.array_field("float32", list(xs.shape), xs.tobytes())}}
            msgs.append(protocol.parse_message(protocol.device_topic("lp", f"pi-{d}", "feedback"), protocol.encode(
                protocol.make_message("feedback", f"pi-{d}", body, ts=1_790_000_000.0 + k))))
    db = FleetDB.open(str(path.with_suffix(".sqlite")))
    try:
        db.store_messages(msgs)
        return export_field_data(db, path, holdout=0.25)
    finally:
        db.close()


def _field(project, *, serving: Path, mix: float = 0.5, extra: str = "") -> str:
    return (f'\n[field]\ndata = "{project["root"] / "field.npz"}"\nserving = "{serving}"\nmix = {mix}\n'
            f"max_regress = 3.0\n{extra}")


@pytest.fixture(scope="module")
def retrained(project):
    path = _recipe(project["root"], project["key"][0], version="1.1.0", out="v11",
                   field=_field(project, serving=project["v1"]))
    return run_recipe(path, quiet=True)


def test_field_retrain_beats_serving_on_the_field_and_reports_both(project, retrained):
    res = retrained
    assert [s.name for s in res.steps][:2] == ["field_data", "distill"] and res.package.is_file()
    fd = res.step("field_data").info
    ex = project["export"]
    assert fd["field_holdout"] == ex.holdout and fd["field_train"] <= ex.train
    assert fd["train_total"] == 600 + fd["field_train_rows"] and abs(fd["field_train_rows"] / fd["train_total"] - 0.5) < 0.01
    gate = res.step("field_gate").info
    assert gate["ok"] and gate["field_new"] > gate["field_serving"] + 20  # v1 never saw turned digits
    assert gate["original_new"] >= gate["original_serving"] - 3.0
    md = res.report_md.read_text()
    assert "## Field gate" in md and "held-out field set" in md and "original test set" in md
    assert "## Field data" in md and f"{ex.holdout} held out" in md
    from edgeship.package import open_package

    pkg = open_package(res.package)
    assert json.loads(pkg.read("report.json"))["field"]["gate"]["ok"] is True
    assert pkg.manifest["provenance"]["field"]["field_holdout"] == ex.holdout


def test_retrain_that_does_not_beat_serving_writes_no_package_and_says_why(project, retrained, tmp_path):
    # Serving is now the field-trained model; a retrain that ignores the field data (mix 0) cannot beat it there.
    path = _recipe(project["root"], project["key"][0], version="1.2.0", out="v12",
                   field=_field(project, serving=retrained.package, mix=0.0))
    with pytest.raises(AccuracyBudgetError, match=r"field gate: the new model does not beat the serving one on the "
                                                  r"held-out field set.*no package written"):
        run_recipe(path, quiet=True)
    out = project["root"] / "v12"
    assert not list(out.glob("*.edgepkg"))
    gate = json.loads((out / "field_gate.json").read_text())
    assert gate["ok"] is False and gate["field_new"] < gate["field_serving"]
    cli = run_cli("convert", "run", str(path), check=False)
    assert cli.returncode == 1 and len(cli.stderr.strip().splitlines()) == 1
    assert "does not beat the serving one" in cli.stderr and "original test set" in cli.stderr
    assert not list(out.glob("*.edgepkg"))


def test_field_section_without_serving_names_the_key(project):
    from edgeship.errors import RecipeError

    path = _recipe(project["root"], project["key"][0], version="1.3.0", out="v13",
                   field=f'\n[field]\ndata = "{project["root"] / "field.npz"}"\n')
    with pytest.raises(RecipeError, match=r"\[field\].*serving"):
        run_recipe(path, quiet=True)


def test_field_data_never_trains_on_the_original_test_set(project):
    """Devices that meet the data the model was built from send its test inputs back (the demo's unshifted devices
    do): the field_data step drops them with the held-out ones, so the original-test figure stays honest."""
    from edgeship.converters.recipe import FIELD_DATA_STEP

    root, s = project["root"], project["split"]
    test_x, test_y = s["x_eval"][:200] / 16.0, s["y_eval"][:200]  # exactly the recipe's eval.npz rows
    new_x, new_y = shift_digits(s["x_calib"][:100]) / 16.0, s["y_calib"][:100]  # turned: no original input
    export = _export(root / "field_test_leak.npz", np.concatenate([test_x, new_x]), np.concatenate([test_y, new_y]),
                     devices=6)
    path = _recipe(root, project["key"][0], version="1.4.0", out="v14",
                   field=f'\n[field]\ndata = "{export.path}"\nserving = "{project["v1"]}"\nmix = 0.5\n')
    res = run_recipe(path, quiet=True, steps=(FIELD_DATA_STEP,))
    info = res.step("field_data").info
    train = np.load(res.artifacts["train_data"])["input"]
    field_rows = {r.tobytes() for r in train[600:].astype(np.float32)}
    assert not field_rows & {r.tobytes() for r in test_x.astype(np.float32)}  # no test input learnt from
    assert info["field_train"] > 0 and info["duplicates_dropped"] >= 200 * (export.train / export.samples) * 0.5
