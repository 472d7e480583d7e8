"""Small real models that tests build on the fly (no torch, no downloads).

ONNX models are written with ``onnx.helper``. TFLite models are written
directly as TFLite flatbuffers with the schema bindings that ship inside
``ai_edge_litert`` (``schema_py_generated``): deterministic, built in
milliseconds, and with the *same weights* as the ONNX MLP, so the two
runtimes can be compared through the common runner. The int8 variant is a
fully-quantized MLP with int8 input and output tensors (scale/zero-point
on the IO), like a full-integer converter output.

Other engineers append builders below; keep each one self-contained.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["mlp_weights", "mlp_reference", "make_mlp_onnx", "make_image_mlp_onnx", "make_multi_io_onnx",
           "make_stateful_onnx", "stateful_reference", "make_mlp_tflite", "make_mlp_int8_tflite", "quant_params",
           "make_identity_onnx", "make_deep_mlp_onnx"]

OPSET = 17
IR_VERSION = 8  # onnxruntime accepts this whatever onnx's newest IR is


def mlp_weights(in_features: int = 64, hidden: int = 64, classes: int = 10, seed: int = 0):
    """(W1 [hidden, in], b1, W2 [classes, hidden], b2) float32, deterministic."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, in_features)) / np.sqrt(in_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((classes, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def mlp_reference(x: np.ndarray, in_features: int = 64, hidden: int = 64, classes: int = 10,
                  seed: int = 0) -> np.ndarray:
    """What the MLP computes, in numpy: relu(x W1^T + b1) W2^T + b2."""
    w1, b1, w2, b2 = mlp_weights(in_features, hidden, classes, seed)
    h = np.maximum(x.astype(np.float32) @ w1.T + b1, 0)
    return h @ w2.T + b2


def _save_onnx(model, path) -> Path:
    import onnx

    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_mlp_onnx(path, in_features: int = 64, hidden: int = 64, classes: int = 10, dynamic_batch: bool = True,
                  seed: int = 0, input_name: str = "input", output_name: str = "logits") -> Path:
    """input [batch, in_features] float32 -> logits [batch, classes] (Gemm, Relu, Gemm)."""
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = mlp_weights(in_features, hidden, classes, seed)
    batch = "batch" if dynamic_batch else 1
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))]
    nodes = [
        helper.make_node("Gemm", [input_name, "W1", "B1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "W2", "B2"], [output_name], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, in_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        initializer=inits)
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def make_multi_io_onnx(path) -> Path:
    """Inputs a [batch, 4] float32, b [batch, 3] float32;
    outputs ``concat`` = [a, b] ([batch, 7]) and ``scaled`` = 2 * a ([batch, 4])."""
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [helper.make_node("Concat", ["a", "b"], ["concat"], axis=1),
             helper.make_node("Mul", ["a", "two"], ["scaled"])]
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("concat", TensorProto.FLOAT, ["batch", 7]),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 4])],
        initializer=[two])
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def _stateful_weights(features: int, seed: int):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((features, features)) / np.sqrt(features)).astype(np.float32)
    u = (rng.standard_normal((features, features)) / np.sqrt(features)).astype(np.float32)
    return w, u


def make_stateful_onnx(path, features: int = 4, seed: int = 1) -> Path:
    """A tiny RNN cell: inputs x [batch, F], state_in [batch, F];
    outputs y = tanh(x W + state_in U) and state_out = y (feed it back next step)."""
    from onnx import TensorProto, helper, numpy_helper

    w, u = _stateful_weights(features, seed)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("MatMul", ["state_in", "U"], ["su"]),
             helper.make_node("Add", ["xw", "su"], ["pre"]),
             helper.make_node("Tanh", ["pre"], ["y"]),
             helper.make_node("Identity", ["y"], ["state_out"])]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features]),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["batch", features])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U")])
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def stateful_reference(xs: np.ndarray, state: np.ndarray, features: int = 4, seed: int = 1):
    """Run the stateful cell over ``xs`` [T, batch, F] in numpy; returns (ys, final state)."""
    w, u = _stateful_weights(features, seed)
    ys = []
    for x in xs:
        state = np.tanh(x @ w + state @ u).astype(np.float32)
        ys.append(state)
    return np.stack(ys), state



def make_image_mlp_onnx(path, channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0) -> Path:
    """input [batch, C, size, size] float32 (NCHW image) -> Flatten -> the MLP -> logits [batch, classes].
    Same weights as ``make_mlp_onnx(in_features=C*size*size)``."""
    from onnx import TensorProto, helper, numpy_helper

    feats = channels * size * size
    w1, b1, w2, b2 = mlp_weights(feats, 64, classes, seed)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))]
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W1", "B1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "W2", "B2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "image_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits)
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)

# ------------------------------------------------------------------ TFLite

def _tfl():
    from ai_edge_litert import schema_py_generated as s  # noqa: N812 - flatbuffer schema module

    return s


def _write_tflite(model, path) -> Path:
    import flatbuffers

    s = _tfl()
    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b.Output()))
    del s
    return path


def _buffer(data: np.ndarray | None):
    s = _tfl()
    buf = s.BufferT()
    if data is not None:
        buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    return buf


def _tensor(name: str, shape, ttype: int, buffer: int, quant: tuple | None = None, signature=None):
    s = _tfl()
    t = s.TensorT()
    t.name = name
    t.shape = list(shape)
    if signature is not None:
        t.shapeSignature = list(signature)
    t.type = ttype
    t.buffer = buffer
    if quant is not None:
        q = s.QuantizationParametersT()
        scales, zps = quant
        q.scale = [float(x) for x in np.atleast_1d(scales)]
        q.zeroPoint = [int(x) for x in np.atleast_1d(zps)]
        q.quantizedDimension = 0
        t.quantization = q
    return t


def _fc_op(inputs, outputs, relu: bool):
    s = _tfl()
    op = s.OperatorT()
    op.opcodeIndex = 0
    op.inputs = list(inputs)
    op.outputs = list(outputs)
    op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    opts = s.FullyConnectedOptionsT()
    opts.fusedActivationFunction = s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
    op.builtinOptions = opts
    return op


def _model(tensors, buffers, ops, inputs, outputs):
    s = _tfl()
    code = s.OperatorCodeT()
    code.builtinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    sg = s.SubGraphT()
    sg.tensors = tensors
    sg.operators = ops
    sg.inputs = list(inputs)
    sg.outputs = list(outputs)
    sg.name = "main"
    m = s.ModelT()
    m.version = 3
    m.operatorCodes = [code]
    m.subgraphs = [sg]
    m.buffers = buffers
    m.description = "edgeship test model"
    return m


def make_mlp_tflite(path, in_features: int = 64, hidden: int = 64, classes: int = 10, seed: int = 0,
                    dynamic_batch: bool = True, batch: int = 1) -> Path:
    """The float32 MLP of :func:`make_mlp_onnx` (same weights) as a TFLite model.

    ``dynamic_batch`` writes a ``-1`` batch in the shape signature (the
    runner resizes the input); otherwise the batch is fixed at ``batch``.
    """
    s = _tfl()
    w1, b1, w2, b2 = mlp_weights(in_features, hidden, classes, seed)
    f32 = s.TensorType.FLOAT32
    sig = (lambda n: [-1, n]) if dynamic_batch else (lambda n: None)
    buffers = [_buffer(None), _buffer(w1), _buffer(b1), _buffer(w2), _buffer(b2)]
    tensors = [
        _tensor("input", [batch, in_features], f32, 0, signature=sig(in_features)),
        _tensor("w1", [hidden, in_features], f32, 1), _tensor("b1", [hidden], f32, 2),
        _tensor("hidden", [batch, hidden], f32, 0, signature=sig(hidden)),
        _tensor("w2", [classes, hidden], f32, 3), _tensor("b2", [classes], f32, 4),
        _tensor("logits", [batch, classes], f32, 0, signature=sig(classes)),
    ]
    ops = [_fc_op([0, 1, 2], [3], relu=True), _fc_op([3, 4, 5], [6], relu=False)]
    return _write_tflite(_model(tensors, buffers, ops, [0], [6]), path)


def quant_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero_point) covering [lo, hi] (0 exactly representable)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(round(-128 - lo / scale))
    return float(scale), int(np.clip(zp, -128, 127))


def make_mlp_int8_tflite(path, in_features: int = 64, hidden: int = 64, classes: int = 10, seed: int = 0,
                         input_range: tuple[float, float] = (-3.0, 3.0)) -> Path:
    """The MLP fully int8-quantized, with **int8 input and output tensors** (scale and
    zero-point on the IO), as a full-integer converter would write it. Batch is
    dynamic. Calibrated on random inputs in ``input_range``."""
    s = _tfl()
    w1, b1, w2, b2 = mlp_weights(in_features, hidden, classes, seed)
    rng = np.random.default_rng(seed + 100)
    calib = rng.uniform(*input_range, size=(512, in_features)).astype(np.float32)
    h = np.maximum(calib @ w1.T + b1, 0)
    y = h @ w2.T + b2
    s_in, z_in = quant_params(*input_range)
    s_h, z_h = quant_params(0.0, float(h.max()))
    s_out, z_out = quant_params(float(y.min()), float(y.max()))
    s_w1 = float(np.abs(w1).max() / 127.0)
    s_w2 = float(np.abs(w2).max() / 127.0)
    q_w1 = np.clip(np.round(w1 / s_w1), -127, 127).astype(np.int8)
    q_w2 = np.clip(np.round(w2 / s_w2), -127, 127).astype(np.int8)
    q_b1 = np.round(b1 / (s_in * s_w1)).astype(np.int32)
    q_b2 = np.round(b2 / (s_h * s_w2)).astype(np.int32)
    i8, i32 = s.TensorType.INT8, s.TensorType.INT32
    buffers = [_buffer(None), _buffer(q_w1), _buffer(q_b1), _buffer(q_w2), _buffer(q_b2)]
    tensors = [
        _tensor("input", [1, in_features], i8, 0, (s_in, z_in), signature=[-1, in_features]),
        _tensor("w1", [hidden, in_features], i8, 1, (s_w1, 0)),
        _tensor("b1", [hidden], i32, 2, (s_in * s_w1, 0)),
        _tensor("hidden", [1, hidden], i8, 0, (s_h, z_h), signature=[-1, hidden]),
        _tensor("w2", [classes, hidden], i8, 3, (s_w2, 0)),
        _tensor("b2", [classes], i32, 4, (s_h * s_w2, 0)),
        _tensor("logits", [1, classes], i8, 0, (s_out, z_out), signature=[-1, classes]),
    ]
    ops = [_fc_op([0, 1, 2], [3], relu=True), _fc_op([3, 4, 5], [6], relu=False)]
    return _write_tflite(_model(tensors, buffers, ops, [0], [6]), path)


def make_identity_onnx(path, shape, name: str = "x", output: str = "y") -> Path:
    """x [batch, *shape] float32 -> y = x: a head whose outputs a test chooses (postprocess hooks, sinks)."""
    from onnx import TensorProto, helper

    dims = ["batch", *shape]
    graph = helper.make_graph([helper.make_node("Identity", [name], [output])], "identity",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)])
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def make_deep_mlp_onnx(path: Path, layers: int = 16, width: int = 64, seed: int = 0, act: str = "Relu") -> Path:
    """input [batch, 64] -> logits [batch, 10] through ``layers`` MatMul+Add+``act`` of ``width``: many small ops.

    Quantized to int8 (static QDQ) with ``act = "Sigmoid"``, which has no int8 kernel, every layer
    dequantizes and requantizes around it: ~2x the fp32 time at this width (measured 2.0-2.4x on an x86
    with int8 dot products), so tests/test_adapt_choice.py has an int8 variant slower than fp32.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, x, fan_in = [], [], "input", 64
    for i in range(layers + 1):
        out_w = 10 if i == layers else width
        w = (rng.standard_normal((fan_in, out_w)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(out_w) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        y = "logits" if i == layers else f"h{i}"
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"B{i}"],
                                                                                         [f"a{i}" if i < layers else y])]
        if i < layers:
            nodes.append(helper.make_node(act, [f"a{i}"], [y]))
        x, fan_in = y, out_w
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=inits)
    return _save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)
