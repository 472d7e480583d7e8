"""Finding and opening the interpreters, translating their failures.

Everything heavy is imported inside functions: ``import edgeship.runtime``
costs numpy and nothing else.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, ConfigError, ModelError
from ..tensorspec import ORT_DTYPES, TensorSpec

__all__ = ["TFLITE_BACKENDS", "resolve_tflite", "open_tflite", "tflite_specs", "open_ort", "ort_specs",
           "OPTIMIZATION_LEVELS", "default_threads"]

# Resolution order from the issue: ai_edge_litert works with numpy 2 and has
# current ops; tflite_runtime is the classic Pi wheel (numpy<2);
# tensorflow.lite is the heavy last resort.
TFLITE_BACKENDS = ("ai_edge_litert", "tflite_runtime", "tensorflow")

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def default_threads() -> int:
    """One intra-op thread per core this process may use (Pi default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _import_tflite(name: str):
    if name == "ai_edge_litert":
        mod = importlib.import_module("ai_edge_litert.interpreter")
        top = importlib.import_module("ai_edge_litert")
        return mod.Interpreter, getattr(top, "__version__", "?")
    if name == "tflite_runtime":
        mod = importlib.import_module("tflite_runtime.interpreter")
        top = importlib.import_module("tflite_runtime")
        return mod.Interpreter, getattr(top, "__version__", "?")
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        return tf.lite.Interpreter, getattr(tf, "__version__", "?")
    raise ConfigError(f"unknown TFLite backend {name!r}; choose one of {', '.join(TFLITE_BACKENDS)}")


def resolve_tflite(backend: str | None = None):
    """Return ``(Interpreter class, "module version")`` for the first importable backend."""
    if backend in (None, "tflite", "auto"):
        names = TFLITE_BACKENDS
    else:
        names = ("tensorflow",) if backend in ("tensorflow.lite", "tf") else (backend,)
    errors = []
    for name in names:
        try:
            cls, version = _import_tflite(name)
        except ImportError as exc:
            errors.append(f"{name} ({exc.__class__.__name__})")
            continue
        return cls, f"{name} {version}"
    raise BackendUnavailableError(
        f"no TFLite interpreter could be imported (tried {', '.join(errors)}); "
        "install one: pip install 'edgeship[tflite]' (ai-edge-litert) or tflite-runtime")


def open_tflite(model: str | os.PathLike | bytes, *, backend: str | None = None, threads: int | None = None,
                optimization: str = "all", what: str = "model"):
    """An allocated interpreter for ``model`` (a path or the file's bytes) and the backend string.

    ``optimization="disable"`` turns off the default delegate (XNNPACK), TFLite's
    graph-level optimisation; every other level keeps it.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    cls, name = resolve_tflite(backend)
    kwargs: dict[str, Any] = {"num_threads": threads or default_threads()}
    if optimization == "disable":
        resolver = getattr(importlib.import_module(cls.__module__), "OpResolverType", None)
        if resolver is not None:
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(model, (bytes, bytearray)):
        kwargs["model_content"] = bytes(model)
    else:
        kwargs["model_path"] = str(model)
    try:
        interp = cls(**kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{what} is not a TFLite model this interpreter can load ({name}): "
                         f"{_first_line(exc)}; re-export it or check the file") from exc
    return interp, name


def _tflite_spec(d: dict) -> TensorSpec:
    sig = d.get("shape_signature")
    shape = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    dtype = str(__import__("numpy").dtype(d["dtype"]))
    quant = None
    qp = d.get("quantization_parameters") or {}
    scales = qp.get("scales")
    zps = qp.get("zero_points")
    if scales is not None and len(scales) == 1 and dtype in ("int8", "uint8", "int16"):
        quant = (float(scales[0]), int(zps[0]) if zps is not None and len(zps) else 0)
    elif dtype in ("int8", "uint8", "int16") and d.get("quantization") and d["quantization"][0]:
        quant = (float(d["quantization"][0]), int(d["quantization"][1]))
    return TensorSpec(d["name"], dtype, tuple(int(x) if int(x) > 0 else -1 for x in shape), quant)


def tflite_specs(interp) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return ([_tflite_spec(d) for d in interp.get_input_details()],
            [_tflite_spec(d) for d in interp.get_output_details()])


_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def open_ort(model: str | os.PathLike | bytes, *, threads: int | None = None, optimization: str = "all",
             providers: list[str] | None = None, what: str = "model", serving: bool = False):
    """An onnxruntime session tuned for a small CPU: intra-op threads = cores,
    one inter-op thread, sequential execution (parallel mode only helps wide
    graphs on many cores and costs memory on a Pi).

    ``serving`` (the agent): no memory pattern and no spin-waiting. The
    pattern pre-plans one block per input shape holding every activation; a
    server sees a new shape per batch size, and arena allocation reuses
    freed activations within a run instead: the 224x224 MobileNetV3-style
    CNN of ``benchmarks/real_models.py`` held 3.9 MB of RSS per sample with
    the pattern and 1.9 MB without (batches 1-16). Spinning intra-op threads
    keep their cores busy between the operators and batches, which is the
    CPU the agent's decode workers and batcher need on a 2-core device.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError("onnxruntime is not installed; pip install 'edgeship[agent]'") from exc
    if optimization not in _ORT_LEVELS:
        raise ConfigError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[optimization])
    so.log_severity_level = 3  # errors only: warnings would go to stderr on every load
    if serving:
        so.enable_mem_pattern = False
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        sess = ort.InferenceSession(src, sess_options=so, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own (pybind) classes, not a common base
        raise ModelError(f"{what} is not an ONNX model onnxruntime can load: {_first_line(exc)}; "
                         "re-export it or check the file") from exc
    backend = f"onnxruntime {ort.__version__} ({sess.get_providers()[0]})"
    return sess, backend


def _ort_spec(arg) -> TensorSpec:
    dtype = ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"input/output {arg.name!r} has type {arg.type}, which edgeship does not support "
                         "(tensors of numbers or bool only)")
    shape = tuple(-1 if not isinstance(d, int) or d <= 0 else d for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape, None)


def ort_specs(sess) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return [_ort_spec(a) for a in sess.get_inputs()], [_ort_spec(a) for a in sess.get_outputs()]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return line[:300]


def runtime_for(member: str | Path) -> str:
    suffix = Path(member).suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix == ".tflite":
        return "tflite"
    raise ModelError(f"{member}: unknown model type {suffix or '(no suffix)'}; use a .onnx or .tflite file")
