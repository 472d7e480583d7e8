"""Evaluating converted models: metrics, latency, and one predictor per artifact kind.

Metrics are pure functions on arrays. Every metric is also expressed as
*points* (0..100, higher is better) so an accuracy budget ``max_drop`` reads
the same way for every metric:

=============  ============================================  ================
metric         value                                         points
=============  ============================================  ================
``top1``       accuracy against labels                        100 * value
``agreement``  argmax agreement with the fp32 outputs         100 * value
``cosine``     mean cosine similarity with the fp32 outputs   100 * value
``mse``        mean squared error against the fp32 outputs    100 * (1 - mse / var(fp32)) (R²)
``iou``        IoU of thresholded maps vs the fp32 maps        100 * value
               (dense detectors: ``threshold``, ``channel``)
``seq_exact``  share of sequences whose per-step argmax        100 * value
               equals fp32's at every step
``step_agreement``  share of steps (N, T, C) whose argmax      100 * value
               equals fp32's
=============  ============================================  ================

``iou``, ``seq_exact`` and ``step_agreement`` are the task metrics a dense
output needs: a cosine near 1 can hide a detection map that no longer finds
anything once thresholded. Options (``metric_options``): ``threshold``
(default 0.0, i.e. a logit of 0 = probability 0.5) and ``channel`` (the map's
channel on axis 1, default 0 = objectness; ``None`` = every channel).

:func:`predict` runs any artifact (ONNX file, TFLite file, torch module) on
the same :class:`~edgeship.converters.data.Dataset`; :func:`measure_latency`
times one model directly with onnxruntime or the TFLite interpreter
(workstation code: it may import onnx).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConversionError, DataError, ModelError
from .data import Dataset, InputSpec

__all__ = [
    "METRICS", "top1", "agreement", "mse", "cosine", "iou", "seq_exact", "step_agreement", "choose_metric", "metric_value", "to_points",
    "measure_latency", "predict", "open_model", "OnnxModel", "TfliteModel", "TorchModel", "evaluate",
]

METRICS = ("top1", "agreement", "mse", "cosine", "iou", "seq_exact", "step_agreement")


def _2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax equals the label."""
    return float(np.mean(_2d(outputs).argmax(axis=1) == np.asarray(labels)))


def agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose argmax equals the fp32 model's argmax."""
    return float(np.mean(_2d(outputs).argmax(axis=1) == _2d(reference).argmax(axis=1)))


def mse(outputs: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean((_2d(outputs) - _2d(reference)) ** 2))


def cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-sample cosine similarity (1.0 when both vectors are zero)."""
    a, b = _2d(outputs), _2d(reference)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    sim = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-30))
    return float(np.mean(sim))


def iou(outputs: np.ndarray, reference: np.ndarray, *, threshold: float = 0.0, channel: int | None = 0) -> float:
    """Mean per-sample IoU of ``outputs > threshold`` vs ``reference > threshold`` (1.0 when both are empty).

    ``channel`` picks one map on axis 1 (e.g. a detector's objectness); None keeps every channel.
    """
    a, b = np.asarray(outputs), np.asarray(reference)
    if channel is not None and a.ndim >= 3:
        if not -a.shape[1] <= channel < a.shape[1]:
            raise ConversionError(f"metric iou: channel {channel} is outside the output's {a.shape[1]} channels")
        a, b = a[:, channel], b[:, channel]
    a, b = _2d(a) > threshold, _2d(b) > threshold
    inter = np.sum(a & b, axis=1)
    union = np.sum(a | b, axis=1)
    return float(np.mean(np.where(union == 0, 1.0, inter / np.maximum(union, 1))))


def _steps(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 3:
        raise ConversionError(f"sequence metrics need (N, T, classes) outputs, got shape {x.shape}; "
                              "use agreement or cosine")
    return x.reshape(len(x), -1, x.shape[-1]).argmax(axis=-1)


def seq_exact(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of sequences (N, T, C) whose argmax equals the fp32 argmax at every step."""
    return float(np.mean(np.all(_steps(outputs) == _steps(reference), axis=1)))


def step_agreement(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of steps of (N, T, C) sequences whose argmax equals the fp32 argmax."""
    return float(np.mean(_steps(outputs) == _steps(reference)))


def choose_metric(output_shape: Sequence, has_labels: bool, requested: str | None = None) -> str:
    """The metric to gate on: the user's choice, else from the output shape and the labels.

    A classifier (one score vector of >= 2 classes per sample) is judged by
    ``top1`` with labels, by ``agreement`` without; anything else by
    ``cosine`` — ask for ``iou`` (dense detector maps) or ``step_agreement`` /
    ``seq_exact`` (sequences): a cosine near 1 says little about a map that
    is thresholded or a sequence that is decoded step by step.
    """
    if requested is not None:
        if requested not in METRICS:
            raise ConversionError(f"unknown metric {requested!r}; use one of {', '.join(METRICS)}")
        if requested == "top1" and not has_labels:
            raise DataError("metric top1 needs labels in the eval data (an array named 'labels' or class folders); "
                            "add labels or use --metric agreement")
        return requested
    dims = list(output_shape)[1:]
    classifier = len(dims) == 1 and isinstance(dims[0], int) and dims[0] >= 2
    if classifier:
        return "top1" if has_labels else "agreement"
    return "cosine"


def metric_value(metric: str, outputs: np.ndarray, *, labels: np.ndarray | None, reference: np.ndarray,
                 options: Mapping | None = None) -> float:
    """``metric`` of ``outputs``; ``options`` are the metric's own (``iou``: ``threshold``, ``channel``)."""
    opts = dict(options or {})
    unknown = set(opts) - ({"threshold", "channel"} if metric == "iou" else set())
    if unknown:
        raise ConversionError(f"metric {metric} takes no option {sorted(unknown)[0]!r}"
                              + ("; iou takes threshold and channel" if metric == "iou" else ""))
    if metric == "iou":
        return iou(outputs, reference, **opts)
    if metric == "top1":
        return top1(outputs, labels)
    against_reference = {"seq_exact": seq_exact, "step_agreement": step_agreement, "agreement": agreement,
                         "mse": mse, "cosine": cosine}
    if metric in against_reference:
        return against_reference[metric](outputs, reference)
    raise ConversionError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def to_points(metric: str, value: float, *, reference: np.ndarray | None = None) -> float:
    """The metric on the common 0..100 higher-is-better scale used by ``max_drop``."""
    if metric == "mse":
        var = float(np.var(np.asarray(reference, dtype=np.float64))) if reference is not None else 0.0
        return 100.0 * (1.0 - value / var) if var > 0 else (100.0 if value == 0 else 0.0)
    return 100.0 * value


# --------------------------------------------------------------------------- models

class OnnxModel:
    """An onnxruntime session with our error translation and fixed-batch handling."""

    kind = "onnx"

    def __init__(self, path, *, threads: int | None = None, optimization: str = "all") -> None:
        import onnxruntime as ort

        self.path = str(path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[optimization]
        opts.graph_optimization_level = level
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped exceptions (Fail, InvalidGraph, ...)
            raise ModelError(f"{self.path}: onnxruntime cannot load the model "
                             f"({' '.join(str(exc).split())[:300]}); check the opset and operators") from exc
        self.inputs = [InputSpec(i.name, _ort_dtype(i.type), tuple(i.shape)) for i in self.session.get_inputs()]
        self.outputs = [InputSpec(o.name, _ort_dtype(o.type), tuple(o.shape)) for o in self.session.get_outputs()]

    @property
    def fixed_batch(self) -> int | None:
        dims = [s.shape[0] for s in self.inputs if s.shape]
        fixed = [d for d in dims if isinstance(d, int) and d > 0]
        return fixed[0] if fixed else None

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, dict(feed))
        except Exception as exc:  # translated at the boundary: onnxruntime errors are untyped
            raise ModelError(f"{self.path}: onnxruntime failed to run ({' '.join(str(exc).split())[:300]})") from exc

    def close(self) -> None:
        self.session = None


class TfliteModel:
    """A TFLite interpreter (ai_edge_litert) resized to the batch it is given."""

    kind = "tflite"

    def __init__(self, path, *, threads: int | None = None) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ModelError("TFLite models need ai-edge-litert: pip install 'edgeship[tflite]'") from exc
        self.path = str(path)
        try:
            self.interp = Interpreter(model_path=self.path, num_threads=threads or 1)
            self.interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{self.path}: the TFLite interpreter cannot load the model ({exc})") from exc
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [InputSpec(_tfl_name(d), np.dtype(d["dtype"]).name,
                                 tuple(int(v) for v in d["shape_signature"])) for d in self._in]
        self.outputs = [InputSpec(_tfl_name(d), np.dtype(d["dtype"]).name, tuple(int(v) for v in d["shape"]))
                        for d in self._out]
        self._batch = None

    @property
    def fixed_batch(self) -> int | None:
        """The exported batch when the file has no free batch axis (litert-torch exports fix it)."""
        dims = [s.shape[0] for s in self.inputs if s.shape]
        fixed = [d for d in dims if d > 0]
        return fixed[0] if fixed else None

    def quantization(self, which: str = "inputs") -> list[dict | None]:
        details = self._in if which == "inputs" else self._out
        out = []
        for d in details:
            scale, zp = d.get("quantization", (0.0, 0))
            out.append({"scale": float(scale), "zero_point": int(zp)} if scale else None)
        return out

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [np.asarray(feed[s.name]) if s.name in feed else np.asarray(list(feed.values())[i])
                  for i, s in enumerate(self.inputs)]
        n = len(arrays[0])
        try:
            if self._batch != n:
                for d, a in zip(self._in, arrays):
                    self.interp.resize_tensor_input(d["index"], list(a.shape), strict=False)
                self.interp.allocate_tensors()
                self._in = self.interp.get_input_details()
                self._out = self.interp.get_output_details()
                self._batch = n
            for d, a in zip(self._in, arrays):
                self.interp.set_tensor(d["index"], _to_io(a, d))
            self.interp.invoke()
            return [_from_io(self.interp.get_tensor(d["index"]), d) for d in self._out]
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"{self.path}: the TFLite interpreter failed to run ({exc})") from exc

    def run_raw(self, feed_arrays: Sequence[np.ndarray]) -> None:
        """Hot path for latency: inputs already in the file's dtype and the current batch."""
        for d, a in zip(self._in, feed_arrays):
            self.interp.set_tensor(d["index"], a)
        self.interp.invoke()

    def close(self) -> None:
        self.interp = None


class TorchModel:
    """A torch module evaluated with no grad, in eval mode."""

    kind = "torch"

    def __init__(self, module, input_names: Sequence[str] = ("input",)) -> None:
        self.module = module.eval()
        self.inputs = [InputSpec(n, "float32", ()) for n in input_names]
        self.outputs = []

    fixed_batch = None

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.module(*[torch.from_numpy(np.asarray(feed[s.name])) for s in self.inputs])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    def close(self) -> None:
        pass


def _tfl_name(detail: Mapping) -> str:
    # Signature-runner names look like "serving_default_input:0"; keep the readable part.
    name = str(detail["name"])
    return name.split(":")[0].removeprefix("serving_default_")


def _to_io(a: np.ndarray, detail: Mapping) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind in "iu" and np.asarray(a).dtype.kind == "f":
        scale, zp = detail.get("quantization", (0.0, 0))
        if scale:
            info = np.iinfo(dtype)
            return np.clip(np.round(a / scale + zp), info.min, info.max).astype(dtype)
    return np.asarray(a).astype(dtype, copy=False)


def _from_io(a: np.ndarray, detail: Mapping) -> np.ndarray:
    scale, zp = detail.get("quantization", (0.0, 0))
    if np.asarray(a).dtype.kind in "iu" and scale:
        return (a.astype(np.float32) - zp) * np.float32(scale)
    return np.array(a, copy=True)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool", "tensor(int16)": "int16"}


def _ort_dtype(t: str) -> str:
    return _ORT_TYPES.get(t, t)


def open_model(artifact, *, threads: int | None = None, input_names: Sequence[str] | None = None):
    """An ONNX/TFLite path or a torch module -> a model with ``inputs`` and ``run(feed) -> list``."""
    if hasattr(artifact, "run") and hasattr(artifact, "inputs"):
        return artifact
    if hasattr(artifact, "forward") and hasattr(artifact, "parameters"):
        return TorchModel(artifact, input_names or ("input",))
    path = Path(artifact)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        return OnnxModel(path, threads=threads)
    if path.suffix.lower() == ".tflite":
        return TfliteModel(path, threads=threads)
    raise ModelError(f"{path}: unknown model type {path.suffix!r}; give an .onnx or .tflite file")


def predict(artifact, data: Dataset, *, batch: int = 32, threads: int | None = None,
            output: int | None = 0) -> np.ndarray | list[np.ndarray]:
    """Outputs of ``artifact`` on every sample of ``data`` (output ``output``, or all when None)."""
    model = open_model(artifact, threads=threads, input_names=data.names)
    bs = model.fixed_batch or batch
    chunks: list[list[np.ndarray]] = []
    n = len(data)
    for i in range(0, n, bs):
        feed = {s.name: data.inputs[s.name][i:i + bs] if s.name in data.inputs
                else list(data.inputs.values())[k][i:i + bs] for k, s in enumerate(model.inputs)}
        real = len(next(iter(feed.values())))
        if model.fixed_batch and real < bs:
            # A fixed-batch model gets padded with the last sample; the padding is cut off below.
            feed = {k: np.concatenate([v, np.repeat(v[-1:], bs - real, axis=0)]) for k, v in feed.items()}
        outs = model.run(feed)
        chunks.append([o[:real] for o in outs])
    merged = [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]
    return merged if output is None else merged[output]


def evaluate(artifact, data: Dataset, *, metric: str, reference: np.ndarray, batch: int = 32,
             options: Mapping | None = None, outputs: np.ndarray | None = None) -> dict:
    """Metric of ``artifact`` on ``data``: ``{"metric", "value", "points"}`` (fp32 outputs as ``reference``).

    ``outputs``: the artifact's outputs when already computed (the fp32 baseline's are the reference
    itself, so it is never run twice).
    """
    if outputs is None:
        outputs = predict(artifact, data, batch=batch)
    value = metric_value(metric, outputs, labels=data.labels, reference=reference, options=options)
    return {"metric": metric, "value": value, "points": to_points(metric, value, reference=reference)}


# --------------------------------------------------------------------------- latency

def _fit_batch(feed: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    out = {}
    for k, v in feed.items():
        v = np.asarray(v)
        idx = np.arange(batch) % len(v)
        out[k] = np.ascontiguousarray(v[idx])
    return out


def measure_latency(model_path_or_session, feed: Mapping[str, np.ndarray] | np.ndarray, *, threads: int = 1,
                    batch: int = 1, repeats: int = 30, warmup: int = 3, max_seconds: float = 5.0) -> float:
    """Median wall time in ms of one inference on ``batch`` samples, with ``threads`` threads.

    ``model_path_or_session`` is an ``.onnx``/``.tflite`` path (opened here with
    ``threads``) or an already opened model/onnxruntime session. ``feed`` rows
    are repeated or cut to ``batch``. A fixed-batch model runs
    ``ceil(batch / fixed)`` times, which is what serving that batch costs.
    Stops early after ``max_seconds`` (at least 5 timed runs) so a slow
    candidate cannot stall the search.
    """
    if isinstance(feed, np.ndarray):
        feed = {"__single__": feed}
    target = model_path_or_session
    if isinstance(target, (str, os.PathLike)):
        target = open_model(target, threads=threads)
    sess = None
    if hasattr(target, "get_inputs") and not hasattr(target, "inputs"):  # a bare onnxruntime session
        sess = target
        names = [i.name for i in sess.get_inputs()]
        fixed = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
        fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    else:
        names = [s.name for s in target.inputs]
        fixed = target.fixed_batch
        if isinstance(target, OnnxModel):
            sess = target.session
    values = list(feed.values())
    named = {n: (feed[n] if n in feed else values[i]) for i, n in enumerate(names)}
    per_call = fixed or batch
    calls = -(-batch // per_call)
    f = _fit_batch(named, per_call)
    # The timed call: the session itself for ONNX, the raw (already converted) feed for TFLite.
    if isinstance(target, TfliteModel):
        target.run(f)  # resizes and allocates for this batch
        raw = [_to_io(f[n], d) for n, d in zip(names, target._in)]

        def run(_f):
            target.run_raw(raw)
    elif sess is not None:
        def run(f):
            sess.run(None, f)
    else:
        def run(f):
            target.run(f)
    for _ in range(warmup):
        for _c in range(calls):
            run(f)
    times = []
    deadline = time.perf_counter() + max_seconds
    for i in range(repeats):
        t0 = time.perf_counter()
        for _c in range(calls):
            run(f)
        times.append((time.perf_counter() - t0) * 1000.0)
        if i >= 4 and time.perf_counter() > deadline:
            break
    return float(statistics.median(times))
