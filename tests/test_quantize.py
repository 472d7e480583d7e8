"""int8 quantization (issue 4): data loading, metrics, the choice, real quantization, bad input.

Real parts only: models are real ONNX/TFLite files built with torch or
onnx.helper, run by real onnxruntime sessions and TFLite interpreters.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from edgeship.converters import evaluate as ev
from edgeship.converters import quantize
from edgeship.converters.data import Dataset, InputSpec, check_against, load_data
from edgeship.converters.quantization import Candidate, choose, node_errors
from edgeship.errors import AccuracyBudgetError, ConversionError, DataError, EdgeshipError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures

def _export_onnx(module, sample, path: Path) -> Path:
    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which is ~20x
        # slower to start; for these tiny models the old path is the right trade in tests.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module.eval(), (torch.from_numpy(sample),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    return path


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits Student (~37k params) trained briefly, exported to ONNX, with calib/eval .npz files."""
    import sys

    sys.path.insert(0, str(ROOT))
    import torch

    from examples.digits.model import Student, load_digits_split, train_classifier

    d = load_digits_split()
    torch.manual_seed(0)  # the initial weights too (train_classifier seeds the rest): not what earlier tests drew
    model = train_classifier(Student(), d["x_train"], d["y_train"], epochs=5)
    tmp = tmp_path_factory.mktemp("digits")
    x_calib = (d["x_calib"] / 16.0).astype(np.float32)
    x_eval = (d["x_eval"] / 16.0).astype(np.float32)
    np.savez(tmp / "calib.npz", input=x_calib, labels=d["y_calib"])
    np.savez(tmp / "eval.npz", input=x_eval, labels=d["y_eval"])
    onnx_path = _export_onnx(model, x_eval[:1], tmp / "student.onnx")
    return {"dir": tmp, "onnx": onnx_path, "calib": tmp / "calib.npz", "eval": tmp / "eval.npz",
            "torch": model, "x_calib": x_calib, "x_eval": x_eval, "y_eval": d["y_eval"]}


def _save(model, path: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _mlp_onnx(path: Path, sizes=(64, 48, 10), seed=0, col_scale=None) -> Path:
    """A tiny MLP built with onnx.helper (~5k params); ``col_scale`` multiplies input columns first."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    if col_scale is not None:
        inits.append(numpy_helper.from_array(np.asarray(col_scale, np.float32), "colscale"))
        nodes.append(helper.make_node("Mul", [x, "colscale"], ["scaled"], name="scale_in"))
        x = "scaled"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        if i == 0 and col_scale is not None:
            w /= np.asarray(col_scale, np.float32)[:, None]   # every column matters equally to the output
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], ["logits" if last else f"a{i}"], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 64)).astype(np.float32)
    np.save(tmp / "calib.npy", x[:48])
    np.save(tmp / "eval.npy", x[48:])
    return {"onnx": _mlp_onnx(tmp / "mlp.onnx"), "calib": tmp / "calib.npy", "eval": tmp / "eval.npy", "dir": tmp}


def _cand(name, method, drop, b1, bn, size=100, **kw):
    return Candidate(name=name, target="onnx", method=method, drop=drop, latency_b1_ms=b1, latency_batch_ms=bn,
                     size=size, **kw)


# --------------------------------------------------------------------------- the decision (pure)

def test_choose_picks_fastest_within_budget():
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 10.0, 400), _cand("static-minmax", "static", 0.2, 0.4, 4.0),
             _cand("static-entropy", "static", 1.5, 0.3, 3.0), _cand("dynamic", "dynamic", 0.1, 0.8, 9.0)]
    d = choose(cands, max_drop=1.0)
    assert d.ok and d.chosen == "static-minmax"     # entropy is faster but misses the budget
    assert d.speed["static-minmax"] == pytest.approx(0.4)
    assert "fastest" in d.reason and "0.40x" in d.reason


def test_choose_takes_the_most_accurate_of_the_equally_fast_candidates():
    # issue 18: the fastest-only rule shipped the detector at IoU 99.9 where plain onnxruntime's
    # configuration, as fast within timing noise, had 100.0 -- the old rule picks ort-u8-minmax here.
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 1.0, 400), _cand("ort-u8-minmax", "static", 0.10, 0.50, 0.50),
             _cand("ort-u8-minmax-pt", "static", 0.0, 0.51, 0.52), _cand("nncf", "static", 0.05, 0.52, 0.51)]
    d = choose(cands, max_drop=1.0)
    assert d.ok and d.chosen == "ort-u8-minmax-pt" and d.best_int8 == "ort-u8-minmax-pt"
    assert "most accurate" in d.reason and "ort-u8-minmax" in d.reason   # names the fastest it passed over
    # a real speed difference is not traded for accuracy: 20 % slower is outside the noise band
    slow = [cands[0], cands[1], _cand("nncf", "static", 0.0, 0.60, 0.60)]
    assert choose(slow, max_drop=1.0).chosen == "ort-u8-minmax"
    # ... unless the band is widened by the caller
    assert choose(slow, max_drop=1.0, speed_tie=0.25).chosen == "nncf"
    # out of budget stays out, however accurate-looking the rest is
    assert choose([cands[0], _cand("a", "static", 1.5, 0.5, 0.5), _cand("b", "static", 0.9, 0.52, 0.52)],
                  max_drop=1.0).chosen == "b"


def test_search_plan_holds_both_peers_defaults_and_stages_the_rest():
    from edgeship.converters.quantization import ESCALATE, PEER, _search_plan

    plan, later = _search_plan("auto", None, None, None, None, dense=False, nncf_installed=True)
    # plain onnxruntime's quantize_static defaults (u8, per-tensor, MinMax) beside u8 per-channel
    assert plan == [("onnxruntime", "static", "minmax", "uint8", True),
                    ("onnxruntime", "static", "minmax", "uint8", False)]
    kinds = [(k, [c[0] if c[0] == "nncf" else f"{c[2]}-{c[3]}" for c in step]) for k, step in later]
    assert kinds == [(PEER, ["nncf"]), (ESCALATE, ["minmax-int8"]), (ESCALATE, ["percentile-uint8", "percentile-int8"]),
                     (ESCALATE, ["entropy-uint8", "entropy-int8"])]
    # what the user fixes is all that is tried, and nothing is staged behind it
    plan, later = _search_plan("static", ("onnxruntime", "nncf"), ("minmax",), ("int8",), False, dense=False,
                               nncf_installed=True)
    assert plan == [("onnxruntime", "static", "minmax", "int8", False), ("nncf", "static", None, None, True)]
    assert later == []
    plan, later = _search_plan("auto", None, None, None, None, dense=True, nncf_installed=False)
    assert ("onnxruntime", "dynamic", None, None, False) in plan and all(k == ESCALATE for k, _ in later)


def test_choose_keeps_fp32_when_int8_is_slower_and_says_why():
    cands = [_cand("fp32", "fp32", 0.0, 0.010, 0.05), _cand("static-minmax", "static", 0.0, 0.020, 0.09),
             _cand("dynamic", "dynamic", 0.0, 0.015, 0.08)]
    d = choose(cands, max_drop=1.0)
    assert d.ok and d.chosen == "fp32"
    assert "slower" in d.reason and "dynamic" in d.reason   # names the best int8 candidate it rejected
    # A user who asked for one method explicitly gets int8 even when slower.
    forced = choose(cands, max_drop=1.0, fp32_competes=False)
    assert forced.chosen == "dynamic"


def test_choose_tolerates_noise_in_favour_of_int8():
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 1.0), _cand("static-minmax", "static", 0.0, 1.03, 1.03)]
    assert choose(cands, max_drop=1.0).chosen == "static-minmax"   # 3% is inside the 5% noise band


def test_choose_reports_failure_when_no_int8_meets_budget():
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 1.0), _cand("static-minmax", "static", 4.0, 0.3, 0.3),
             _cand("dynamic", "dynamic", 2.5, 0.5, 0.5),
             _cand("static-entropy", "static", None, None, None, error="ValueError: boom"),
             _cand("static-percentile", "static", 0.0, 0.1, 0.1, duplicate_of="static-minmax")]
    d = choose(cands, max_drop=1.0)
    assert not d.ok and d.chosen == "fp32"
    assert "dynamic" in d.reason and "2.50" in d.reason        # the closest candidate and its drop


def test_choose_needs_a_baseline():
    with pytest.raises(ConversionError):
        choose([_cand("static", "static", 0.0, 1, 1)], max_drop=1.0)


# --------------------------------------------------------------------------- metrics

def test_metrics_and_auto_choice():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = np.array([[0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    assert ev.top1(out, np.array([1, 0, 1, 0])) == 0.75
    assert ev.agreement(out, ref) == 0.75
    assert ev.cosine(ref, ref) == pytest.approx(1.0)
    assert ev.mse(out, ref) == pytest.approx(np.mean((out - ref) ** 2))
    assert ev.to_points("mse", 0.0, reference=ref) == 100.0
    assert ev.choose_metric((None, 10), has_labels=True) == "top1"
    assert ev.choose_metric((None, 10), has_labels=False) == "agreement"
    assert ev.choose_metric((None, 4, 16), has_labels=True) == "cosine"
    assert ev.choose_metric((None, 1), has_labels=False) == "cosine"
    assert ev.choose_metric((None, 10), has_labels=False, requested="mse") == "mse"
    with pytest.raises(DataError, match="labels"):
        ev.choose_metric((None, 10), has_labels=False, requested="top1")


# --------------------------------------------------------------------------- data

def test_load_npy_npz_and_arrays(tmp_path):
    x = np.zeros((20, 3), np.float32)
    np.save(tmp_path / "a.npy", x)
    d = load_data(tmp_path / "a.npy", input_names=["x"])
    assert d.names == ["x"] and len(d) == 20 and d.labels is None
    np.savez(tmp_path / "b.npz", ids=np.zeros((20, 5), np.int64), state=x, labels=np.arange(20))
    d = load_data(tmp_path / "b.npz", input_names=["ids", "state"])
    assert d.names == ["ids", "state"] and d.labels.tolist() == list(range(20))
    with pytest.raises(DataError, match="'mask'"):
        load_data(tmp_path / "b.npz", input_names=["ids", "mask"])
    with pytest.raises(DataError, match="2 inputs"):
        load_data(tmp_path / "a.npy", input_names=["ids", "state"])
    assert load_data({"x": x}).names == ["x"]
    feed = Dataset(inputs={"x": x[:3]}).feed(8)
    assert feed["x"].shape == (8, 3)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    pp = {"scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "NCHW", "resize": [8, 8], "color": "L"}
    d = load_data(tmp_path, preprocess=pp)
    assert d.inputs["input"].shape == (6, 1, 8, 8) and d.inputs["input"].dtype == np.float32
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1] and d.label_names == ("cat", "dog")
    assert d.inputs["input"].max() == pytest.approx(80 / 255, abs=1e-6)


def test_data_errors_are_one_clear_line(tmp_path):
    spec = [InputSpec("input", "float32", ("batch", 4))]
    (tmp_path / "empty").mkdir()
    cases = {
        "no images": lambda: load_data(tmp_path / "empty"),
        "no such file": lambda: load_data(tmp_path / "missing.npz"),
        "per-sample shape": lambda: check_against(load_data(np.zeros((30, 5), np.float32)), spec),
        "NaN": lambda: check_against(load_data(np.where(np.arange(120).reshape(30, 4) == 9, np.nan, 1.0)), spec),
        "at least 16": lambda: check_against(load_data(np.zeros((3, 4), np.float32)), spec, min_samples=16),
        "int64": lambda: check_against(load_data(np.zeros((30, 4), np.float32)),
                                       [InputSpec("ids", "int64", ("batch", 4))]),
        "numeric": lambda: check_against(load_data(np.array([["a"] * 4] * 30)), spec),
    }
    for needle, fn in cases.items():
        with pytest.raises(DataError) as info:
            fn()
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, (needle, msg)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable numpy file"):
        load_data(tmp_path / "bad.npy")
    # The NaN message says which sample to look at.
    with pytest.raises(DataError, match="first in sample 2"):
        check_against(load_data(np.where(np.arange(120).reshape(30, 4) == 9, np.nan, 1.0)), spec)
    # Integer data for a float input is cast, not refused.
    ok = check_against(load_data(np.ones((30, 4), np.uint8)), spec)
    assert ok.inputs["input"].dtype == np.float32


# --------------------------------------------------------------------------- real quantization

@pytest.mark.slow
def test_quantize_digits_student_produces_a_valid_package(digits, tmp_path, signing_keys):
    from edgeship import runtime
    from edgeship.package import open_package

    out = tmp_path / "student.edgepkg"
    res = quantize(digits["onnx"], digits["calib"], digits["eval"], out=out, max_drop=1.0, method="static",
                   quiet=True, repeats=5, calibrations=("minmax", "percentile"), signing_key=signing_keys[0],
                   name="digits-student", version="2.0.0", analyze=True)
    assert res.ok and res.package == out and out.is_file()
    chosen = res.chosen["onnx"]
    assert chosen.startswith(("ort-", "nncf"))
    c = next(c for c in res.candidates if c.name == chosen)
    assert c.drop <= 1.0 and c.size < 0.5 * next(x for x in res.candidates if x.method == "fp32").size
    rep = res.report["targets"]["onnx"]
    assert rep["metric"] == "top1" and rep["calibration_samples"] == 197 and rep["node_errors"]
    assert {x["name"] for x in rep["candidates"]} >= {"fp32", "ort-u8-minmax", "ort-u8-minmax-pt", "ort-u8-percentile"}
    # side report + plots next to the output
    assert res.report_md.is_file() and "Chosen" in res.report_md.read_text()
    assert all(p.is_file() and p.suffix == ".png" for p in res.plots) and len(res.plots) == 2

    pkg = open_package(out)
    man = pkg.manifest
    assert man["name"] == "digits-student" and man["version"] == "2.0.0"
    # int8 is the default variant; fp32 rides along so the device can measure both and pick
    assert [(v["precision"], v["default"]) for v in man["variants"]] == [("int8", True), ("fp32", False)]
    q = man["provenance"]["quantization"]["onnx"]
    assert q["method"] == "static" and q["calibration_samples"] == 197
    assert q["io"]["inputs"]["input"]["scale"] > 0      # scale/zero-point of the quantized input
    assert __import__("json").loads(pkg.read("report.json"))["targets"]["onnx"]["chosen"] == chosen
    with runtime.load(out) as runner:
        got = runner.run(digits["x_eval"][:32])
    fp32 = ev.predict(digits["onnx"], load_data(digits["x_eval"][:32], input_names=["input"]))
    out_arr = next(iter(got.values()))
    assert np.mean(out_arr.argmax(1) == fp32.argmax(1)) >= 0.95
    assert np.abs(out_arr - fp32).max() < 0.25 * np.abs(fp32).max()


@pytest.mark.slow
def test_auto_on_tiny_mlp_decision_matches_measurements(mlp, tmp_path):
    """One real run: whatever this (noisy, shared) machine measured, the choice must follow from it."""
    res = quantize(mlp["onnx"], mlp["calib"], mlp["eval"], method="auto", quiet=True, repeats=15,
                   calibrations=("minmax",), work_dir=tmp_path / "w")
    dec = res.decisions["onnx"]
    again = choose(res.candidates, max_drop=1.0)
    assert (again.chosen, again.ok) == (dec.chosen, dec.ok)
    assert res.report["targets"]["onnx"]["metric"] == "agreement"     # no labels, classifier output
    if dec.chosen == "fp32":
        assert "slower" in dec.reason
    else:
        assert dec.speed[dec.chosen] <= 1.05


@pytest.mark.slow
def test_recovery_keeps_the_worst_nodes_in_float(tmp_path):
    """An input column 1000x larger than the others ruins per-tensor int8 of everything it feeds;
    recovery must find those nodes by per-node error and keep them in float."""
    rng = np.random.default_rng(3)
    scale = np.ones(16, np.float32)
    scale[0] = 1000.0
    model = _mlp_onnx(tmp_path / "outlier.onnx", sizes=(16, 32, 10), col_scale=scale)
    x = rng.standard_normal((160, 16)).astype(np.float32)
    res = quantize(model, x[:64], x[64:], method="static", calibrations=("minmax",), quiet=True, repeats=3,
                   activation_types=("int8",), engines=("onnxruntime",),
                   recovery_steps=4, work_dir=tmp_path / "w")
    cands = {c.name: c for c in res.candidates}
    assert cands["ort-s8-minmax"].drop > 1.0                  # plain static misses the budget
    chosen = cands[res.chosen["onnx"]]
    assert chosen.excluded_nodes and chosen.drop <= 1.0      # a recovered candidate made it
    # (quant_pre_process fuses MatMul+Add into a Gemm named "matmul0/MatMulAddFusion")
    assert any(n.startswith(("scale_in", "matmul0")) for n in chosen.excluded_nodes)
    log = res.report["targets"]["onnx"]["recovery"]
    assert log and log[0]["from"] == "ort-s8-minmax"
    rows = node_errors(tmp_path / "w" / "fp32.prep.onnx", Path(cands["ort-s8-minmax"].path),
                       load_data(x[:32], input_names=["input"]), work_dir=tmp_path)
    worst = max(rows, key=lambda r: r["added_db"])
    assert any(n.startswith(("scale_in", "matmul0")) for n in worst["nodes"])


def test_impossible_budget_is_one_line_and_writes_nothing(mlp, tmp_path):
    out = tmp_path / "never.edgepkg"
    with pytest.raises(AccuracyBudgetError) as info:
        quantize(mlp["onnx"], mlp["calib"], mlp["eval"], max_drop=0.0, metric="cosine", method="dynamic",
                 out=out, quiet=True, repeats=3, recovery_steps=1)
    msg = str(info.value)
    assert "\n" not in msg and "budget" in msg and "--allow-fp32" in msg
    assert info.value.results and any(r["name"] == "dynamic" for r in info.value.results)
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    # The side report explains the refusal (that is where the user looks next).
    md = tmp_path / "never.edgepkg.report.md"
    assert md.is_file() and "no int8 candidate met the accuracy budget" in md.read_text()


@pytest.mark.slow
def test_allow_fp32_ships_fp32(mlp, tmp_path):
    from edgeship.package import open_package

    out = tmp_path / "fp32.edgepkg"
    res = quantize(mlp["onnx"], mlp["calib"], mlp["eval"], max_drop=0.0, metric="cosine", method="dynamic",
                   out=out, quiet=True, repeats=3, recovery_steps=0, allow_fp32=True)
    assert res.chosen["onnx"] == "fp32" and "--allow-fp32" in res.decisions["onnx"].reason
    man = open_package(out).manifest
    assert man["variants"][0]["precision"] == "fp32"


def _bad_models(tmp_path: Path) -> dict[str, Path]:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    # control flow: If choosing between two Identity branches
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    then_g = helper.make_graph([helper.make_node("Identity", ["input"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["input"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 4])])
    g_if = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                                               else_branch=else_g)], "g", [x], [y], [cond])
    custom = helper.make_graph([helper.make_node("FancyOp", ["input"], ["y"], name="fancy", domain="acme.ops")],
                               "g", [x], [y])
    models = {
        "control flow": helper.make_model(g_if, opset_imports=[helper.make_opsetid("", 17)]),
        "unsupported operator": helper.make_model(custom, opset_imports=[helper.make_opsetid("", 17),
                                                                         helper.make_opsetid("acme.ops", 1)]),
    }
    out = {}
    import onnx

    for k, m in models.items():
        p = tmp_path / f"{k.replace(' ', '_')}.onnx"
        onnx.save(m, str(p))
        out[k] = p
    return out


def test_bad_models_and_data_give_one_line_and_no_package(digits, tmp_path):
    good = dict(model=digits["onnx"], calib=digits["calib"], eval=digits["eval"])
    x = digits["x_calib"]
    nan = x.copy()
    nan[5, 0, 0, 0] = np.nan
    (tmp_path / "empty").mkdir()
    cases = [
        ("control flow", {**good, "model": _bad_models(tmp_path)["control flow"]}, ConversionError),
        ("unsupported operator", {**good, "model": _bad_models(tmp_path)["unsupported operator"]}, ConversionError),
        ("per-sample shape", {**good, "calib": x[:, :, :4, :]}, DataError),
        ("expects int64", None, DataError),
        ("at least 16", {**good, "calib": x[:5]}, DataError),
        ("NaN", {**good, "calib": nan}, DataError),
        ("no images", {**good, "calib": tmp_path / "empty"}, DataError),
        ("no such model file", {**good, "model": tmp_path / "nope.onnx"}, EdgeshipError),
    ]
    ids_model = _int_input_model(tmp_path / "ids.onnx")
    for needle, kw, exc in cases:
        if kw is None:
            kw = {"model": ids_model, "calib": np.zeros((20, 4), np.float32), "eval": np.zeros((20, 4), np.int64)}
        out = tmp_path / f"{needle.replace(' ', '_')}.edgepkg"
        with pytest.raises(exc) as info:
            quantize(kw["model"], kw["calib"], kw["eval"], out=out, quiet=True, repeats=3)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, (needle, msg)
        assert not out.exists()
    assert not list(tmp_path.glob("*.edgepkg*"))


def _int_input_model(path: Path) -> Path:
    """Token ids (int64) -> Gather from an embedding -> ReduceMean: an int64 input to calibrate."""
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "emb")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
                           helper.make_node("ReduceMean", ["e", "axes"], ["y"], name="mean", keepdims=0)], "ids",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [emb, axes])
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.slow
def test_multi_input_int64_and_old_opset_model(tmp_path):
    """Two inputs (int64 ids + a float state), opset 11: upgraded, calibrated with the user's data for both."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "w"),
             numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32) / 4, "w2")]
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="gather"),
             helper.make_node("ReduceMean", ["e"], ["pooled"], name="pool", axes=[1], keepdims=0),
             helper.make_node("Add", ["pooled", "state"], ["h"], name="add_state"),
             helper.make_node("MatMul", ["h", "w"], ["h2"], name="mm"),
             helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
             helper.make_node("MatMul", ["h3", "w2"], ["logits"], name="head")]
    g = helper.make_graph(nodes, "two_inputs",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)]), tmp_path / "two.onnx")
    data = {"ids": rng.integers(0, 50, (80, 6)), "state": rng.standard_normal((80, 16)).astype(np.float32)}
    calib = {k: v[:40] for k, v in data.items()}
    evald = {k: v[40:] for k, v in data.items()}
    res = quantize(path, calib, evald, method="static", calibrations=("minmax",), quiet=True, repeats=3,
                   work_dir=tmp_path / "w")
    notes = res.report["targets"]["onnx"]["notes"]
    assert notes["source_opset"] == 11 and notes["upgraded_to"] == 13
    static = next(c for c in res.candidates if c.name == "ort-u8-minmax")
    assert static.error is None and static.drop is not None
    prepped = onnx.load(str(tmp_path / "w" / "ort-u8-minmax.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in prepped.graph.node)


def test_quantize_rejects_bad_options(digits, tmp_path):
    for kw, needle in [({"method": "magic"}, "method"), ({"target": "coreml"}, "target"),
                       ({"max_drop": -1}, "max_drop"), ({"out": tmp_path / "x.zip"}, ".edgepkg")]:
        # (--target tflite on an .onnx model is a route now: test_byo_export.py)
        with pytest.raises(ConversionError, match=needle):
            quantize(digits["onnx"], digits["calib"], digits["eval"], quiet=True, **kw)


# --------------------------------------------------------------------------- TFLite

@pytest.mark.slow
def test_tflite_int8_from_torch_and_from_float_tflite(digits, tmp_path):
    from edgeship.converters.tflite_export import export_tflite, export_tflite_int8

    x1 = digits["x_eval"][:1]
    evald = load_data(digits["eval"], input_names=["input"])
    f32 = export_tflite(digits["torch"], x1, tmp_path / "f32.tflite")
    i8 = export_tflite_int8(digits["torch"], x1, digits["x_calib"], tmp_path / "i8.tflite")
    i8io = export_tflite_int8(digits["torch"], x1, digits["x_calib"], tmp_path / "i8io.tflite", int8_io=True)
    assert i8.stat().st_size < 0.4 * f32.stat().st_size
    m = ev.TfliteModel(i8)
    assert m.inputs[0].dtype == "float32" and m.outputs[0].dtype == "float32"
    m_io = ev.TfliteModel(i8io)
    assert m_io.inputs[0].dtype == "int8" and m_io.quantization("inputs")[0]["scale"] > 0
    ref = ev.top1(ev.predict(f32, evald), evald.labels)
    for p in (i8, i8io):
        assert ev.top1(ev.predict(p, evald), evald.labels) >= ref - 0.02

    res = quantize(f32, digits["calib"], digits["eval"], target="tflite", method="static", quiet=True, repeats=3,
                   work_dir=tmp_path / "w")
    c = next(c for c in res.candidates if c.name == "tflite-static")
    assert c.error is None and c.drop <= 1.0 and res.chosen["tflite"] == "tflite-static"
    assert res.report["targets"]["tflite"]["io_quantization"]["inputs"]


# --------------------------------------------------------------------------- CLI

def test_cli_bad_input_prints_one_error_line(digits, tmp_path):
    out = tmp_path / "bad.edgepkg"
    np.save(tmp_path / "few.npy", digits["x_calib"][:4])
    proc = run_cli("convert", "quantize", str(digits["onnx"]), "--calib", str(tmp_path / "few.npy"),
                   "--eval", str(digits["eval"]), "--out", str(out), "-q", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "at least 16" in lines[0]
    assert not out.exists()


def test_cli_impossible_budget_exits_nonzero_without_package(mlp, tmp_path):
    out = tmp_path / "never.edgepkg"
    args = ("convert", "quantize", str(mlp["onnx"]), "--calib", str(mlp["calib"]), "--eval", str(mlp["eval"]),
            "--out", str(out), "--max-drop", "0", "--metric", "cosine", "--method", "dynamic", "-q")
    proc = run_cli(*args, check=False)
    assert proc.returncode == 1 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no int8 candidate met the accuracy budget" in lines[0]
    ok = run_cli(*args, "--allow-fp32")     # the same run, told fp32 is acceptable, ships it and exits 0
    assert out.is_file() and "fp32 kept (--allow-fp32)" in ok.stdout


@pytest.mark.slow
def test_cli_quantize_writes_package(digits, tmp_path):
    out = tmp_path / "cli.edgepkg"
    proc = run_cli("convert", "quantize", str(digits["onnx"]), "--calib", str(digits["calib"]),
                   "--eval", str(digits["eval"]), "--out", str(out), "--method", "static", "-q")
    assert out.is_file() and "onnx: " in proc.stdout
    assert (tmp_path / "cli.edgepkg.report.md").is_file()


@pytest.mark.slow
def test_torch_module_to_both_targets(digits, tmp_path):
    """A torch model goes to ONNX and TFLite in one call; TFLite also tries the PT2E export."""
    from edgeship.package import open_package

    out = tmp_path / "both.edgepkg"
    res = quantize(digits["torch"], digits["calib"], digits["eval"], target="both", method="static", quiet=True,
                   repeats=3, calibrations=("minmax",), recovery_steps=0, out=out, name="student",
                   work_dir=tmp_path / "w")
    assert set(res.chosen) == {"onnx", "tflite"}
    names = {c.name for c in res.candidates}
    assert {"ort-u8-minmax", "tflite-static", "tflite-pt2e"} <= names
    pt2e = next(c for c in res.candidates if c.name == "tflite-pt2e")
    assert pt2e.error is None and pt2e.drop <= 1.0
    man = open_package(out).manifest
    assert {v["file"] for v in man["variants"] if v["precision"] == "int8"} == {"model.onnx", "model.tflite"}
    assert {v["file"] for v in man["variants"] if v["precision"] == "fp32"} == {"model.fp32.onnx",
                                                                               "model.fp32.tflite"}
    assert set(man["provenance"]["quantization"]) == {"onnx", "tflite"}
    tfl = next(v for v in man["variants"] if v["file"] == "model.tflite")
    chosen = next(c for c in res.candidates if c.name == res.chosen["tflite"])
    file_in = ev.TfliteModel(chosen.path).inputs[0]
    assert tfl["inputs"][0]["dtype"] == file_in.dtype           # the variant describes its file
    if file_in.dtype == "int8":                                 # int8 IO carries its scale/zero-point
        assert tfl["inputs"][0]["quantization"]["scale"] > 0


@pytest.mark.slow
def test_quantize_an_edgepkg_keeps_its_labels_and_preprocess(digits, tmp_path):
    from PIL import Image

    from edgeship.package import build, open_package

    pp = {"color": "L", "resize": [8, 8], "scale": 1 / 16, "layout": "NCHW", "dtype": "float32"}
    src = build(tmp_path / "fp32.edgepkg", {"model.onnx": digits["onnx"]}, name="digits", version="1.0.0",
                preprocess=pp, labels=[str(i) for i in range(10)])
    # Calibration from an image folder decoded with the package's preprocess (raw 0..16 pixels).
    folder = tmp_path / "imgs"
    x = digits["x_calib"] * 16
    ys = np.load(digits["calib"])["labels"]
    for i, (img, y) in enumerate(zip(x[:60], ys[:60])):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].astype(np.uint8)).save(folder / str(y) / f"{i}.png")
    out = tmp_path / "int8.edgepkg"
    res = quantize(src, folder, digits["eval"], out=out, method="static", quiet=True, repeats=3,
                   calibrations=("minmax",), version="1.1.0")
    assert res.report["targets"]["onnx"]["calibration_samples"] == 60
    man = open_package(out).manifest
    assert man["name"] == "digits" and man["version"] == "1.1.0"
    assert man["labels"] == [str(i) for i in range(10)] and man["preprocess"]["scale"] == pytest.approx(1 / 16)
    assert man["provenance"]["source"].endswith(":model.onnx")


def test_symbolic_shape_inference_failure_falls_back(tmp_path):
    """com.microsoft.Inverse runs in onnxruntime but breaks its symbolic shape inference:
    pre-processing must fall back (and say so) instead of stopping."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Inverse", ["input"], ["inv"], domain="com.microsoft", name="inverse"),
                           helper.make_node("MatMul", ["inv", "w"], ["y"], name="mm")], "inv",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "inverse.onnx"
    import onnx

    onnx.save(model, str(path))
    x = (np.eye(4) + 0.1 * rng.standard_normal((60, 4, 4))).astype(np.float32)
    res = quantize(path, x[:30], x[30:], method="static", calibrations=("minmax",), quiet=True, repeats=3,
                   recovery_steps=0, allow_fp32=True)
    notes = res.report["targets"]["onnx"]["notes"]
    assert "symbolic shape inference failed" in notes["pre_process"]
    assert notes["pre_process_errors"] and res.report["targets"]["onnx"]["metric"] == "cosine"
    static = next(c for c in res.candidates if c.name == "ort-u8-minmax")
    assert static.error is None and static.points is not None


# --------------------------------------------------------------------------- issue 18: engines, cost, task metrics

def _conv_onnx(path: Path, seed: int = 0) -> Path:
    """A tiny CNN built with onnx.helper: Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm on 1x12x12."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 1, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,)), ("wf", (4, 8)),
                          ("bf", (4,)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 12, 12])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    return _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn")
    x = np.random.default_rng(2).standard_normal((80, 1, 12, 12)).astype(np.float32)
    np.save(tmp / "calib.npy", x[:40])
    np.save(tmp / "eval.npy", x[40:])
    return {"onnx": _conv_onnx(tmp / "cnn.onnx"), "calib": tmp / "calib.npy", "eval": tmp / "eval.npy"}


def test_task_metrics_iou_and_sequences():
    ref = np.full((2, 3, 4, 4), -1.0)
    ref[:, 0, :2, :2] = 2.0                       # objectness: 4 cells on per sample
    useless = ref.copy()
    useless[:, 0, :2, :2] = -0.1                  # int8 map that finds nothing once thresholded
    assert ev.cosine(useless, ref) > 0.8          # cosine would call it nearly fine ...
    assert ev.iou(useless, ref) == 0.0            # ... IoU of the thresholded objectness map says it is useless
    assert ev.iou(ref, ref) == 1.0
    half = ref.copy()
    half[:, 0, 0, :2] = -1.0                      # 2 of 4 cells lost
    assert ev.iou(half, ref) == pytest.approx(0.5)
    assert ev.iou(half, ref, channel=None) == pytest.approx(0.5)
    assert ev.iou(np.full_like(ref, -3.0), np.full_like(ref, -2.0)) == 1.0   # both empty agree
    assert ev.metric_value("iou", half, labels=None, reference=ref, options={"threshold": 0.0, "channel": 0}) == 0.5
    with pytest.raises(ConversionError, match="no option 'thr'"):
        ev.metric_value("iou", half, labels=None, reference=ref, options={"thr": 0.5})
    with pytest.raises(ConversionError, match="channel 7"):
        ev.iou(half, ref, channel=7)
    seq = np.zeros((2, 5, 3))
    seq[..., 0] = 1.0
    other = seq.copy()
    other[0, 4] = [0.0, 2.0, 0.0]                 # one step of one sequence differs
    assert ev.step_agreement(other, seq) == pytest.approx(0.9)
    assert ev.seq_exact(other, seq) == pytest.approx(0.5)
    with pytest.raises(ConversionError, match="N, T, classes"):
        ev.seq_exact(np.zeros((4, 3)), np.zeros((4, 3)))
    assert ev.choose_metric((None, 4, 16), has_labels=False, requested="step_agreement") == "step_agreement"


def _dev(fp32_ms, int8_ms):
    from edgeship.converters.quantization import DeviceBench

    return DeviceBench(machine="aarch64 with 4 CPUs", fp32_ms=fp32_ms, int8_ms=int8_ms, source="pi.json")


def test_choose_lets_the_target_device_decide_and_says_which_machine():
    # slower here (x86), faster on the device: int8 wins, and the reason names both machines
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 1.0), _cand("ort-u8-minmax", "static", 0.2, 1.6, 1.5)]
    here = choose(cands, max_drop=1.0, machine="this machine (x86)")
    assert here.chosen == "fp32" and "this machine (x86)" in here.reason
    dev = choose(cands, max_drop=1.0, machine="this machine (x86)", device=_dev(10.0, 6.0))
    assert dev.chosen == "ort-u8-minmax" and "aarch64 with 4 CPUs" in dev.reason and "0.60x" in dev.reason
    # faster here, slower on the device: never an int8 default slower than fp32 where it was measured
    cands = [_cand("fp32", "fp32", 0.0, 1.0, 1.0), _cand("ort-u8-minmax", "static", 0.2, 0.5, 0.5)]
    dev = choose(cands, max_drop=1.0, device=_dev(10.0, 13.0))
    assert dev.chosen == "fp32" and dev.best_int8 == "ort-u8-minmax"
    assert "aarch64 with 4 CPUs" in dev.reason and "1.30x" in dev.reason


def test_load_target_bench_reads_bench_json_and_refuses_bad_files(tmp_path):
    import json

    from edgeship.converters.quantization import load_target_bench
    from edgeship.errors import ConfigError

    def bench(name, precision, p50, machine="aarch64"):
        p = tmp_path / name
        p.write_text(json.dumps({"package": "m.edgepkg", "device": {"machine": machine, "cpus": 4},
                                 "variant": f"onnx-{precision}", "precision": precision,
                                 "raw_latency_ms_b1": {"count": 50, "p50": p50, "p95": p50 * 1.2}}))
        return p

    d = load_target_bench([bench("f.json", "fp32", 8.0), bench("i.json", "int8", 5.0)])
    assert (d.fp32_ms, d.int8_ms, d.machine) == (8.0, 5.0, "aarch64 with 4 CPUs") and d.ratio == pytest.approx(0.625)
    with pytest.raises(ConfigError, match="no int8 measurement"):
        load_target_bench([tmp_path / "f.json"])
    with pytest.raises(ConfigError, match="measured on"):
        load_target_bench([tmp_path / "f.json", bench("x.json", "int8", 5.0, machine="x86_64")])
    (tmp_path / "old.json").write_text(json.dumps({"raw_latency_ms_b1": {"p50": 3.0}}))
    with pytest.raises(ConfigError, match="--variant ID --json") as info:
        load_target_bench([tmp_path / "old.json"])
    assert "\n" not in str(info.value)


def test_unsigned_and_signed_activations_share_one_calibration(mlp, tmp_path):
    import onnx
    from onnx import numpy_helper

    res = quantize(mlp["onnx"], mlp["calib"], mlp["eval"], method="static", engines=("onnxruntime",), quiet=True,
                   repeats=3, recovery_steps=0, work_dir=tmp_path / "w", allow_fp32=True, max_drop=5.0,
                   activation_types=("uint8", "int8"), per_channel=True)
    cands = {c.name: c for c in res.candidates}
    u8, s8 = cands["ort-u8-minmax"], cands["ort-s8-minmax"]
    assert u8.error is None and s8.error is None and u8.duplicate_of is None and s8.duplicate_of is None
    assert (u8.activation_type, s8.activation_type) == ("uint8", "int8") and u8.points is not None
    zps = {n: {numpy_helper.to_array(i).dtype for i in onnx.load(cands[n].path).graph.initializer
               if i.name.endswith("_zero_point") and numpy_helper.to_array(i).size == 1} for n in cands if n != "fp32"}
    assert np.dtype("uint8") in zps["ort-u8-minmax"] and np.dtype("uint8") not in zps["ort-s8-minmax"]
    assert [p.name for p in (tmp_path / "w").glob("calib-*.json")] == ["calib-minmax.json"]   # one pass, shared
    rep = res.report["targets"]["onnx"]
    assert not rep["node_errors"] and "per-node error" not in rep["phases"]   # analysis only on demand
    assert set(rep["phases"]) >= {"prepare", "fp32 reference", "candidates", "timing"}
    assert res.report["peak_rss_mb"] > 0


def test_dynamic_is_skipped_in_auto_on_a_conv_net_and_node_errors_stream(cnn, tmp_path):
    from edgeship.converters.quantization import _dynamic_worth_trying

    assert not _dynamic_worth_trying(cnn["onnx"])
    res = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], engines=("onnxruntime",), activation_types=("uint8",),
                   quiet=True, repeats=3, recovery_steps=0, work_dir=tmp_path / "w", allow_fp32=True,
                   max_drop=50.0, analyze=True, metric="cosine")
    assert {c.name for c in res.candidates} == {"fp32", "ort-u8-minmax", "ort-u8-minmax-pt"}
    rep = res.report["targets"]["onnx"]
    if res.chosen["onnx"] != "fp32":
        assert rep["node_errors"] and "per-node error" in rep["phases"]
    rows = node_errors(tmp_path / "w" / "fp32.prep.onnx", tmp_path / "w" / "ort-u8-minmax.onnx",
                       load_data(np.load(cnn["calib"]), input_names=["input"]), work_dir=tmp_path, max_samples=3,
                       batch=2)
    grouped = {n for r in rows for n in r["nodes"]}        # a Conv fused with its Relu shares the Relu's row
    assert {"conv1", "conv2", "fc"} <= grouped and all(r["sqnr_db"] > 0 for r in rows)
    assert not list(tmp_path.glob("aug-*.onnx"))   # the augmented copies are gone


def test_nncf_is_a_candidate_with_its_ignored_scope(cnn, tmp_path):
    pytest.importorskip("nncf")
    import onnx

    res = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], method="static", engines=("nncf",), quiet=True,
                   repeats=3, recovery_steps=0, work_dir=tmp_path / "w", allow_fp32=True, max_drop=50.0,
                   metric="cosine", exclude_nodes=["fc"])
    c = next(c for c in res.candidates if c.name == "nncf")
    assert c.error is None and c.engine == "nncf" and c.points is not None and c.drop is not None
    m = onnx.load(c.path)
    producers = {o: n for n in m.graph.node for o in n.output}
    fc = next(n for n in m.graph.node if n.name == "fc")
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    # the excluded Gemm reads float weights; the convolutions read dequantized int8 ones
    assert fc.input[1] not in producers or producers[fc.input[1]].op_type != "DequantizeLinear"
    assert producers[conv2.input[1]].op_type == "DequantizeLinear"


def test_quantize_knob_errors_are_one_line(mlp):
    for kw, msg in [({"activation_types": ("int4",)}, "activation type"), ({"weight_type": "fp8"}, "weight type"),
                    ({"engines": ("tvm",)}, "engine"), ({"samples": 3}, "samples"),
                    ({"model_type": "cnn"}, "model type"), ({"calibrations": ()}, "calibrations")]:
        with pytest.raises(ConversionError, match=msg) as info:
            quantize(mlp["onnx"], mlp["calib"], mlp["eval"], quiet=True, **kw)
        assert "\n" not in str(info.value)


def test_cli_quantize_knobs_reach_the_model(cnn, tmp_path):
    import json

    import onnx

    out = tmp_path / "knobs.edgepkg"
    run_cli("convert", "quantize", str(cnn["onnx"]), "--calib", str(cnn["calib"]), "--eval", str(cnn["eval"]),
            "--out", str(out), "--method", "static", "--engine", "onnxruntime", "--activation-type", "uint8",
            "--no-per-channel", "--calibration-method", "minmax", "--exclude-nodes", "fc", "--op-types", "Conv,Gemm",
            "--samples", "16", "--max-drop", "50", "--metric", "cosine", "--allow-fp32", "--no-fp32-variant", "-q")
    from edgeship.package import open_package

    pkg = open_package(out)
    rep = json.loads(pkg.read("report.json"))["targets"]["onnx"]
    assert [c["name"] for c in rep["candidates"]] == ["fp32", "ort-u8-minmax-pt"]
    assert rep["calibration_samples"] == 16 and len(pkg.manifest["variants"]) == 1
    if rep["chosen"] != "fp32":
        m = onnx.load_from_string(pkg.read("model.onnx"))
        ops = {n.name: n.op_type for n in m.graph.node}
        producers = {o: n for n in m.graph.node for o in n.output}
        fc = next(n for n in m.graph.node if n.name == "fc")
        assert producers.get(fc.input[0]) is None or producers[fc.input[0]].op_type != "DequantizeLinear"
        w_scales = [i for i in m.graph.initializer if i.name.startswith("w1") and i.name.endswith("_scale")]
        assert w_scales and all(len(i.dims) == 0 or i.dims == [1] for i in w_scales)   # per-tensor weights
        assert "QuantizeLinear" in ops.values()
    bad = run_cli("convert", "quantize", str(cnn["onnx"]), "--calib", str(cnn["calib"]), "--eval", str(cnn["eval"]),
                  "--out", str(tmp_path / "bad.edgepkg"), "--iou-threshold", "0.5", check=False)
    assert bad.returncode != 0 and "only apply with --metric iou" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_reference_stats_reuse_known_outputs(mlp):
    from edgeship.converters.refstats import compute_reference_stats

    calib, evald = np.load(mlp["calib"]), np.load(mlp["eval"])
    fresh = compute_reference_stats(mlp["onnx"], [calib, evald])
    outs = [ev.predict(mlp["onnx"], load_data(a, input_names=["input"])) for a in (calib, evald)]
    reused = compute_reference_stats(mlp["onnx"], [calib, evald], outputs=outs)
    assert reused == fresh
    with pytest.raises(DataError, match="output rows"):
        compute_reference_stats(mlp["onnx"], [calib, evald], outputs=[outs[0], outs[0][:3]])


@pytest.mark.slow
def test_target_bench_from_the_device_decides_fp32_vs_int8(cnn, tmp_path):
    """The whole loop: a package with fp32 + int8 variants, `edgeship bench --variant --json` of each
    (here this machine stands in for the device), then quantize --target-bench decides by those figures."""
    import json

    from edgeship.agent.bench import run_bench
    from edgeship.package import open_package

    out = tmp_path / "both.edgepkg"
    kw = dict(engines=("onnxruntime",), activation_types=("uint8",), quiet=True, repeats=3, recovery_steps=0,
              max_drop=50.0, metric="cosine", method="static")
    quantize(cnn["onnx"], cnn["calib"], cnn["eval"], out=out, **kw)
    variants = {v["id"]: v for v in open_package(out).manifest["variants"]}
    assert set(variants) == {"onnx-int8", "onnx-fp32"} and variants["onnx-int8"]["default"]
    files = []
    for vid in ("onnx-fp32", "onnx-int8"):
        r = run_bench(out, variant=vid, seconds=0.2, quiet=True)
        assert r["variant"] == vid and r["precision"] == vid.split("-")[1]
        files.append(tmp_path / f"{vid}.json")
        files[-1].write_text(json.dumps(r))
    res = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], target_bench=files, **{**kw, "method": "auto"})
    dec = res.decisions["onnx"]
    ratio = json.loads(files[1].read_text())["raw_latency_ms_b1"]["p50"] / \
        json.loads(files[0].read_text())["raw_latency_ms_b1"]["p50"]
    assert (dec.chosen == "fp32") == (ratio > 1.05)                    # the device's figures decided
    assert f"{os.uname().machine} with {os.cpu_count()} CPUs" in dec.reason and "edgeship bench" in dec.reason
    assert res.report["targets"]["onnx"]["decided_on"]["machine"].startswith(os.uname().machine)


def test_staged_search_runs_nncf_after_onnxruntime_and_escalates_only_when_nothing_meets_the_budget(cnn, tmp_path):
    pytest.importorskip("nncf")
    kw = dict(method="static", quiet=True, repeats=3, recovery_steps=0, allow_fp32=True, metric="cosine")
    easy = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], max_drop=50.0, work_dir=tmp_path / "a", **kw)
    # both peers' defaults compete (plain ORT = u8 per-tensor MinMax; NNCF), nothing escalates
    assert [c.name for c in easy.candidates] == ["fp32", "ort-u8-minmax", "ort-u8-minmax-pt", "nncf"]
    notes = easy.report["targets"]["onnx"]["notes"]
    assert "escalated" not in notes and notes["engines"] == ["onnxruntime", "nncf"]
    assert all(c.latency_b1_ms is not None for c in easy.candidates)        # all in budget: all timed
    hard = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], max_drop=0.0, work_dir=tmp_path / "b", **kw)
    names = [c.name for c in hard.candidates]
    assert names[:5] == ["fp32", "ort-u8-minmax", "ort-u8-minmax-pt", "nncf", "ort-s8-minmax"]
    assert hard.report["targets"]["onnx"]["notes"]["escalated"][0] == "ort-s8-minmax"
    # candidates out of budget cannot be chosen, so they are not timed
    assert all(c.latency_b1_ms is None for c in hard.candidates if c.meets_budget is False)


def test_nncf_is_skipped_when_an_onnxruntime_candidate_already_equals_fp32(cnn, tmp_path):
    pytest.importorskip("nncf")
    res = quantize(cnn["onnx"], cnn["calib"], cnn["eval"], method="static", quiet=True, repeats=3,
                   recovery_steps=0, allow_fp32=True, metric="agreement", max_drop=50.0, work_dir=tmp_path / "w")
    ort = [c for c in res.candidates if c.engine == "onnxruntime"]
    skipped = res.report["targets"]["onnx"]["notes"].get("skipped", [])
    # agreement with fp32 cannot exceed 100 %, which u8 MinMax reaches on this CNN: NNCF is not run
    assert any(c.drop <= 0 for c in ort)
    assert "nncf" not in [c.name for c in res.candidates] and skipped and "nncf" in skipped[0]
    # on a metric against labels fp32 is no ceiling, so the peer still runs
    rng = np.random.default_rng(5)
    labelled = {"input": np.load(cnn["eval"]), "labels": rng.integers(0, 4, 40)}
    res = quantize(cnn["onnx"], cnn["calib"], labelled, method="static", quiet=True, repeats=3, recovery_steps=0,
                   allow_fp32=True, metric="top1", max_drop=50.0, work_dir=tmp_path / "t")
    assert "nncf" in [c.name for c in res.candidates]


def _qdq_scales(path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[1]] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits]


def test_nncf_candidate_is_nncf_default_on_single_samples_though_run_in_batches(cnn, tmp_path):
    """The NNCF candidate must be the NNCF peer's configuration: its default activation ranges are means of
    per-sample min/max, so batches of 16 fed as plain items (the old code) gave other, wider ranges."""
    nncf = pytest.importorskip("nncf")
    import contextlib
    import io

    import onnx

    from edgeship.converters.quantization import _build_nncf, _feeds

    data = load_data(np.load(cnn["calib"]), input_names=["input"])
    ours = tmp_path / "ours.onnx"
    _build_nncf(cnn["onnx"], ours, feeds=_feeds(data, 16, None), exclude=[], transformer=False)
    singles = [{"input": data.inputs["input"][i:i + 1]} for i in range(len(data))]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        peer = nncf.quantize(onnx.load(str(cnn["onnx"])), nncf.Dataset(singles), subset_size=len(singles))
    onnx.save(peer, str(tmp_path / "peer.onnx"))
    a, b = _qdq_scales(ours), _qdq_scales(tmp_path / "peer.onnx")
    assert len(a) == len(b) >= 3
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4)


def test_calibration_batches_are_sized_by_input_bytes():
    from edgeship.converters.quantization import CALIB_BATCH_BYTES, _batch_for

    small = Dataset({"input": np.zeros((64, 64), np.float32)})                  # 256 B a sample: full batch
    big = Dataset({"x": np.zeros((4, 3, 320, 320), np.float32)})                # 1.2 MB a sample: one at a time
    two = Dataset({"ids": np.zeros((8, 64), np.int64), "mask": np.zeros((8, 64), np.int64)})
    assert _batch_for(small, 32, CALIB_BATCH_BYTES) == 32 and _batch_for(big, 32, CALIB_BATCH_BYTES) == 1
    assert _batch_for(two, 32, 4 * 1024) == 4                                   # every input counts


def test_nncf_is_imported_without_torch_and_torch_stays_importable():
    pytest.importorskip("nncf")
    import subprocess
    import sys

    code = ("import sys\n"
            "from edgeship.converters.quantization import _without_torch\n"
            "with _without_torch():\n"
            "    import nncf\n"
            "assert 'nncf' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)[:5]\n"
            "import importlib.util; assert importlib.util.find_spec('torch') is not None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
