"""#20 items 2 and 3: torch and ONNX models to float ONNX/TFLite packages, through the real CLI and converters.

Real onnx2fx, litert-torch, LiteRT and onnxruntime; small models so each
conversion takes seconds.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from models import make_mlp_onnx, mlp_reference
from test_byo_external import one_error_line, run

from edgeship import package as pkgmod
from edgeship import runtime
from edgeship.errors import ConversionError

NET_PY = '''
from edgeship.demo_data.zoo import TextTransformer


def Net():
    return TextTransformer(vocab=100, seq_len=16, dim=32, layers=1)
'''


def test_input_specs_parse_names_dtypes_and_the_batch_axis():
    from edgeship.converters.export import parse_input_spec

    s = parse_input_spec("ids:int64[N,64]")
    assert (s.name, s.dtype, s.shape, s.dynamic_batch) == ("ids", "int64", (-1, 64), True)
    assert parse_input_spec("image[1,3,32,32]").shape == (1, 3, 32, 32)
    assert parse_input_spec("image[1,3,32,32]").dtype == "float32"
    for bad in ("ids:int64", "ids:complex[N,3]", "x:float32[N,?]", "x[3,N]"):
        with pytest.raises(ConversionError):
            parse_input_spec(bad)


def dft_onnx(path):
    """A model with DFT (onnxruntime runs it; the ONNX -> torch route has no handler for it)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("DFT", ["x"], ["y"], onesided=1)], "dft",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 9, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_an_op_without_a_tflite_route_is_one_line_and_no_package(tmp_path):
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    model = dft_onnx(tmp_path / "dft.onnx")
    with pytest.raises(ConversionError, match="DFT have no TFLite route"):
        onnx_to_tflite(model, tmp_path / "dft.tflite", {"x": np.ones((1, 16, 1), np.float32)})
    assert not (tmp_path / "dft.tflite").exists()
    line = one_error_line(run("convert", "export", str(model), "--target", "tflite", "--out",
                              str(tmp_path / "dft.edgepkg"), cwd=tmp_path), only=False)
    assert "DFT have no TFLite route" in line
    assert not list(tmp_path.glob("*.edgepkg"))


@pytest.mark.slow
def test_onnx_to_tflite_agrees_with_onnxruntime_and_keeps_the_onnx_names(tmp_path):
    """The README's form: an .onnx to a package holding both formats; the TFLite variant runs = raw onnxruntime."""
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x[:1])
    proc = run("convert", "export", str(model), "--target", "both", "--example", str(tmp_path / "x.npy"), "--out",
               str(tmp_path / "mlp.edgepkg"), "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pkg = pkgmod.verify(tmp_path / "mlp.edgepkg")
    tfl = pkg.variant("tflite")
    assert [s["name"] for s in tfl["inputs"]] == ["input"] and [s["name"] for s in tfl["outputs"]] == ["logits"]
    assert tfl["batch"] == 1 and pkg.variant("onnxruntime")["batch"] == "dynamic"
    with runtime.load(pkg.path, variant="tflite") as r:
        assert r.batch_size == 1
        got = r.predict(x)["logits"]  # 5 samples through a batch-1 file: the runtime splits them
    np.testing.assert_allclose(got, mlp_reference(x), atol=1e-4)


def make_resize_onnx(path):
    """x [1, 2, 4, 6] -> nearest Resize by constant scales (1, 1, 2, 2) -> * 3: how PP-OCR's detector
    (exported from Paddle) upsamples its feature maps."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    three = numpy_helper.from_array(np.array(3, np.float32), "three")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["up"], mode="nearest", name="up_resize"),
             helper.make_node("Mul", ["up", "three"], ["y"])]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 12])],
                              initializer=[scales, three])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.slow
def test_a_resize_by_scales_converts_to_tflite(tmp_path):
    """The scales become plain numbers before torch.export (a traced ``int(size * scale)`` is a
    data-dependent size it refuses: PP-OCR's detector failed so)."""
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    x = np.random.default_rng(0).standard_normal((1, 2, 4, 6)).astype(np.float32)
    res = onnx_to_tflite(make_resize_onnx(tmp_path / "r.onnx"), tmp_path / "r.tflite", {"x": x})
    want = 3 * x.repeat(2, axis=2).repeat(2, axis=3)
    pkg = pkgmod.build(tmp_path / "r.edgepkg", res.path, name="r", version="1")
    with runtime.load(pkg) as r:
        np.testing.assert_allclose(r.run({"x": x})["y"], want, atol=1e-6)


@pytest.mark.slow
def test_a_diverging_conversion_names_the_first_layer_and_writes_nothing(tmp_path):
    """A converter bug (Relu turned into a leaky one) is caught by the gate and pinned on the Relu node."""
    import onnx2fx
    import torch
    from onnx2fx.op_registry import registry_context

    from edgeship.converters.onnx_tflite import onnx_to_tflite

    def leaky(builder, node):
        return builder.call_function(torch.nn.functional.leaky_relu, args=(builder.get_value(node.input[0]), 0.3))

    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    with registry_context():
        onnx2fx.unregister_op("Relu")
        onnx2fx.register_op("Relu", leaky)
        with pytest.raises(ConversionError) as info:
            onnx_to_tflite(model, tmp_path / "mlp.tflite", {"input": x})
    msg = str(info.value)
    assert "TFLite output 'logits' differs from onnxruntime" in msg
    assert "first diverging layer: Relu node" in msg and "'hr'" in msg
    assert "\n" not in msg
    assert not list(tmp_path.glob("*.tflite")) and not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_cli_exports_a_torch_class_with_weights_to_both_formats(tmp_path):
    """file.py:Class + weights + input specs -> ONNX (dynamic batch) + TFLite (batch 1) with the user's names."""
    import torch

    (tmp_path / "net.py").write_text(NET_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        import net
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    module = net.Net().eval()
    torch.save(module.state_dict(), tmp_path / "net.pt")
    proc = run("convert", "export", "net.py:Net", "--weights", "net.pt", "--input", "ids:int64[N,16]",
               "--input", "mask:int64[N,16]", "--output", "logits", "--target", "both", "--out", "net.edgepkg",
               "--name", "text", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote net.edgepkg" in proc.stdout and "tflite (batch 1" in proc.stdout
    pkg = pkgmod.verify(tmp_path / "net.edgepkg")
    assert pkg.name == "text"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (3, 16)).astype(np.int64)
    mask = np.ones((3, 16), np.int64)
    mask[1, 10:] = 0
    with torch.no_grad():
        want = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    for which, batch in (("onnxruntime", "dynamic"), ("tflite", 1)):
        v = pkg.variant(which)
        assert [s["name"] for s in v["inputs"]] == ["ids", "mask"], v["inputs"]  # not args_0 / args_1
        assert [s["name"] for s in v["outputs"]] == ["logits"]
        assert v["batch"] == batch
        with runtime.load(pkg.path, variant=which) as r:
            got = np.concatenate([r.run({"ids": ids[i:i + 1], "mask": mask[i:i + 1]})["logits"] for i in range(3)])
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_cli_torch_route_without_input_spec_is_one_line(tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    line = one_error_line(run("convert", "export", "net.py:Net", "--out", "n.edgepkg", cwd=tmp_path))
    assert "needs --input specs" in line
    assert not (tmp_path / "n.edgepkg").exists()


@pytest.mark.slow
def test_quantize_target_tflite_takes_an_onnx_model(tmp_path):
    """`convert quantize model.onnx --target tflite` (refused before #20) converts through the gated route."""
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x[:32])
    np.savez(tmp_path / "eval.npz", input=x[32:], labels=mlp_reference(x[32:]).argmax(1))
    proc = run("convert", "quantize", str(model), "--calib", "calib.npz", "--eval", "eval.npz", "--target", "tflite",
               "--allow-fp32", "--out", "q.edgepkg", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pkg = pkgmod.verify(tmp_path / "q.edgepkg")
    # Only TFLite variants (the chosen precision, and the other one beside it: quantize's both_precisions).
    assert {v["runtime"] for v in pkg.variants} == {"tflite"}
    with runtime.load(pkg.path) as r:
        got = r.predict(x[32:40])["logits"]
    assert (got.argmax(1) == mlp_reference(x[32:40]).argmax(1)).mean() >= 0.75


def test_a_sample_that_contradicts_the_models_fixed_shape_is_refused(tmp_path):
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    model = make_mlp_onnx(tmp_path / "mlp.onnx", dynamic_batch=False)  # input fixed at [1, 64]
    with pytest.raises(ConversionError, match=r"has shape \(2, 64\) but the model fixes \(1, 64\)"):
        onnx_to_tflite(model, tmp_path / "mlp.tflite", {"input": np.zeros((2, 64), np.float32)})
    assert not (tmp_path / "mlp.tflite").exists()
