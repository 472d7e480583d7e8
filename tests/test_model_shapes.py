"""Model shapes beyond one float image tensor (issue 20.4), through edgeship.runtime and packages.

Real models from ``edgeship.demo_data.zoo`` exported to ONNX (a two-input
text transformer, a GRU keyword spotter with state in/out, a detector with
dynamic H x W), a hand-written ONNX model with a scalar input, and an
int8-IO TFLite model. Every float output is compared with raw onnxruntime /
LiteRT within 1e-4. The agent and HTTP API side is in
tests/test_model_shapes_agent.py.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from models import OPSET, make_mlp_int8_tflite, mlp_reference

from edgeship import package as P
from edgeship.agent.batcher import BatchPolicy, Work
from edgeship.errors import ConfigError, InputError, PackageFormatError
from edgeship.runtime import load
from edgeship.runtime.postprocess import apply, check_postprocess, nms
from edgeship.runtime.state import looks_stateful, parse_state
from edgeship.tensorspec import TensorSpec

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

GRU_FEATURES, GRU_HIDDEN, GRU_CLASSES, GRU_T = 40, 64, 12, 10
GRU_STATE = [{"input": "h", "output": "h_out", "batch_axis": 1}]
KWS_LABELS = [f"kw{i}" for i in range(GRU_CLASSES)]
TEXT_LABELS = ["neg", "neu", "pos"]
DET_POST = {"kind": "boxes", "layout": "grid", "stride": 8, "score_threshold": 0.05, "iou_threshold": 0.5,
            "max_detections": 20}


def _legacy_export(model, args, path: Path, inputs, outputs, axes) -> Path:
    # The dynamo exporter cannot mark h's batch at dim 1 (nor H/W with data-independent names
    # through export_onnx); the legacy exporter takes dynamic_axes per tensor.
    from edgeship.converters.onnx_export import _quiet_exporter

    with _quiet_exporter():
        torch.onnx.export(model.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, dynamo=False, opset_version=OPSET)
    return path


def make_zoo_models(d: Path) -> dict:
    """Export the zoo models once (module fixture): paths by kind."""
    from edgeship.converters.onnx_export import export_onnx
    from edgeship.demo_data import zoo

    torch.manual_seed(0)
    out = {}
    with warnings.catch_warnings():  # the tracer's notes on torch's own shape checks, not ours to act on
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _export_all(d, out, export_onnx, zoo)
    out["scalar"] = make_scalar_onnx(d / "scalar.onnx")
    return out


def _export_all(d: Path, out: dict, export_onnx, zoo) -> None:
    text = zoo.TextTransformer(vocab=500, seq_len=16, num_classes=3, dim=32, layers=1)
    ids = np.random.default_rng(0).integers(0, 500, (2, 16)).astype(np.int64)
    export_onnx(text, (ids, np.ones_like(ids)), d / "text.onnx", input_names=("ids", "mask"),
                output_names=("logits",), exporter="torchscript")
    out["text"] = d / "text.onnx"
    gru = zoo.GRUKeywordSpotter(n_features=GRU_FEATURES, hidden=GRU_HIDDEN, num_classes=GRU_CLASSES)
    out["gru"] = _legacy_export(gru, (torch.randn(2, GRU_T, GRU_FEATURES), torch.zeros(1, 2, GRU_HIDDEN)),
                                d / "gru.onnx", ["frames", "h"], ["logits", "h_out"],
                                {"frames": {0: "batch"}, "h": {1: "batch"}, "logits": {0: "batch"},
                                 "h_out": {1: "batch"}})
    det = zoo.TinyDetector(num_classes=2)
    out["det"] = _legacy_export(det, (torch.randn(2, 3, 64, 96),), d / "det.onnx", ["image"], ["dense"],
                                {"image": {0: "batch", 2: "h", 3: "w"}, "dense": {0: "batch", 2: "gh", 3: "gw"}})


def make_scalar_onnx(path: Path) -> Path:
    """audio [batch, 16] float32 and rate (a scalar float32) -> scaled = audio * rate / 16000 [batch, 16]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = numpy_helper.from_array(np.array(1 / 16000, dtype=np.float32), "k")
    nodes = [helper.make_node("Mul", ["rate", "k"], ["r"]), helper.make_node("Mul", ["audio", "r"], ["scaled"])]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 16]),
                                                helper.make_tensor_value_info("rate", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 16])],
                              initializer=[k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return path


def build_shape_packages(d: Path, models: dict) -> dict:
    """One package per shape; the GRU also as v2 (same weights, another sha) for switches."""
    det_in = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, -1, -1], "multiple_of": 32}]
    return {
        "text": P.build(d / "text.edgepkg", models["text"], name="text", version="1", labels=TEXT_LABELS,
                        postprocess={"kind": "topk", "k": 2}),
        "gru": P.build(d / "gru.edgepkg", models["gru"], name="kws", version="1", labels=KWS_LABELS,
                       state=GRU_STATE),
        "gru2": P.build(d / "gru2.edgepkg", models["gru"], name="kws", version="2", labels=KWS_LABELS,
                        state=GRU_STATE),
        "det": P.build(d / "det.edgepkg", models["det"], name="det", version="1", labels=["cat", "dog"],
                       inputs=det_in, postprocess=DET_POST),
        "scalar": P.build(d / "scalar.edgepkg", models["scalar"], name="scalar", version="1"),
        "int8": P.build(d / "int8.edgepkg", make_mlp_int8_tflite(d / "mlp_int8.tflite"), name="int8io",
                        version="1", labels=[f"c{i}" for i in range(10)]),
    }


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    return make_zoo_models(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory, zoo_models):
    return build_shape_packages(tmp_path_factory.mktemp("shape-pkgs"), zoo_models)


def raw_ort(path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def gru_windows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, GRU_T, GRU_FEATURES)).astype(np.float32)


def gru_reference(path, windows: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """One stream alone through raw onnxruntime, h fed back by hand: logits per window, final h."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h = np.zeros((1, 1, GRU_HIDDEN), np.float32)
    logits = []
    for w in windows:
        lg, h = sess.run(None, {"frames": w[None], "h": h})
        logits.append(lg[0])
    return logits, h


# ------------------------------------------------------------------ several inputs

def test_text_model_two_int64_inputs_equals_raw_onnxruntime(pkgs, zoo_models):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 500, (3, 16)).astype(np.int64)
    mask = (np.arange(16)[None] < np.array([[16], [9], [4]])).astype(np.int64)
    with load(pkgs["text"]) as r:
        assert [(s.name, s.dtype) for s in r.inputs] == [("ids", "int64"), ("mask", "int64")]
        got = r.run({"ids": ids, "mask": mask})["logits"]
        post = r.postprocess({"logits": got})
    want = raw_ort(zoo_models["text"], {"ids": ids, "mask": mask})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [p["label"] for p in post] == [TEXT_LABELS[i] for i in want.argmax(1)]
    assert all(len(p["top"]) == 2 and p["top"][0][1] >= p["top"][1][1] for p in post)


# ------------------------------------------------------------------ state

def test_gru_stream_carries_state_equal_to_raw_onnxruntime(pkgs, zoo_models):
    windows = gru_windows(5, seed=3)
    want, want_h = gru_reference(zoo_models["gru"], windows)
    with load(pkgs["gru"]) as r:
        assert [p.input for p in r.state] == ["h"] and [s.name for s in r.data_inputs] == ["frames"]
        assert r.batch_size is None  # h's fixed axis 0 (layers) is not a batch
        s = r.stream()
        got = [s.run(w[None])["logits"][0] for w in windows]
        np.testing.assert_allclose(s.state["h"], want_h, atol=1e-4)
        assert set(s.run(windows[0][None])) == {"logits"}  # the state stays inside the stream
        s.reset()
        np.testing.assert_allclose(s.run(windows[0][None])["logits"][0], want[0], atol=1e-4)
        with pytest.raises(InputError, match="carries 'h' itself"):
            s.run({"frames": windows[0][None], "h": np.zeros((1, 1, GRU_HIDDEN), np.float32)})
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-4)
    # Without the stream the state must be fed by hand, and a stateless restart differs.
    assert not np.allclose(want[1], gru_reference(zoo_models["gru"], windows[1:2])[0][0], atol=1e-4)


def test_stateful_model_without_declared_state_is_one_line_at_build_and_load(tmp_path, pkgs, zoo_models):
    with pytest.raises(ConfigError, match=r"looks stateful \(input 'h' \[1, \?, 64\] comes back as output "
                                          r"'h_out'\) but the manifest declares no state") as ei:
        P.build(tmp_path / "kws.edgepkg", zoo_models["gru"], name="kws", version="1")
    assert "\n" not in str(ei.value) and not (tmp_path / "kws.edgepkg").exists()
    # A package whose manifest lost its state (built elsewhere, edited) is refused at load, in one line.
    bad = tmp_path / "nostate.edgepkg"
    with zipfile.ZipFile(pkgs["gru"]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "manifest.json":
                m = json.loads(data)
                del m["state"]
                data = json.dumps(m).encode()
            zout.writestr(item, data)
    with pytest.raises(PackageFormatError, match="looks stateful") as ei:
        load(bad)
    assert "\n" not in str(ei.value)
    # state=[] says "stateless on purpose"; a state naming a missing tensor is refused.
    P.build(tmp_path / "ok.edgepkg", zoo_models["gru"], name="kws", version="1", state=[])
    with pytest.raises(ConfigError, match="state names 'hidden', which is not a model input"):
        P.build(tmp_path / "x.edgepkg", zoo_models["gru"], name="kws", version="1",
                state=[{"input": "hidden", "output": "h_out"}])


def test_looks_stateful_rules_are_specific():
    f = TensorSpec("x", "float32", (-1, 4))
    assert looks_stateful([f, TensorSpec("state_in", "float32", (-1, 4))],
                          [TensorSpec("y", "float32", (-1, 4)), TensorSpec("state_out", "float32", (-1, 4))]) \
        == ("state_in", "state_out")
    # a classifier whose input and output shapes happen to agree is not stateful
    assert looks_stateful([f], [TensorSpec("logits", "float32", (-1, 4))]) is None
    assert looks_stateful([f], [TensorSpec("x_out", "float32", (-1, 5))]) is None
    with pytest.raises(PackageFormatError, match="batch_axis 3 is out of range"):
        parse_state([{"input": "h", "output": "h_out", "batch_axis": 3}],
                    [f, TensorSpec("h", "float32", (1, -1, 8))], [TensorSpec("h_out", "float32", (1, -1, 8))])


# ------------------------------------------------------------------ dynamic spatial sizes

def test_detector_dynamic_sizes_equal_raw_onnxruntime_and_steps_of_32(pkgs, zoo_models):
    rng = np.random.default_rng(2)
    with load(pkgs["det"]) as r:
        assert r.inputs[0].shape == (-1, 3, -1, -1) and r.inputs[0].multiple_of == 32
        for h, w in ((64, 96), (128, 32), (32, 32)):
            x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
            got = r.run(x)["dense"]
            assert got.shape == (2, 7, h // 8, w // 8)
            np.testing.assert_allclose(got, raw_ort(zoo_models["det"], {"image": x})[0], atol=1e-4)
        with pytest.raises(InputError, match="axis 2 must be a multiple of 32 \\(got 40\\)"):
            r.run(np.zeros((1, 3, 40, 64), np.float32))
        dets = r.postprocess({"dense": got})
    assert len(dets) == 2 and all(set(d) == {"detections"} for d in dets)
    for d in dets[0]["detections"]:
        assert d["label"] in ("cat", "dog") and 0.05 <= d["score"] <= 1 and len(d["box"]) == 4


# ------------------------------------------------------------------ scalar inputs

def test_scalar_input_next_to_a_batched_one(pkgs):
    x = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    with load(pkgs["scalar"]) as r:
        assert r.batch_size is None  # the scalar does not make the model "batch 1"
        got = r.run({"audio": x, "rate": np.float32(8000)})["scaled"]
        with pytest.raises(InputError, match="input 'rate' has shape \\[1\\] \\(rank 1\\)"):
            r.run({"audio": x, "rate": np.array([8000], np.float32)})
    np.testing.assert_allclose(got, x * 0.5, atol=1e-6)


# ------------------------------------------------------------------ int8 IO

def test_int8_io_tflite_quantizes_in_and_dequantizes_out(pkgs, tmp_path):
    from edgeship.runtime._backends import open_tflite

    x = np.random.default_rng(5).uniform(-3, 3, (4, 64)).astype(np.float32)
    with load(pkgs["int8"]) as r:
        (qin,), (qout,) = r.model_inputs, r.model_outputs
        assert qin.dtype == qout.dtype == "int8" and qin.quantization and qout.quantization
        got = r.run(x)["logits"]
    # Raw LiteRT with the quantization done by hand gives the same numbers.
    interp, _ = open_tflite(make_mlp_int8_tflite(tmp_path / "raw.tflite"))
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = i["quantization"], o["quantization"]
    interp.resize_tensor_input(i["index"], [4, 64])
    interp.allocate_tensors()
    interp.set_tensor(i["index"], np.clip(np.rint(x / s_in) + z_in, -128, 127).astype(np.int8))
    interp.invoke()
    want = (interp.get_tensor(o["index"]).astype(np.float32) - z_out) * s_out
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - mlp_reference(x)).max() < 20 * s_out  # int8 all the way: a few output steps


# ------------------------------------------------------------------ postprocess hooks (pure)

def test_postprocess_hooks():
    labels = ["a", "b", "c"]
    topk = check_postprocess({"kind": "topk", "k": 2, "activation": "sigmoid", "threshold": 0.5})
    out = apply(topk, {"y": np.array([3.0, -3.0, 0.5])}, labels)
    assert out["label"] == "a" and [t[0] for t in out["top"]] == ["a", "c"]
    mask = apply(check_postprocess({"kind": "threshold", "threshold": 0.0, "activation": "none"}),
                 {"m": np.array([[-1.0, 2.0], [3.0, -4.0]])})
    assert mask["mask"].tolist() == [[0, 1], [1, 0]] and mask["positive"] == 0.5
    # rows layout: two overlapping boxes of one class -> one; a third of another class stays
    rows = np.array([[0, 0, 10, 10, 0.9, 1, 0], [1, 1, 11, 11, 0.8, 1, 0], [0, 0, 10, 10, 0.7, 0, 1],
                     [50, 50, 60, 60, 0.1, 1, 0]], np.float32)
    dets = apply(check_postprocess({"kind": "boxes", "layout": "rows", "score_threshold": 0.2}),
                 {"rows": rows}, ["cat", "dog"])["detections"]
    assert [(d["label"], round(d["score"], 3)) for d in dets] == [("cat", 0.9), ("dog", 0.7)]
    # grid layout: one confident cell at (gy=1, gx=2), stride 8, zero offsets -> a 8x8 box centred there
    g = np.full((7, 3, 4), -20.0, np.float32)
    g[:5, 1, 2] = [20, 0, 0, 0, 0]
    g[5:, 1, 2] = [5, -5]
    (d,) = apply(check_postprocess({"kind": "boxes"}), {"dense": g}, ["cat", "dog"])["detections"]
    assert d["label"] == "cat" and d["box"] == [16.0, 8.0, 24.0, 16.0]
    assert nms(np.array([[0, 0, 1, 1], [0, 0, 1, 1.0]]), np.array([0.5, 0.6]), 0.5, 10) == [1]
    for bad, msg in (({"kind": "nms"}, "kind one of"), ({"kind": "topk", "k": 0}, "k must be an integer"),
                     ({"kind": "boxes", "iou": 1}, "unknown key 'iou'")):
        with pytest.raises(PackageFormatError, match=msg):
            check_postprocess(bad)


# ------------------------------------------------------------------ batching compatible work (pure)

def _w(group=None, stream=None, n=1):
    return Work([np.zeros((n, 1))], n, t_in=0.0, group=group, stream=stream)


def test_batch_policy_takes_one_group_and_one_row_per_stream():
    p = BatchPolicy(max_batch=8, max_delay_s=0.0)
    ws = [_w("A"), _w("B"), _w("A"), _w("B"), _w("A")]
    for w in ws:
        p.offer(w, 0.0)
    first = p.take(0.0)
    assert [s.work for s in first] == [ws[0], ws[2], ws[4]] and [s.pos for s in first] == [0, 1, 2]
    assert [s.work for s in p.take(0.0)] == [ws[1], ws[3]] and p.pending == 0 and p.keyed == 0
    # streams: two windows of one stream never share a batch, and keep their order
    s = [_w(stream="a"), _w(stream="a"), _w(stream="b"), _w(stream="a"), _w(stream="b")]
    for w in s:
        p.offer(w, 0.0)
    assert [x.work for x in p.take(0.0)] == [s[0], s[2]]
    assert [x.work for x in p.take(0.0)] == [s[1], s[4]]
    assert [x.work for x in p.take(0.0)] == [s[3]]
    # a source block of one stream gives one row per batch
    blk = _w(stream="mic", n=3)
    p.offer(blk, 0.0)
    assert [(x.start, x.count) for x in p.take(0.0)] == [(0, 1)] and p.pending == 2
    assert [(x.start, x.count) for x in p.take(0.0)] == [(1, 1)]
    p.take(0.0)
    assert p.pending == 0 and p.keyed == 0 and blk.done


@pytest.mark.slow
def test_int8_io_tflite_from_litert_torch_through_runtime_and_agent(tmp_path):
    """A real full-integer export (litert-torch PT2E, int8 input and output) of the zoo's 1-D audio CNN."""
    pytest.importorskip("litert_torch")
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.converters.tflite_export import export_tflite_int8
    from edgeship.demo_data import zoo
    from edgeship.runtime._backends import open_tflite

    torch.manual_seed(0)
    model = zoo.AudioCNN1D(num_classes=4).eval()
    rng = np.random.default_rng(6)
    calib = rng.standard_normal((16, 1, 1024)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter stack's deprecation notes
        path = export_tflite_int8(model, calib[:1], calib, tmp_path / "audio_int8.tflite", int8_io=True)
    pkg = P.build(tmp_path / "audio.edgepkg", {"model.tflite": path}, name="audio", version="1",
                  labels=["yes", "no", "up", "down"])
    xs = rng.standard_normal((3, 1, 1024)).astype(np.float32)
    interp, _ = open_tflite(path)
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = i["quantization"], o["quantization"]
    assert i["dtype"] == o["dtype"] == np.int8 and s_in > 0 and s_out > 0
    want = []
    for x in xs:
        interp.set_tensor(i["index"], np.clip(np.rint(x[None] / s_in) + z_in, -128, 127).astype(np.int8))
        interp.invoke()
        want.append((interp.get_tensor(o["index"])[0].astype(np.float32) - z_out) * s_out)
    with load(pkg) as r:
        assert r.quantized_io and r.inputs[0].dtype == "float32" and r.batch_size == 1
        got = np.stack([r.run(x[None])[r.output_names[0]][0] for x in xs])
    np.testing.assert_allclose(got, np.stack(want), atol=1e-4)
    with torch.no_grad():
        fp32 = model(torch.from_numpy(xs)).numpy()
    assert np.abs(got - fp32).max() < 0.1 * (np.abs(fp32).max() + 1e-3) + 4 * s_out  # int8 tracks the float model
    with Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                             "batcher": {"max_batch": 4, "max_delay_ms": 10}})) as agent:
        futs = [agent.submit(x, preprocess=False) for x in xs]
        for f, w in zip(futs, want):
            res = f.result(10)
            np.testing.assert_allclose(next(iter(res.outputs.values())), w, atol=1e-4)
            assert res.label == ["yes", "no", "up", "down"][int(np.argmax(w))]


def test_state_postprocess_and_steps_from_a_package_toml(tmp_path, zoo_models):
    (tmp_path / "pkg.toml").write_text(f'''
name = "kws"
version = "3"
model = "{zoo_models['gru']}"
output = "kws.edgepkg"

[[state]]
input = "h"
output = "h_out"
batch_axis = 1

[postprocess]
kind = "topk"
k = 3
''')
    out = P.build_from_config(tmp_path / "pkg.toml")
    info = P.inspect(out)
    assert info["state"] == [{"input": "h", "output": "h_out", "batch_axis": 1}]
    assert info["postprocess"]["k"] == 3 and info["postprocess"]["activation"] == "softmax"
    text = P.format_inspect(info)
    assert 'state: [{"input": "h", "output": "h_out", "batch_axis": 1}]' in text and "postprocess:" in text
    with load(out) as r:
        assert r.state[0].batch_axis == 1 and r.postprocess_spec["k"] == 3
