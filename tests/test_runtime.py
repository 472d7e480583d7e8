"""edgeship.runtime: one Runner for onnxruntime and TFLite, on real sessions and interpreters."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from models import (
    make_image_mlp_onnx,
    make_mlp_int8_tflite,
    make_mlp_onnx,
    make_mlp_tflite,
    make_multi_io_onnx,
    make_stateful_onnx,
    mlp_reference,
    stateful_reference,
)

from edgeship import package as P
from edgeship import signing
from edgeship.errors import BackendUnavailableError, ConfigError, InputError, ModelError, SignatureError
from edgeship.runtime import OnnxRunner, TensorSpec, TFLiteRunner, load


@pytest.fixture(scope="session")
def m(tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime_models")
    key, pub = signing.keygen(d / "k.key")
    out = {"dir": d, "key": key, "pub": pub,
           "onnx": make_mlp_onnx(d / "mlp.onnx"),
           "onnx_b1": make_mlp_onnx(d / "mlp_b1.onnx", dynamic_batch=False),
           "tflite": make_mlp_tflite(d / "mlp.tflite"),
           "tflite_b4": make_mlp_tflite(d / "mlp_b4.tflite", dynamic_batch=False, batch=4),
           "int8": make_mlp_int8_tflite(d / "mlp_int8.tflite"),
           "multi": make_multi_io_onnx(d / "multi.onnx"),
           "stateful": make_stateful_onnx(d / "stateful.onnx"),
           "image": make_image_mlp_onnx(d / "image.onnx")}
    x = np.random.default_rng(3).uniform(-2, 2, (1, 64)).astype(np.float32)
    out["pkg"] = P.build(d / "mlp.edgepkg", {"model.onnx": out["onnx"], "model.tflite": out["tflite"],
                                              "model_int8.tflite": out["int8"]},
                         name="mlp", version="1.0.0", labels=[str(i) for i in range(10)], example_input=x,
                         signing_key=key)
    return out


@pytest.fixture()
def x():
    return np.random.default_rng(7).uniform(-2, 2, (5, 64)).astype(np.float32)


# ------------------------------------------------------------ same model, two runtimes

def test_onnx_and_tflite_agree_through_the_common_runner(m, x):
    ref = mlp_reference(x)
    with load(m["pkg"], variant="onnx-fp32", trusted_keys=[m["pub"]]) as onnx_r, \
            load(m["pkg"], variant="model.tflite", trusted_keys=[m["pub"]]) as tfl_r:
        assert isinstance(onnx_r, OnnxRunner) and isinstance(tfl_r, TFLiteRunner)
        assert onnx_r.inputs == tfl_r.inputs == [TensorSpec("input", "float32", (-1, 64))]
        assert onnx_r.output_names == tfl_r.output_names == ["logits"]
        a = onnx_r.run(x)["logits"]
        b = tfl_r.run({"input": x})["logits"]
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (5, 10)
        np.testing.assert_allclose(a, ref, atol=1e-5)
        np.testing.assert_allclose(a, b, atol=1e-5)
        # batch sizes change between calls: the TFLite runner resizes its input
        np.testing.assert_allclose(tfl_r.run(x[:2])["logits"], ref[:2], atol=1e-5)
        np.testing.assert_allclose(tfl_r.run(x)["logits"], ref, atol=1e-5)
        assert onnx_r.batch_size is None and tfl_r.batch_size is None
        assert onnx_r.model_info == {"name": "mlp", "version": "1.0.0", "sha256": P.file_sha256(m["pkg"]),
                                     "variant": "onnx-fp32"}
        assert onnx_r.labels == [str(i) for i in range(10)]


def test_backend_reported_and_selectable(m):
    with load(m["onnx"]) as r:
        assert r.backend.startswith("onnxruntime 1.") and "CPUExecutionProvider" in r.backend
    with load(m["tflite"]) as r:
        assert r.backend.startswith("ai_edge_litert ")  # first in the resolution order
    with load(m["pkg"], backend="tflite") as r:
        assert r.kind == "tflite" and r.variant["file"] == "model.tflite"
    with load(m["pkg"], backend="ai_edge_litert", variant="model_int8.tflite") as r:
        assert r.backend.startswith("ai_edge_litert")
    with pytest.raises(ConfigError, match="runs on onnxruntime"):
        load(m["pkg"], variant="onnx-fp32", backend="tflite")
    with pytest.raises(ConfigError, match="unknown backend"):
        load(m["onnx"], backend="coreml")


def test_missing_tflite_backend_is_a_clear_error(m):
    import importlib.util

    if importlib.util.find_spec("tflite_runtime") is not None:
        pytest.skip("tflite_runtime is installed here")
    with pytest.raises(BackendUnavailableError, match="no TFLite interpreter could be imported .*tflite_runtime"):
        load(m["tflite"], backend="tflite_runtime")


def test_int8_tflite_io_is_dequantized(m, x):
    ref = mlp_reference(x)
    with load(m["pkg"], variant="model_int8.tflite") as r:
        assert r.quantized_io
        in_q, out_q = r.model_inputs[0], r.model_outputs[0]
        assert in_q.dtype == "int8" and in_q.quantization is not None
        assert r.inputs[0].dtype == "float32" and r.outputs[0].dtype == "float32"
        y = r.run(x)["logits"]
        assert y.dtype == np.float32
        # int8 all the way through: within a few output quantization steps of the float model
        assert np.abs(y - ref).max() < 4 * out_q.quantization[0]
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.8
        # raw: the caller passes and receives the integer tensors
        scale, zp = in_q.quantization
        q = np.clip(np.rint(x / scale) + zp, -128, 127).astype(np.int8)
        raw = r.run(q, raw=True)["logits"]
        assert raw.dtype == np.int8
        np.testing.assert_allclose((raw.astype(np.float32) - out_q.quantization[1]) * out_q.quantization[0], y,
                                   atol=1e-6)
        with pytest.raises(InputError, match="dtype float32, expected int8"):
            r.run(x, raw=True)


def test_multi_input_multi_output(m):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 3)).astype(np.float32)
    with load(m["multi"]) as r:
        assert r.input_names == ["a", "b"] and r.output_names == ["concat", "scaled"]
        out = r.run({"a": a, "b": b})
        np.testing.assert_allclose(out["concat"], np.concatenate([a, b], axis=1))
        np.testing.assert_allclose(out["scaled"], 2 * a)
        listed = r.run_unchecked(r.validate({"b": b, "a": a}))
        np.testing.assert_allclose(listed[1], 2 * a)
        with pytest.raises(InputError, match="missing input 'b'") as ei:
            r.run({"a": a})
        assert ei.value.input_name == "b"
        with pytest.raises(InputError, match="unknown input 'c'"):
            r.run({"a": a, "b": b, "c": b})
        with pytest.raises(InputError, match="2 inputs .*pass a dict"):
            r.run(a)
        with pytest.raises(InputError, match="input 'b' has batch 2 but 'a' has 3"):
            r.run({"a": a, "b": b[:2]})


def test_stateful_model_threads_state_through_calls(m):
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, 2, 4)).astype(np.float32)
    state = np.zeros((2, 4), np.float32)
    ref_ys, ref_state = stateful_reference(xs, state)
    with load(m["stateful"]) as r:
        ys = []
        for step in xs:
            out = r.run({"x": step, "state_in": state})
            state = out["state_out"]
            ys.append(out["y"])
    np.testing.assert_allclose(np.stack(ys), ref_ys, atol=1e-5)
    np.testing.assert_allclose(state, ref_state, atol=1e-5)
    assert not np.allclose(ys[0], ys[-1])  # the state really changed the outputs


def test_threads_and_optimization_options(m, x):
    with load(m["onnx"], threads=1, optimization="basic") as r:
        opts = r._session.get_session_options()
        assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
        assert r.threads == 1 and r.optimization == "basic"
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-5)
    from edgeship.runtime import default_threads

    with load(m["onnx"]) as r:
        assert r._session.get_session_options().intra_op_num_threads == default_threads()
    with load(m["tflite"], threads=2) as r:
        assert r.threads == 2
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-5)
    with load(m["tflite"], optimization="disable") as r:  # XNNPACK off: the reference kernels
        assert r.optimization == "disable"
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-5)
    for path in (m["onnx"], m["tflite"]):
        with pytest.raises(ConfigError, match="optimization must be one of"):
            load(path, optimization="max")


# ------------------------------------------------------------ validation

def test_wrong_shape_dtype_nan_are_input_errors(m, x):
    for path in (m["onnx"], m["tflite"]):
        with load(path) as r:
            with pytest.raises(InputError, match=r"input 'input' has shape \[5, 63\], expected \[batch, 64\]") as ei:
                r.run(x[:, :63])
            assert (ei.value.input_name, ei.value.expected, ei.value.got) == ("input", (-1, 64), (5, 63))
            with pytest.raises(InputError, match=r"rank 1\), expected \[batch, 64\] \(rank 2\)"):
                r.run(x[0])
            with pytest.raises(InputError, match="dtype int32, expected float32; apply the package's preprocessing"):
                r.run(x.astype(np.int32))
            bad = x.copy()
            bad[2, 5] = np.nan
            with pytest.raises(InputError, match="input 'input' contains NaN"):
                r.run(bad)
            bad[2, 5] = np.inf
            with pytest.raises(InputError, match="contains Inf"):
                r.run(bad)
            # float64 is accepted (cast); the runner still works after refusing input
            assert r.run(x.astype(np.float64))["logits"].shape == (5, 10)


def test_fixed_batch_models(m, x):
    with load(m["onnx_b1"]) as r:
        assert r.batch_size == 1
        with pytest.raises(InputError, match=r"batch must be 1"):
            r.run(x)
        assert r.run(x[:1])["logits"].shape == (1, 10)
    with load(m["tflite_b4"]) as r:
        assert r.batch_size == 4
        with pytest.raises(InputError, match="batch must be 4"):
            r.run(x)
        # predict() splits and pads to the fixed batch
        np.testing.assert_allclose(r.predict(x)["logits"], mlp_reference(x), atol=1e-5)


def test_runtime_failure_is_translated(m, x):
    with load(m["onnx"]) as r:
        with pytest.raises(ModelError, match="onnxruntime failed to run") as ei:
            r.run_unchecked({"input": x.astype(np.int64)})  # the hot path skips validation
        assert ei.value.__cause__ is not None and "\n" not in str(ei.value)
    r = load(m["onnx"])
    r.close()
    with pytest.raises(ModelError, match="is closed"):
        r.run(x)


def test_tflite_runner_serialises_threads(m):
    # One interpreter, several threads with different batch sizes: the lock keeps results intact.
    rng = np.random.default_rng(5)
    feeds = [rng.uniform(-2, 2, (n, 64)).astype(np.float32) for n in (1, 2, 3, 5, 8, 13)]
    errors: list[str] = []
    with load(m["tflite"]) as r:
        def work(i: int) -> None:
            for _ in range(30):
                f = feeds[(i + _) % len(feeds)]
                got = r.run(f)["logits"]
                if not np.allclose(got, mlp_reference(f), atol=1e-5):
                    errors.append(f"thread {i}: wrong result for batch {len(f)}")
                    return
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    assert not errors


# ------------------------------------------------------------ packages, preprocessing, warm-up

def test_load_verifies_signature_and_reads_unpacked_dirs(m, x, tmp_path):
    other_key, other_pub = signing.keygen(tmp_path / "other.key")
    with pytest.raises(SignatureError):
        load(m["pkg"], trusted_keys=[other_pub])
    dest = P.unpack(m["pkg"], tmp_path / "store" / "mlp", [m["pub"]])
    with load(dest, trusted_keys=[m["pub"]], backend="tflite", variant="model.tflite") as r:
        np.testing.assert_allclose(r.run(x)["logits"], mlp_reference(x), atol=1e-5)
        assert r.sha256 == P.file_sha256(m["pkg"])
    with pytest.raises(ConfigError, match="bare model file"):
        load(m["onnx"], trusted_keys=[m["pub"]])
    with pytest.raises(ModelError, match="no such package or model file"):
        load(tmp_path / "nope.edgepkg")


def test_warmup_uses_example_input(m):
    with load(m["pkg"]) as r:
        ex = r.example_input()
        assert ex["input"].shape == (1, 64)
        r.warmup(2)
    with load(m["multi"]) as r:  # no package: zeros of a valid shape
        assert {k: v.shape for k, v in r.example_input().items()} == {"a": (1, 4), "b": (1, 3)}
        r.warmup()


def test_predict_applies_manifest_preprocessing(m, tmp_path):
    from PIL import Image

    pre = {"color": "L", "resize": [8, 8], "scale": 1 / 255, "mean": [0.5], "std": [0.25], "layout": "NCHW"}
    pkg = P.build(tmp_path / "img.edgepkg", m["image"], name="img", version="1", preprocess=pre)
    rng = np.random.default_rng(0)
    img16 = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    png = tmp_path / "digit.png"
    Image.fromarray(img16).save(png)
    # what the preprocessing should produce, computed independently with Pillow's bilinear resize
    small = np.asarray(Image.fromarray(img16).resize((8, 8), Image.BILINEAR), dtype=np.float32)
    want_in = ((small / 255 - 0.5) / 0.25)[None, None]
    with load(pkg) as r:
        want = r.run(want_in)["logits"][0]
        by_path = r.predict(png)["logits"]
        by_bytes = r.predict(png.read_bytes())["logits"]
        by_array = r.predict(img16)["logits"]
        assert by_path.shape == (10,)
        np.testing.assert_allclose(by_path, by_bytes, atol=1e-6)
        np.testing.assert_allclose(by_path, by_array, atol=1e-6)  # a file and its pixels agree
        np.testing.assert_allclose(by_path, want, atol=0.02)  # only uint8 rounding of the resize differs
        exact = r.predict(small.astype(np.uint8))["logits"]  # already 8x8: no resize, exact
        np.testing.assert_allclose(exact, want, atol=1e-4)
        batch = r.predict([png, img16, small])["logits"]
        assert batch.shape == (3, 10)
        np.testing.assert_allclose(batch[0], by_path, atol=1e-6)
        np.testing.assert_allclose(batch[1], by_array, atol=1e-6)
        with pytest.raises(InputError, match="cannot decode the image bytes"):
            r.predict(b"not an image")
        with pytest.raises(InputError, match="does not exist"):
            r.predict(tmp_path / "missing.png")


def test_predict_without_image_steps(m, x):
    pkg = P.build(m["dir"] / "scaled.edgepkg", m["onnx"], name="s", version="1", preprocess={"scale": 0.5})
    with load(pkg) as r:
        np.testing.assert_allclose(r.predict(x[0] * 2)["logits"], mlp_reference(x[:1])[0], atol=1e-5)
        np.testing.assert_allclose(r.predict(x * 2)["logits"], mlp_reference(x), atol=1e-5)


@pytest.mark.slow
def test_litert_torch_converted_model_matches_onnx(m, tmp_path):
    """A TFLite file from the real converter (litert-torch) and the ONNX model, same weights,
    packaged together: the common runner maps the converter's tensor names to the package's."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    from models import mlp_weights

    w1, b1, w2, b2 = mlp_weights()
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        for layer, w, b in ((net[0], w1, b1), (net[2], w2, b2)):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
    tfl = tmp_path / "conv.tflite"
    litert_torch.convert(net, (torch.zeros(1, 64),)).export(str(tfl))
    pkg = P.build(tmp_path / "both.edgepkg", {"model.onnx": m["onnx"], "model.tflite": tfl}, name="mlp",
                  version="1")
    xb = np.random.default_rng(2).uniform(-2, 2, (1, 64)).astype(np.float32)
    with load(pkg, backend="onnxruntime") as a, load(pkg, backend="tflite") as b:
        assert b.input_names == ["input"] and b.output_names == ["logits"]
        assert b.model_inputs[0].name != "input"  # the converter's own name, mapped
        np.testing.assert_allclose(a.run(xb)["logits"], b.run({"input": xb})["logits"], atol=1e-4)
