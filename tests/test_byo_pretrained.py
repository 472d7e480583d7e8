"""Real pretrained models from the package index through the whole path (#20).

The three PP-OCR ONNX models in the installed ``rapidocr-onnxruntime`` wheel
(``edgeship.demo_data.pretrained``; nothing downloaded): a text detector
(dense probability map, any H×W in steps of 32), a CTC recognizer (48-pixel
lines of any width) and a 2-class angle classifier (48×192). Each is
packaged as a user would (declared sizes, PP-OCR's preprocess, a built-in
postprocess), verified, loaded through ``edgeship.runtime`` and served by
the agent's HTTP API, each checked against raw onnxruntime on the same
input. The inputs are rendered text, so the answers can be checked too: the
recognizer reads the words, the classifier tells upright from turned lines.

The slow tests take the classifier through ``convert quantize``, the ONNX ->
TFLite route and ``edgeship bench``; benchmarks/byo_models.py all three.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from test_agent_api import call

from edgeship import package as P
from edgeship import runtime
from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.demo_data import pretrained

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

NAMES = ["ocr_det", "ocr_rec", "ocr_cls"]
WORDS = {w.replace(" ", "") for w in pretrained._WORDS}


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    try:
        paths = pretrained.rapidocr_models()
    except LookupError as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("ocr")
    return {name: (path, P.build(d / f"{name}.edgepkg", path, name=name, version="1",
                                 **pretrained.ocr_package_args(name)))
            for name, path in paths.items()}


def raw(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def check_answer(name: str, answers: list[dict]) -> None:
    """What a trained model says about rendered text (not random weights)."""
    if name == "ocr_det":
        assert all(0.02 < a["positive"] < 0.6 for a in answers), [a["positive"] for a in answers]
    elif name == "ocr_rec":
        read = [a["text"].replace(" ", "") for a in answers]
        assert sum(t in WORDS for t in read) >= len(read) - 1, read
    else:  # ocr_images turns every second line 180 degrees
        assert [a["label"] for a in answers] == ["0", "180"] * (len(answers) // 2)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_model_packages_verifies_and_serves_equal_to_raw_onnxruntime(name, ocr, tmp_path,
                                                                                monkeypatch):
    path, pkg = ocr[name]
    assert P.verify(pkg)
    x = pretrained.ocr_inputs(name, 4, seed=11)
    want = raw(path, x)
    monkeypatch.chdir(tmp_path)  # loads from the package alone, away from the wheel's folder
    with runtime.load(pkg) as r:
        out_name = r.output_names[0]
        got = r.run({"x": x})[out_name]
        np.testing.assert_allclose(got, want, atol=1e-4)
        from edgeship.runtime.postprocess import apply

        check_answer(name, [apply(r.postprocess_spec, {out_name: g}, P.open_package(pkg).labels) for g in got])
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "batcher": {"max_batch": 4, "max_delay_ms": 0}, "api": {"enabled": True, "port": 0}}))
    with agent:
        # Model-ready rows: outputs equal raw onnxruntime, the hook's answer beside them.
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": x[0].tolist(), "input": "model"}))
        assert status == 200, body
        np.testing.assert_allclose(body["outputs"][out_name], want[0], atol=1e-4)
        # A raw image, as an app sends it: the package's PP-OCR preprocess turns it into x.
        imgs = pretrained.ocr_images(name, 2, seed=11)
        answers = []
        for img in imgs:
            status, body, _ = call(agent, "POST", "/v1/infer?outputs=0", png(img), "image/png")
            assert status == 200 and "outputs" not in body, body
            answers.append(body)
        check_answer(name, answers)
        # Sizes the package refuses, in one line: the detector's steps of 32, the text models' 48-pixel lines.
        bad = np.zeros((3, 64, 80) if name == "ocr_det" else (3, 32, 192), np.float32)
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": bad.tolist(), "input": "model"}))
        assert status == 400 and ("multiple of 32" if name == "ocr_det" else "48") in body["error"], body


# ------------------------------------------------------------------ slow: quantize, TFLite, bench
# On the angle classifier only (the smallest; ~1 min in all): benchmarks/byo_models.py takes all three
# models through these steps, and test_a_resize_by_scales_converts_to_tflite covers what the detector needed.

@pytest.mark.slow
def test_pretrained_classifier_quantizes_within_budget(ocr, tmp_path):
    from edgeship.converters import quantize
    from edgeship.converters.quantization import MIN_CALIB_SAMPLES, MIN_EVAL_SAMPLES

    path, pkg = ocr["ocr_cls"]
    calib = pretrained.ocr_inputs("ocr_cls", MIN_CALIB_SAMPLES, seed=1)
    evald = pretrained.ocr_inputs("ocr_cls", MIN_EVAL_SAMPLES, seed=2)
    out = tmp_path / "q.edgepkg"
    # One candidate (onnxruntime u8 MinMax): the search itself is tests/test_quantize*.py's.
    res = quantize(pkg, calib, evald, max_drop=2.0, metric="agreement", out=out, quiet=True, repeats=1,
                   both_precisions=False, engines=["onnxruntime"], calibrations=["minmax"],
                   activation_types=("uint8",))
    dec = res.decisions["onnx"]
    best = next(c for c in res.candidates if c.name == (dec.best_int8 or dec.chosen))
    assert best.precision == "int8" and best.drop <= 2.0 and best.metric_value >= 0.9
    # The package written holds what was chosen (int8, or fp32 where int8 is slower here) and runs.
    with runtime.load(out) as r:
        assert r.variant["precision"] == ("int8" if dec.chosen == best.name else "fp32")
        got = next(iter(r.run({"x": evald[:2]}).values()))
        assert got.shape == (2, 2) and np.argmax(got, 1).tolist() == np.argmax(raw(path, evald[:2]), 1).tolist()


@pytest.mark.slow
def test_pretrained_classifier_converts_to_tflite_equal_to_onnxruntime(ocr, tmp_path):
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    path, _ = ocr["ocr_cls"]
    x = pretrained.ocr_inputs("ocr_cls", 1, seed=3)
    res = onnx_to_tflite(path, tmp_path / "m.tflite", {"x": x})
    pkg = P.build(tmp_path / "t.edgepkg", res.path, name="ocr_cls", version="1")
    with runtime.load(pkg) as r:
        np.testing.assert_allclose(next(iter(r.run({"x": x}).values())), raw(path, x), atol=1e-4)


@pytest.mark.slow
def test_pretrained_classifier_bench_runs_through_the_agent(ocr):
    from edgeship.agent.bench import run_bench

    r = run_bench(ocr["ocr_cls"][1], seconds=0.3, quiet=True)
    # bench's pool is model-ready: the package's preprocess (a resize to 48x192) is not applied to it again
    # (it was, and every block was rejected: agent throughput 0).
    assert r["agent_latency_ms_b1"]["p50"] > 0 and r["raw_throughput"]["8"] > 0, r
    assert r["agent_throughput"]["1"] > 0 and r["agent_throughput"]["8"] > 0, r["agent_throughput"]
