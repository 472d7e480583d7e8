"""ONNX → float TFLite without TensorFlow: onnx2fx → torch.fx → litert-torch, gated on agreement.

The route, and why each step:

1. **Fix the shapes.** The ONNX inputs get the sample's concrete shapes
   (TFLite from litert-torch has a fixed batch; the manifest says so) and
   onnxscript's optimizer folds the ``Shape → Gather → Concat → Reshape``
   chains that exporters emit. Left in, they become data-dependent sizes
   that ``torch.export`` refuses.
2. **ONNX → torch.fx** with onnx2fx (pure Python, needs only torch + onnx).
   Its per-node metadata keeps the ONNX tensor names, so the fx graph can be
   compared with onnxruntime layer by layer.
3. **torch.fx → TFLite** with litert-torch, inputs and outputs renamed to the
   ONNX names (litert-torch writes ``args_0``).
4. **The gate**: every output of the TFLite model against onnxruntime on the
   sample inputs, ``max|tflite - onnx| <= atol + rtol * max|onnx|``. When an
   output fails, the fx graph is run against onnxruntime with every
   intermediate tensor exposed, and the first ONNX node whose output
   diverges is named (or, if the fx graph agrees everywhere, the lowering to
   TFLite is blamed).

Candidates not taken: onnx2torch (its torchvision dependency does not load
against the CPU build of torch 2.13 pinned here: ``torchvision::nms does not
exist``) and onnx2tf (needs TensorFlow, which the ``convert`` extra must not
pull). Every failure is a :class:`~edgeship.errors.ConversionError` of one
line; nothing is written unless the gate holds.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConversionError

__all__ = ["onnx_to_tflite", "tflite_from_onnx_data", "OnnxTfliteResult", "agreement", "ATOL", "RTOL"]

# Float conversion reorders sums (and XNNPACK fuses ops); 1e-4 absolute plus 1e-3 of the output's range
# passes every exact conversion of the model set and fails any real mistake (a wrong axis, a dropped bias).
ATOL, RTOL = 1e-4, 1e-3
_MAX_SHAPE_CONST = 16  # elements: a shape or an axes list, not an embedding table of ids


@dataclasses.dataclass(frozen=True)
class OnnxTfliteResult:
    path: Path
    inputs: list[str]
    outputs: list[str]
    max_abs_diff: dict[str, float]        # per output, TFLite vs onnxruntime
    batch: int                            # the fixed batch of the TFLite file

    def summary(self) -> str:
        worst = max(self.max_abs_diff.values(), default=0.0)
        return (f"{self.path}: TFLite (batch {self.batch}) agrees with the ONNX model on "
                f"{len(self.outputs)} output(s), max abs diff {worst:.2g}")


def _one_line(exc: BaseException, limit: int = 240) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def agreement(got: np.ndarray, want: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> tuple[bool, float]:
    """(within tolerance, max abs diff) of one output: ``max|got - want| <= atol + rtol * max|want|``."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False, float("inf")
    if not want.size:
        return True, 0.0
    diff = float(np.max(np.abs(got - want)))
    return diff <= atol + rtol * float(np.max(np.abs(want))), diff


def _load(onnx_path) -> "onnx.ModelProto":  # noqa: F821 - onnx is imported lazily
    import onnx

    try:
        return onnx.load(str(onnx_path))  # loads external data from beside the file
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError...
        raise ConversionError(f"{onnx_path}: cannot read the ONNX model ({_one_line(exc)})") from exc


def _fix_shapes(model, sample: Mapping[str, np.ndarray]):
    """Give every graph input the sample's shape, then fold the shape arithmetic that depends on it."""
    import onnxscript.optimizer

    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for d, n in zip(dims, sample[inp.name].shape):
            d.Clear()
            d.dim_value = int(n)
    try:
        model = onnxscript.optimizer.optimize(model)
    except Exception as exc:  # the optimizer raises many types on odd graphs; folding is only a help
        raise ConversionError(f"cannot fold the model's shape computations ({_one_line(exc)})") from exc
    # onnx2fx tags each fx node with its ONNX node's *name*: make names unique so a diverging
    # fx node can be traced back to one ONNX node.
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


# The ONNX ops whose shape-like inputs onnx2fx reads with ``.tolist()`` at run time, and whose
# handlers take a Python list as well (checked in onnx2fx 0.0.1's ops/tensor.py; Resize's scales and
# sizes in ops/image.py: ``int(size * scale)`` of a traced tensor is data-dependent to torch.export).
_SHAPE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Expand", "Slice", "Tile"}


def _static_shape_args(gm) -> None:
    """Replace constant integer tensors feeding shape arguments with Python lists, in place.

    ``tensor.tolist()`` inside the graph is a data-dependent size to
    ``torch.export`` (\"Could not extract specialized integer\"); after the
    shapes were fixed and folded these tensors are constants, so the lists
    are exact.
    """
    for node in gm.graph.nodes:
        op = node.meta.get("onnx_op_type")
        if node.op != "call_function" or (op not in _SHAPE_OPS and op != "Resize"):
            continue
        args = list(node.args)
        for i, a in enumerate(args[1:], start=1):
            if getattr(a, "op", None) != "get_attr" or (op == "Resize" and i not in (2, 3)):
                continue
            value = gm
            for part in a.target.split("."):
                value = getattr(value, part)
            if value.numel() > _MAX_SHAPE_CONST or (value.dtype.is_floating_point and op != "Resize"):
                continue
            if op == "Resize":  # scales (floats) or sizes: the output size is then a plain int per axis
                # (an empty tensor is ONNX's "not given")
                args[i] = [float(v) if value.dtype.is_floating_point else int(v)
                           for v in value.flatten().tolist()] or None
                continue
            args[i] = [int(v) for v in value.flatten().tolist()] if value.dim() else int(value.item())
        node.args = tuple(args)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _check_sample_shapes(model, feed: Mapping[str, np.ndarray], what: str) -> None:
    """The sample must have the model's fixed dimensions: a graph exported for batch 2 may bake
    the 2 into its Reshape constants, and then converts to nonsense at batch 1."""
    for inp in model.graph.input:
        if inp.name not in feed:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
        got = feed[inp.name].shape
        if len(dims) != len(got) or any(d > 0 and d != g for d, g in zip(dims, got)):
            shown = tuple(d if d > 0 else "?" for d in dims)
            raise ConversionError(f"{what}: the sample for input {inp.name!r} has shape {tuple(got)} but the model "
                                  f"fixes {shown}; give a sample of that shape (re-export with a dynamic batch "
                                  "for another batch)")


def _unsupported(model) -> list[str]:
    import onnx2fx

    res = onnx2fx.analyze_model(model)
    return sorted({f"{op}" + (f" ({dom})" if dom not in ("", "ai.onnx") else "") for op, dom, *_ in
                   res.unsupported_ops})


def _ort_run(model, feed: Mapping[str, np.ndarray], extra_outputs: Sequence[str] = ()) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every intermediate
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, dict(feed))))
    except Exception as exc:  # onnxruntime's pybind errors share no base class
        raise ConversionError(f"onnxruntime cannot run the model on the sample inputs ({_one_line(exc)}); "
                              "give sample arrays of the model's input shapes") from exc


def _first_divergence(gm, model, feed: Mapping[str, np.ndarray], atol: float, rtol: float) -> str | None:
    """The first ONNX node (in graph order) whose output in the fx graph differs from onnxruntime's."""
    import torch
    import torch.fx

    captured: dict[str, np.ndarray] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            name = n.meta.get("onnx_name")
            if name and n.op == "call_function" and isinstance(out, torch.Tensor):
                # One ONNX node may become several fx nodes; the last one computes its output.
                captured[name] = out.detach().numpy()
            return out

    with torch.no_grad():
        Capture(gm).run(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feed.values()])
    order = [(node, node.output[0]) for node in model.graph.node if node.name in captured and node.output]
    ref = _ort_run(model, feed, [out for _, out in order])
    for node, out in order:
        if out not in ref or captured[node.name].shape != ref[out].shape:
            continue  # a multi-output node whose fx value is another of its outputs: not comparable
        ok, diff = agreement(captured[node.name], ref[out], atol, rtol)
        if not ok:
            return f"{node.op_type} node {node.name or out!r} (output {out!r}, max abs diff {diff:.3g})"
    return None


def _tflite_run(path: Path, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.ascontiguousarray(feed[d["name"]]).astype(d["dtype"], copy=False))
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()}


def onnx_to_tflite(onnx_path, out_path, sample: Mapping[str, np.ndarray], *, atol: float = ATOL,
                   rtol: float = RTOL, quiet: bool = True) -> OnnxTfliteResult:
    """Convert ``onnx_path`` to a float ``.tflite`` at ``out_path``, gated on agreement with onnxruntime.

    ``sample``: ``{input name: array}`` with the batch the TFLite file will
    have (use the real data's first rows where there is some: the gate runs
    on it). Raises :class:`ConversionError` naming the unsupported ops, the
    failing step, or the output that diverges and the first ONNX node where
    it does; ``out_path`` is then not written.
    """
    import torch

    from .tflite_export import _write, litert_convert, rename_io

    model = _load(onnx_path)
    graph_inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = [n for n in graph_inputs if n not in sample]
    if missing:
        raise ConversionError(f"{onnx_path}: no sample for input(s) {', '.join(missing)}; give one array per input")
    feed = {n: np.ascontiguousarray(sample[n]) for n in graph_inputs}
    _check_sample_shapes(model, feed, Path(onnx_path).name)
    outputs = [o.name for o in model.graph.output]
    fixed = _fix_shapes(model, feed)
    bad = _unsupported(fixed)
    if bad:
        raise ConversionError(f"{Path(onnx_path).name}: op(s) {', '.join(bad)} have no TFLite route (onnx2fx); "
                              "export the torch model to TFLite directly (edgeship convert export --target tflite)")
    import onnx2fx

    try:
        gm = onnx2fx.convert(fixed)
        _static_shape_args(gm)
    except Exception as exc:  # onnx2fx raises its own errors and torch's
        raise ConversionError(f"{Path(onnx_path).name}: ONNX → torch failed ({_one_line(exc)})") from exc
    args = tuple(torch.from_numpy(feed[n]) for n in graph_inputs)
    try:
        edge = litert_convert(gm.eval(), args, quiet=quiet)
    except ConversionError as exc:
        culprit = _culprit(gm, exc)
        if culprit:  # torch.export stopped at one node: name the ONNX node, not torch's internals
            raise ConversionError(f"{Path(onnx_path).name}: {culprit} cannot be lowered to TFLite "
                                  f"({_one_line(exc.__cause__ or exc, 120)}); no TFLite file written") from exc
        where = _first_divergence(gm, fixed, feed, atol, rtol) if _fx_runs(gm, args) else None
        raise ConversionError(f"{Path(onnx_path).name}: {exc}" + (f"; first diverging layer: {where}" if where
                                                                  else "")) from exc
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.convert")
    try:
        _write(tmp, edge, quiet)
        rename_io(tmp, graph_inputs, outputs)
        got = _tflite_run(tmp, feed)
        want = _ort_run(model, feed)
        diffs: dict[str, float] = {}
        for name in outputs:
            ok, diff = agreement(got.get(name, np.empty(0)), want[name], atol, rtol)
            diffs[name] = diff
            if not ok:
                where = _first_divergence(gm, fixed, feed, atol, rtol)
                raise ConversionError(
                    f"{Path(onnx_path).name}: TFLite output {name!r} differs from onnxruntime by {diff:.3g} "
                    f"(gate {atol:g} + {rtol:g}*range); first diverging layer: "
                    f"{where or 'none in the torch graph, so the TFLite lowering'}; no TFLite file written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    batch = int(next(iter(feed.values())).shape[0]) if feed and next(iter(feed.values())).ndim else 1
    return OnnxTfliteResult(out, graph_inputs, outputs, diffs, batch)


def _culprit(gm, exc: BaseException) -> str | None:
    """The ONNX node behind the fx node torch.export names in ``While executing %name``, if any."""
    import re

    text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    m = re.search(r"While executing %(\w+)", text)
    if not m:
        return None
    node = next((n for n in gm.graph.nodes if n.name == m.group(1)), None)
    if node is None or not node.meta.get("onnx_name"):
        return None
    return f"{node.meta.get('onnx_op_type', 'the')} node {node.meta['onnx_name']!r}"


def _fx_runs(gm, args) -> bool:
    import torch

    try:
        with torch.no_grad():
            gm(*args)
        return True
    except Exception:  # noqa: BLE001 - only decides whether a per-layer comparison is possible
        return False


def tflite_from_onnx_data(onnx_path, data, out_path, preprocess: Mapping | None = None, *,
                          quiet: bool = True) -> Path:
    """:func:`onnx_to_tflite` with batch 1, gated on the first sample of ``data`` (what ``load_data`` takes)."""
    import onnxruntime as ort

    from .data import load_data

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's pybind errors share no base class
        raise ConversionError(f"{onnx_path}: onnxruntime cannot load it ({_one_line(exc)})") from exc
    names = [i.name for i in sess.get_inputs()]
    ds = load_data(data, input_names=names, preprocess=preprocess)
    types = {i.name: i.type for i in sess.get_inputs()}
    feed = {}
    for n in names:
        a = np.asarray(ds.inputs[n][:1])
        feed[n] = a.astype(np.float32) if "float" in types[n] and a.dtype.kind == "f" else a
    return onnx_to_tflite(onnx_path, out_path, feed, quiet=quiet).path
