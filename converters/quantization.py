"""int8 quantization that gates on accuracy *and* measured speed.

``quantize(model, calib, eval, max_drop=1.0)`` tries every candidate that
makes sense for the model, measures each on the user's eval data and on this
machine, and keeps the fastest one within the accuracy budget — or says why
none qualified. Steps (issue 4):

1. **ONNX static int8** — QDQ, per-channel weights, after onnxruntime's
   ``quant_pre_process`` (symbolic shape inference falls back to plain ONNX
   shape inference, then to no optimisation, instead of stopping); opset < 13
   is upgraded first. Calibrations MinMax, Percentile and Entropy; a
   calibration whose scales equal an earlier one is dropped as a duplicate.
2. **ONNX dynamic int8** (weights only).
3. **Accuracy recovery** — for a family that misses the budget, compare the
   fp32 and int8 activations node by node (:func:`node_errors`), keep the
   nodes that add the most error in float, re-quantize (reusing the
   calibration cache) and re-measure, for at most ``recovery_steps`` steps.
4. **Choice** (:func:`choose`, pure) — the fastest candidate within the
   budget, latency = geometric mean of the batch-1 and batch-N ratios to
   fp32 (medians of repeated runs). In ``auto`` mode fp32 competes too: a
   model where int8 is slower stays fp32 and the report says why. When no
   int8 candidate meets the budget: :class:`AccuracyBudgetError` (no package
   written) unless ``allow_fp32``.
5. **TFLite int8** — from a float ``.tflite`` with ai-edge-quantizer
   (static a8w8 and dynamic w8), see :mod:`edgeship.converters.tflite_export`
   (torch models go through litert-torch's PT2E quantizer there).
6. **Report** — ``report.json`` in the package, ``<out>.report.md`` and PNG
   plots next to it; the manifest records provenance and the int8
   scale/zero-point of quantized IO.

The package is built under a temporary name and renamed, so a failure never
leaves a half-built ``.edgepkg``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import AccuracyBudgetError, ConversionError, EdgeshipError, ModelError
from . import evaluate as ev
from .data import Dataset, InputSpec, check_against, load_data

__all__ = ["quantize", "QuantizeResult", "Candidate", "Decision", "choose", "node_errors",
           "MIN_CALIB_SAMPLES", "MIN_EVAL_SAMPLES", "CALIBRATIONS"]

MIN_CALIB_SAMPLES = 16
MIN_EVAL_SAMPLES = 20
CALIBRATIONS = ("minmax", "percentile", "entropy")
TARGETS = ("onnx", "tflite", "both")
METHODS = ("auto", "static", "dynamic")
#: int8 must be at least this much slower than fp32 (geometric-mean latency ratio)
#: before auto mode keeps fp32; below it the difference is measurement noise and
#: the smaller int8 file wins.
SLOWER_TOLERANCE = 0.05
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_SQNR_CAP_DB = 100.0


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class Candidate:
    """One measured model: fp32 baseline or an int8 variant."""

    name: str
    target: str                      # "onnx" | "tflite"
    method: str                      # "fp32" | "static" | "dynamic"
    calibration: str | None = None   # "minmax" | "percentile" | "entropy" | None
    path: str | None = None
    excluded_nodes: list[str] = dataclasses.field(default_factory=list)
    size: int | None = None
    metric_value: float | None = None
    points: float | None = None
    drop: float | None = None
    latency_b1_ms: float | None = None
    latency_batch_ms: float | None = None
    meets_budget: bool | None = None
    duplicate_of: str | None = None
    error: str | None = None
    seconds: float | None = None

    @property
    def precision(self) -> str:
        return "fp32" if self.method == "fp32" else "int8"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision
        d["path"] = Path(self.path).name if self.path else None
        return d


@dataclasses.dataclass(frozen=True)
class Decision:
    """What :func:`choose` decided: the chosen candidate, whether the budget held, and why."""

    chosen: str
    ok: bool
    reason: str
    speed: Mapping[str, float]


@dataclasses.dataclass
class QuantizeResult:
    """What :func:`quantize` produced.

    ``artifacts`` maps target (``"onnx"``/``"tflite"``) to the chosen model
    file (inside ``work_dir``; kept only when the caller passed ``work_dir``
    or no ``out``); ``package`` is the written ``.edgepkg`` (None without
    ``out``); ``report`` is the full ``report.json`` dict.
    """

    chosen: dict[str, str]
    artifacts: dict[str, Path]
    decisions: dict[str, Decision]
    candidates: list[Candidate]
    report: dict
    package: Path | None
    report_md: Path | None = None
    plots: list[Path] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.decisions.values())

    def summary(self) -> str:
        lines = []
        for target, dec in self.decisions.items():
            lines.append(f"{target}: {dec.chosen} — {dec.reason}")
        if self.package:
            lines.append(f"package: {self.package}")
        if self.report_md:
            lines.append(f"report: {self.report_md}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the decision (pure)

def _speed(c: Candidate, base: Candidate) -> float | None:
    """Geometric mean of the batch-1 and batch-N latency ratios to the fp32 baseline."""
    ratios = []
    for a, b in ((c.latency_b1_ms, base.latency_b1_ms), (c.latency_batch_ms, base.latency_batch_ms)):
        if a is not None and b:
            ratios.append(a / b)
    if not ratios:
        return None
    return float(math.exp(sum(math.log(max(r, 1e-12)) for r in ratios) / len(ratios)))


def choose(candidates: Sequence[Candidate], *, max_drop: float, fp32_competes: bool = True,
           tolerance: float = SLOWER_TOLERANCE) -> Decision:
    """Pick the fastest candidate within ``max_drop`` points; pure, given measured numbers.

    ``candidates`` must hold exactly one ``method == "fp32"`` baseline. With
    ``fp32_competes`` (auto mode) fp32 is kept when the fastest int8 candidate
    within budget is more than ``tolerance`` slower than fp32. ``ok`` is False
    only when no int8 candidate met the budget (the caller then refuses, or
    ships fp32 with ``allow_fp32``).
    """
    base = next((c for c in candidates if c.method == "fp32"), None)
    if base is None:
        raise ConversionError("choose() needs the fp32 baseline among the candidates")
    speed = {c.name: s for c in candidates if c.error is None and (s := _speed(c, base)) is not None}
    int8 = [c for c in candidates if c.method != "fp32" and c.error is None and c.duplicate_of is None]
    within = [c for c in int8 if c.drop is not None and c.drop <= max_drop and c.name in speed]
    if not within:
        measured = [c for c in int8 if c.drop is not None]
        if measured:
            best = min(measured, key=lambda c: c.drop)
            why = (f"no int8 candidate met the accuracy budget of {max_drop:g} pt "
                   f"(best: {best.name}, {best.drop:.2f} pt drop)")
        elif int8:
            why = f"no int8 candidate could be built ({int8[0].name}: {int8[0].error or 'not measured'})"
        else:
            why = "no int8 candidate was tried"
        return Decision(chosen=base.name, ok=False, reason=why, speed=speed)
    best = min(within, key=lambda c: (speed[c.name], c.drop, c.size or 0))
    s = speed[best.name]
    lat = (f"b1 {best.latency_b1_ms:.3g} ms vs {base.latency_b1_ms:.3g} ms, "
           f"batch {best.latency_batch_ms:.3g} ms vs {base.latency_batch_ms:.3g} ms"
           if None not in (best.latency_b1_ms, base.latency_b1_ms, best.latency_batch_ms, base.latency_batch_ms)
           else "")
    if fp32_competes and s > 1.0 + tolerance:
        return Decision(chosen=base.name, ok=True, speed=speed,
                        reason=(f"kept fp32: int8 is slower on this machine — the fastest int8 candidate within "
                                f"{max_drop:g} pt ({best.name}) takes {s:.2f}x the fp32 latency ({lat})"))
    return Decision(chosen=best.name, ok=True, speed=speed,
                    reason=(f"{best.name} is the fastest candidate within {max_drop:g} pt: "
                            f"{s:.2f}x fp32 latency ({lat}), {best.drop:.2f} pt drop"))


# --------------------------------------------------------------------------- helpers

def _progress(iterable, *, desc: str, quiet: bool, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _one_line(exc: BaseException, limit: int = 240) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def _feeds(data: Dataset, batch: int, fixed: int | None) -> list[dict[str, np.ndarray]]:
    """Batches for calibration; a fixed-batch model gets its exact batch (last one padded)."""
    bs = fixed or batch
    out = []
    for i in range(0, len(data), bs):
        f = {k: v[i:i + bs] for k, v in data.inputs.items()}
        n = len(next(iter(f.values())))
        if fixed and n < bs:
            f = {k: np.concatenate([v, np.repeat(v[-1:], bs - n, axis=0)]) for k, v in f.items()}
        out.append(f)
    return out


def _reader(feeds: list[dict[str, np.ndarray]], *, desc: str, quiet: bool):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds every model input (float, int64 ids, state tensors) from the user's data."""

        def __init__(self) -> None:
            self._start, self._end = 0, len(feeds)
            self._it = None
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(_progress(feeds[self._start:self._end], desc=desc, quiet=quiet))

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._start, self._end = start_index, end_index
            self.rewind()

    return _Reader()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- ONNX preparation

def _check_supported(model, path: str) -> None:
    """Refuse graphs the quantizer cannot handle, naming the node."""
    import onnx

    for node in model.graph.node:
        if node.op_type in _CONTROL_FLOW:
            raise ConversionError(f"{path}: control flow ({node.op_type} node {node.name or node.output[0]!r}) "
                                  "cannot be quantized; export the model with loops unrolled / branches resolved")
        domain = node.domain or ""
        if domain in ("", "ai.onnx", "ai.onnx.ml"):
            try:
                onnx.defs.get_schema(node.op_type, domain=domain)
            except onnx.defs.SchemaError as exc:
                raise ConversionError(f"{path}: unsupported operator {node.op_type!r} (node "
                                      f"{node.name or node.output[0]!r}) is not an ONNX operator; "
                                      "replace it or export it as standard ONNX ops") from exc
        elif domain != "com.microsoft":
            raise ConversionError(f"{path}: unsupported operator {domain}::{node.op_type} (node "
                                  f"{node.name or node.output[0]!r}) from a custom domain; "
                                  "onnxruntime cannot run or quantize it — export it as standard ONNX ops")


def _prepare_onnx(src: Path, work: Path, *, quiet: bool) -> tuple[Path, dict]:
    """Load, check, upgrade opset, run quant_pre_process with fallbacks, name every node.

    Returns the prepared fp32 model path and notes for the report.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: dict = {"source_opset": None, "upgraded_to": None, "pre_process": None}
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError / OSError / ValueError
        raise ModelError(f"{src}: not a readable ONNX model ({_one_line(exc)})") from exc
    _check_supported(model, str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    notes["source_opset"] = opset
    if opset is not None and opset < 13:
        # Per-channel QDQ needs QuantizeLinear/DequantizeLinear with an axis (opset 13).
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, 13)
        except Exception as exc:  # the converter raises plain RuntimeError/ConvertError
            raise ConversionError(f"{src}: opset {opset} could not be upgraded to 13 for per-channel "
                                  f"quantization ({_one_line(exc)}); re-export the model with opset >= 13") from exc
        notes["upgraded_to"] = 13
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    named = work / "fp32.named.onnx"
    onnx.save(model, str(named))
    prepped = work / "fp32.prep.onnx"
    attempts = [("symbolic shape inference + optimisation", {}),
                ("onnx shape inference + optimisation (symbolic shape inference failed)",
                 {"skip_symbolic_shape": True}),
                ("onnx shape inference only (optimisation failed)",
                 {"skip_symbolic_shape": True, "skip_optimization": True})]
    errors = []
    for label, kwargs in attempts:
        try:
            # When symbolic shape inference fails, onnxruntime saves a debug copy
            # "sym_shape_infer_temp.onnx" into the *current directory*; run it from
            # the work dir so a user's folder (or our repo) never gets that litter.
            src, dst = str(Path(named).resolve()), str(Path(prepped).resolve())  # before the chdir
            with _quiet_ort_logging(), contextlib.chdir(work):
                quant_pre_process(src, dst, **kwargs)
            notes["pre_process"] = label
            break
        except Exception as exc:  # symbolic shape inference raises anything from AssertionError to KeyError
            errors.append(f"{label}: {_one_line(exc, 120)}")
    else:
        shutil.copyfile(named, prepped)
        notes["pre_process"] = "skipped (" + "; ".join(errors) + ")"
    notes["pre_process_errors"] = errors
    # The optimiser may add nameless nodes; exclusions are by name, so name them all again.
    m = onnx.load(str(prepped))
    seen = set()
    for i, node in enumerate(m.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_pp{i}"
        seen.add(node.name)
    onnx.save(m, str(prepped))
    return prepped, notes


@contextlib.contextmanager
def _quiet_ort_logging():
    """onnxruntime.quantization logs advice through the root logger; keep our output readable."""
    import logging

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


def _scale_digest(path: Path) -> str:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    h = hashlib.sha1()
    for init in sorted((i for i in m.graph.initializer if i.name.endswith("_scale")), key=lambda i: i.name):
        h.update(init.name.encode())
        h.update(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
    return h.hexdigest()


def _io_quantization(path: Path) -> dict:
    """Scale/zero-point of the QuantizeLinear right after each graph input / DequantizeLinear before each output."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    io = {}

    def qp(node):
        try:
            s = numpy_helper.to_array(inits[node.input[1]])
            z = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros((), np.int8)
        except KeyError:
            return None
        if s.size != 1:
            return None
        return {"scale": float(s.reshape(-1)[0]), "zero_point": int(z.reshape(-1)[0]), "dtype": str(z.dtype)}

    ins = {i.name for i in m.graph.input}
    outs = {o.name for o in m.graph.output}
    for node in m.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in ins and (p := qp(node)):
            io.setdefault("inputs", {})[node.input[0]] = p
        if node.op_type == "DequantizeLinear" and node.output[0] in outs and (p := qp(node)):
            io.setdefault("outputs", {})[node.output[0]] = p
    return io


def _quantizable_nodes(prepped: Path, method: str) -> dict[str, str]:
    """Nodes an exclusion can affect. Static QDQ reaches beyond its registry (e.g. Mul by a
    constant gets quantized weights), and excluding an unquantized node is harmless, so every
    node counts; dynamic quantization touches only its integer-op types."""
    import onnx
    from onnxruntime.quantization import registry

    m = onnx.load(str(prepped))
    if method == "dynamic":
        ops = set(registry.IntegerOpsRegistry)
        return {n.name: n.op_type for n in m.graph.node if n.op_type in ops}
    return {n.name: n.op_type for n in m.graph.node}


def _build_candidate(prepped: Path, out: Path, *, method: str, calibration: str | None, feeds, cache_dir: Path,
                     exclude: Sequence[str], quiet: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with _quiet_ort_logging():
        if method == "dynamic":
            quantize_dynamic(str(prepped), str(out), weight_type=QuantType.QInt8, per_channel=False,
                             nodes_to_exclude=list(exclude))
            return
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
        extra = {"CalibPercentile": 99.999} if calibration == "percentile" else {}
        cache = cache_dir / f"calib-{calibration}.json"
        if calibration != "minmax" and len({len(next(iter(f.values()))) for f in feeds}) > 1:
            # The histogram calibrators stack per-run outputs into one array, so every run
            # must have the same batch (a short last batch breaks it): feed one sample at a time.
            feeds = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
        reader = None if cache.is_file() else _reader(feeds, desc=f"calibrating ({calibration})", quiet=quiet)
        # onnxruntime prints calibration chatter to stdout; our stdout belongs to the CLI's result
        # and our progress bar already says what is happening.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            quantize_static(str(prepped), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=cm,
                            nodes_to_exclude=list(exclude), extra_options=extra,
                            calibration_cache_path=str(cache))


# --------------------------------------------------------------------------- per-node error

def _sqnr(ref: np.ndarray, other: np.ndarray) -> float:
    ref = ref.astype(np.float64).ravel()
    other = other.astype(np.float64).ravel()
    if ref.shape != other.shape:
        return float("nan")
    noise = np.linalg.norm(ref - other)
    signal = np.linalg.norm(ref)
    if noise <= 1e-12 * max(signal, 1e-12):
        return _SQNR_CAP_DB
    return float(min(_SQNR_CAP_DB, 20.0 * math.log10(max(signal, 1e-30) / noise)))


def node_errors(fp32_path, int8_path, data: Dataset, *, work_dir, batch: int = 32,
                max_samples: int = 64) -> list[dict]:
    """Per-node error of an int8 model against its fp32 source, in graph order.

    Both models run with every intermediate tensor as an output (optimisation
    off, so tensors keep their names). For each fp32 node: ``sqnr_db`` is the
    signal-to-quantisation-noise ratio of its output in the int8 model (after
    its QDQ pair when it has one), ``added_db`` how much SQNR the node loses
    relative to its worst activation input — the error this node adds, the
    ranking used to choose nodes to keep in float.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX

    work = Path(work_dir)
    sample = data.take(max_samples)
    fixed = ev.OnnxModel(fp32_path).fixed_batch
    acts = {}
    for tag, path in (("fp32", fp32_path), ("int8", int8_path)):
        aug = work / f"aug-{tag}-{os.getpid()}.onnx"
        with _quiet_ort_logging():
            modify_model_output_intermediate_tensors(str(path), str(aug))
            acts[tag] = {k: np.concatenate([np.ravel(x) for x in v])
                         for k, v in collect_activations(str(aug), _reader(_feeds(sample, batch, fixed),
                                                                             desc=f"activations {tag}",
                                                                             quiet=True)).items()}
        aug.unlink(missing_ok=True)
    f, q = acts["fp32"], acts["int8"]
    for name, arr in sample.inputs.items():  # graph inputs: their own QDQ error counts too
        if np.asarray(arr).dtype.kind == "f":
            f.setdefault(name, np.ravel(np.concatenate([np.asarray(x[name]) for x in _feeds(sample, batch, fixed)])))

    def quant_value(t):
        return q.get(t + DEQUANT_OUTPUT_SUFFIX, q.get(t))

    sqnr = {}
    for t, ref in f.items():
        other = quant_value(t)
        if other is not None:
            sqnr[t] = _sqnr(ref, other)
    model = onnx.load(str(fp32_path))
    # A node whose output has no int8 counterpart (e.g. a Conv whose Relu the QDQ quantizer
    # fused away) is merged into its consumer's row: the group is measured, and excluded, together.
    eff: dict[str, float] = {i.name: sqnr[i.name] for i in model.graph.input if i.name in sqnr}
    pending: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node.name)
    rows = []
    for node in model.graph.node:
        ins = [eff[t] for t in node.input if t in eff]
        in_db = min(ins) if ins else _SQNR_CAP_DB
        group = [n for t in node.input for n in pending.get(t, [])]
        group = list(dict.fromkeys(group + [node.name]))
        outs = [t for t in node.output if t in sqnr]
        if not outs:
            for t in node.output:
                eff[t] = in_db
                pending[t] = group
            continue
        out_db = min(sqnr[t] for t in outs)
        for t in node.output:
            eff[t] = sqnr.get(t, out_db)
        # The error of a QDQ pair on an output is removed only when its producer *and* every
        # quantized consumer stay in float, so both are candidates for exclusion.
        rows.append({"node": node.name, "op": node.op_type, "nodes": group,
                     "consumers": [c for t in node.output for c in consumers.get(t, [])],
                     "sqnr_db": round(out_db, 3), "added_db": round(max(0.0, in_db - out_db), 3)})
    return rows


# --------------------------------------------------------------------------- measuring

def _measure(c: Candidate, model_path: Path, evald: Dataset, *, metric: str, reference: np.ndarray,
             fp32_points: float | None, batch: int, threads_batch: int, repeats: int, max_drop: float,
             latency: bool = False) -> None:
    """Accuracy (and size) of one candidate; latency is timed later for all at once (:func:`_time_all`)."""
    c.path = str(model_path)
    c.size = model_path.stat().st_size
    res = ev.evaluate(model_path, evald, metric=metric, reference=reference, batch=batch)
    c.metric_value = res["value"]
    c.points = res["points"]
    c.drop = 0.0 if fp32_points is None else round(fp32_points - c.points, 6)
    c.meets_budget = c.drop <= max_drop
    if latency:
        c.latency_b1_ms = ev.measure_latency(model_path, evald.inputs, threads=1, batch=1, repeats=repeats)
        c.latency_batch_ms = ev.measure_latency(model_path, evald.inputs, threads=threads_batch, batch=batch,
                                                repeats=max(5, repeats // 3))


def _time_all(cands: Sequence[Candidate], evald: Dataset, *, batch: int, threads_batch: int, repeats: int,
              quiet: bool, rounds: int = 5) -> None:
    """Median latency at batch 1 (1 thread) and ``batch`` (``threads_batch``) of every candidate.

    Candidates are timed in interleaved rounds rather than one after another,
    so a burst of load from another process lands on all of them instead of
    deciding the choice by itself.
    """
    live = [c for c in cands if c.error is None and c.duplicate_of is None and c.path]
    if not live:
        return
    per_round = max(3, repeats // rounds)
    b1 = {c.name: [] for c in live}
    bn = {c.name: [] for c in live}
    m1 = {c.name: ev.open_model(c.path, threads=1) for c in live}
    mn = {c.name: ev.open_model(c.path, threads=threads_batch) for c in live}
    for _ in _progress(range(rounds), desc="timing", quiet=quiet):
        for c in live:
            b1[c.name].append(ev.measure_latency(m1[c.name], evald.inputs, threads=1, batch=1, repeats=per_round,
                                                 warmup=1))
            bn[c.name].append(ev.measure_latency(mn[c.name], evald.inputs, threads=threads_batch, batch=batch,
                                                 repeats=max(2, per_round // 2), warmup=1))
    for c in live:
        c.latency_b1_ms = float(np.median(b1[c.name]))
        c.latency_batch_ms = float(np.median(bn[c.name]))


def _onnx_specs(path: Path) -> tuple[list[InputSpec], list[InputSpec]]:
    m = ev.OnnxModel(path)
    return m.inputs, m.outputs


# --------------------------------------------------------------------------- the pipeline

@dataclasses.dataclass
class _Source:
    kind: str                       # "onnx" | "tflite" | "torch"
    path: Path | None
    name: str
    version: str
    labels: list[str] | None = None
    preprocess: dict | None = None
    provenance: dict = dataclasses.field(default_factory=dict)
    torch_module: object = None
    files: dict = dataclasses.field(default_factory=dict)   # target -> float model file

    def file_for(self, target: str) -> Path:
        return self.files.get(target) or self.path


def _resolve_model(model, work: Path, name: str | None, version: str | None) -> _Source:
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        return _Source("torch", None, name or type(model).__name__.lower(), version or "1.0.0",
                       provenance={"source": f"torch:{type(model).__name__}"}, torch_module=model.eval())
    if not isinstance(model, (str, os.PathLike)):
        raise ConversionError(f"cannot quantize a {type(model).__name__}; give an .onnx, float .tflite or .edgepkg "
                              "file, or a torch module")
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".tflite"):
        return _Source(suffix[1:], path, name or path.stem, version or "1.0.0",
                       provenance={"source": path.name, "source_sha256": _sha256(path)})
    if suffix == ".edgepkg":
        from ..package import open_package

        pkg = open_package(path)  # PackageError passes through: its message already says what is wrong
        man = pkg.manifest
        variant = pkg.default_variant or {}
        member = variant.get("file") or next((f for f in man.get("runtime", {}) if f.endswith((".onnx", ".tflite"))),
                                             None)
        if member is None:
            raise ConversionError(f"{path}: the package holds no .onnx or .tflite model to quantize")
        if variant.get("precision") == "int8":
            raise ConversionError(f"{path}: its default model {member} is already int8; quantize the fp32 model")
        dst = work / ("source" + Path(member).suffix)
        dst.write_bytes(pkg.read(member))
        return _Source(dst.suffix[1:], dst, name or man.get("name", path.stem), version or man.get("version", "1.0.0"),
                       labels=man.get("labels"), preprocess=man.get("preprocess"),
                       provenance={**(man.get("provenance") or {}), "source": f"{path.name}:{member}",
                                   "source_sha256": _sha256(dst)})
    raise ModelError(f"{path}: unsupported model file {suffix or '(no suffix)'}; give .onnx, .tflite or .edgepkg")


def _export_torch(src: _Source, calib, target: str, work: Path, quiet: bool) -> Path:
    """Float ONNX / TFLite of a torch module, traced with the first calibration sample."""
    import torch

    data = load_data(calib, preprocess=src.preprocess)
    names = data.names
    # Trace with float32 (numpy's default float64 would fix a double-precision graph).
    sample = tuple(np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)
                   for a in (np.asarray(data.inputs[n][:1]) for n in names))
    if target == "onnx":
        out = work / "source.onnx"
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter is deprecated but exports small models ~20x faster than
                # the dynamo one, and with a free batch axis.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(src.torch_module, tuple(torch.from_numpy(a) for a in sample), str(out),
                                  input_names=names, output_names=["output"], dynamo=False, opset_version=17,
                                  dynamic_axes={**{n: {0: "batch"} for n in names}, "output": {0: "batch"}})
        except Exception as exc:  # torch.onnx raises many types (TorchExportError, RuntimeError, ...)
            raise ConversionError(f"ONNX export of the torch model failed ({_one_line(exc)})") from exc
        return out
    from .tflite_export import export_tflite

    return export_tflite(src.torch_module, sample if len(sample) > 1 else sample[0], work / "source.tflite",
                         quiet=quiet)


def _load_sets(calib, evald, specs: list[InputSpec], preprocess) -> tuple[Dataset, Dataset]:
    names = [s.name for s in specs]
    c = check_against(load_data(calib, input_names=names, preprocess=preprocess), specs,
                      min_samples=MIN_CALIB_SAMPLES, what="calibration data")
    e = check_against(load_data(evald, input_names=names, preprocess=preprocess), specs,
                      min_samples=MIN_EVAL_SAMPLES, what="eval data")
    return c, e


def _fixes(row: Mapping, quantizable: Mapping[str, str], excluded: Sequence[str]) -> list[str]:
    """Nodes to keep in float to remove the error of one per-node row (its group and their consumers)."""
    return [n for n in dict.fromkeys(list(row["nodes"]) + list(row["consumers"]))
            if n in quantizable and n not in excluded]


def _run_onnx(src: _Source, calib, evald, *, max_drop: float, metric: str | None, method: str, batch: int,
              threads_batch: int, repeats: int, calibrations: Sequence[str], recovery_steps: int,
              work: Path, quiet: bool) -> dict:
    t0 = time.monotonic()
    fp32_path = src.file_for("onnx")
    prepped, notes = _prepare_onnx(fp32_path, work, quiet=quiet)
    specs, out_specs = _onnx_specs(fp32_path)
    calib_d, eval_d = _load_sets(calib, evald, specs, src.preprocess)
    fixed = ev.OnnxModel(fp32_path).fixed_batch
    bs = fixed or batch
    reference = ev.predict(fp32_path, eval_d, batch=bs)
    metric = ev.choose_metric(reference.shape, eval_d.labels is not None, metric)
    base = Candidate(name="fp32", target="onnx", method="fp32")
    _measure(base, fp32_path, eval_d, metric=metric, reference=reference, fp32_points=None, batch=bs,
             threads_batch=threads_batch, repeats=repeats, max_drop=max_drop)
    fp32_points = base.points
    feeds = _feeds(calib_d, batch, fixed)
    plan = []
    if method in ("auto", "static"):
        plan += [("static", cal) for cal in calibrations]
    if method in ("auto", "dynamic"):
        plan.append(("dynamic", None))
    candidates = [base]
    digests: dict[str, str] = {}
    for meth, cal in _progress(plan, desc="candidates", quiet=quiet):
        name = f"{meth}-{cal}" if cal else meth
        c = Candidate(name=name, target="onnx", method=meth, calibration=cal)
        candidates.append(c)
        out = work / f"{name}.onnx"
        t = time.monotonic()
        try:
            _build_candidate(prepped, out, method=meth, calibration=cal, feeds=feeds, cache_dir=work,
                             exclude=[], quiet=quiet)
            if meth == "static":
                dig = _scale_digest(out)
                if dig in digests:
                    c.duplicate_of = digests[dig]
                    c.path, c.size = str(out), out.stat().st_size
                    continue
                digests[dig] = name
            _measure(c, out, eval_d, metric=metric, reference=reference, fp32_points=fp32_points, batch=bs,
                     threads_batch=threads_batch, repeats=repeats, max_drop=max_drop)
        except EdgeshipError as exc:
            c.error = str(exc)
        except Exception as exc:  # onnxruntime.quantization raises bare Exceptions; keep the other candidates
            c.error = f"{type(exc).__name__}: {_one_line(exc)}"
        finally:
            c.seconds = round(time.monotonic() - t, 2)

    # Accuracy recovery: per family, take the most accurate candidate when none of the family is in budget.
    node_tables: dict[str, list[dict]] = {}
    recovery_log = []
    for fam in ("static", "dynamic"):
        fam_cands = [c for c in candidates if c.method == fam and c.error is None and c.drop is not None]
        if not fam_cands or any(c.meets_budget for c in fam_cands) or recovery_steps <= 0:
            continue
        start = min(fam_cands, key=lambda c: c.drop)
        quantizable = _quantizable_nodes(prepped, fam)
        per_step = max(1, math.ceil(0.1 * len(quantizable)))
        excluded: list[str] = []
        current = start
        for step in range(1, recovery_steps + 1):
            try:
                rows = node_errors(prepped, Path(current.path), calib_d, work_dir=work, batch=bs)
            except Exception as exc:  # analysis is best effort: report it, keep the candidates we have
                recovery_log.append({"from": current.name, "step": step, "error": _one_line(exc)})
                break
            node_tables[current.name] = rows
            ranked = [r for r in sorted(rows, key=lambda r: -r["added_db"])
                      if r["added_db"] > 0 and _fixes(r, quantizable, excluded)]
            if not ranked:
                recovery_log.append({"from": current.name, "step": step, "note": "no node adds measurable error"})
                break
            worst = list(dict.fromkeys(n for r in ranked[:per_step] for n in _fixes(r, quantizable, excluded)))
            excluded = excluded + worst
            name = f"{start.name}+float{len(excluded)}"
            c = Candidate(name=name, target="onnx", method=fam, calibration=start.calibration,
                          excluded_nodes=list(excluded))
            candidates.append(c)
            out = work / f"{name}.onnx"
            t = time.monotonic()
            try:
                _build_candidate(prepped, out, method=fam, calibration=start.calibration, feeds=feeds,
                                 cache_dir=work, exclude=excluded, quiet=quiet)
                _measure(c, out, eval_d, metric=metric, reference=reference, fp32_points=fp32_points, batch=bs,
                         threads_batch=threads_batch, repeats=repeats, max_drop=max_drop)
            except EdgeshipError as exc:
                c.error = str(exc)
            except Exception as exc:  # as above: one failed step does not sink the search
                c.error = f"{type(exc).__name__}: {_one_line(exc)}"
            c.seconds = round(time.monotonic() - t, 2)
            recovery_log.append({"from": current.name, "step": step, "excluded": worst, "candidate": name,
                                 "drop": c.drop, "meets_budget": c.meets_budget})
            if c.error is not None or c.meets_budget:
                break
            current = c

    _time_all(candidates, eval_d, batch=bs, threads_batch=threads_batch, repeats=repeats, quiet=quiet)
    decision = choose(candidates, max_drop=max_drop, fp32_competes=(method == "auto"))
    chosen = next(c for c in candidates if c.name == decision.chosen)
    if chosen.method != "fp32" and chosen.name not in node_tables:
        try:
            node_tables[chosen.name] = node_errors(prepped, Path(chosen.path), calib_d, work_dir=work, batch=bs)
        except Exception as exc:  # the table is a report nicety, never a reason to fail
            recovery_log.append({"from": chosen.name, "error": f"per-node analysis failed: {_one_line(exc)}"})
    return {"target": "onnx", "candidates": candidates, "decision": decision, "chosen": chosen, "metric": metric,
            "reference": reference, "calib": calib_d, "eval": eval_d, "specs": specs, "out_specs": out_specs,
            "node_errors": node_tables.get(chosen.name, []), "recovery": recovery_log, "notes": notes,
            "io_quantization": _io_quantization(Path(chosen.path)) if chosen.method == "static" else {},
            "fp32_path": fp32_path, "seconds": round(time.monotonic() - t0, 2), "batch": bs}


def _run_tflite(src: _Source, calib, evald, *, max_drop: float, metric: str | None, method: str, batch: int,
                threads_batch: int, repeats: int, work: Path, quiet: bool) -> dict:
    from .tflite_export import quantize_tflite

    t0 = time.monotonic()
    fp32_path = src.file_for("tflite")
    fp32_model = ev.TfliteModel(fp32_path)
    specs, out_specs = fp32_model.inputs, fp32_model.outputs
    calib_d, eval_d = _load_sets(calib, evald, specs, src.preprocess)
    reference = ev.predict(fp32_path, eval_d, batch=batch)
    metric = ev.choose_metric(reference.shape, eval_d.labels is not None, metric)
    base = Candidate(name="tflite-fp32", target="tflite", method="fp32")
    _measure(base, fp32_path, eval_d, metric=metric, reference=reference, fp32_points=None, batch=batch,
             threads_batch=threads_batch, repeats=repeats, max_drop=max_drop)
    plan = []
    if method in ("auto", "static"):
        plan.append("static")
        if src.torch_module is not None:
            plan.append("pt2e")   # litert-torch's full-integer export straight from torch
    if method in ("auto", "dynamic"):
        plan.append("dynamic")
    candidates = [base]
    for meth in _progress(plan, desc="tflite candidates", quiet=quiet):
        c = Candidate(name=f"tflite-{meth}", target="tflite", method="static" if meth == "pt2e" else meth,
                      calibration={"static": "minmax", "pt2e": "histogram"}.get(meth))
        candidates.append(c)
        out = work / f"tflite-{meth}.tflite"
        t = time.monotonic()
        try:
            if meth == "pt2e":
                from .tflite_export import export_tflite_int8

                arrays = [calib_d.inputs[s.name] if s.name in calib_d.inputs else v
                          for s, v in zip(specs, calib_d.inputs.values())]
                export_tflite_int8(src.torch_module, tuple(a[:1] for a in arrays), tuple(arrays), out, quiet=quiet)
            else:
                quantize_tflite(fp32_path, calib_d, out, mode=meth, quiet=quiet)
            _measure(c, out, eval_d, metric=metric, reference=reference, fp32_points=base.points, batch=batch,
                     threads_batch=threads_batch, repeats=repeats, max_drop=max_drop)
        except EdgeshipError as exc:
            c.error = str(exc)
        except Exception as exc:  # ai-edge-quantizer raises plain ValueError/RuntimeError; keep the others
            c.error = f"{type(exc).__name__}: {_one_line(exc)}"
        c.seconds = round(time.monotonic() - t, 2)
    _time_all(candidates, eval_d, batch=batch, threads_batch=threads_batch, repeats=repeats, quiet=quiet)
    decision = choose(candidates, max_drop=max_drop, fp32_competes=(method == "auto"))
    chosen = next(c for c in candidates if c.name == decision.chosen)
    io_q = {}
    if chosen.method != "fp32":
        m = ev.TfliteModel(chosen.path)
        io_q = {"inputs": {s.name: q for s, q in zip(m.inputs, m.quantization("inputs")) if q},
                "outputs": {s.name: q for s, q in zip(m.outputs, m.quantization("outputs")) if q}}
    return {"target": "tflite", "candidates": candidates, "decision": decision, "chosen": chosen, "metric": metric,
            "reference": reference, "calib": calib_d, "eval": eval_d, "specs": specs, "out_specs": out_specs,
            "node_errors": [], "recovery": [],
            "notes": {"tool": "ai-edge-quantizer" + (" + litert-torch PT2E" if src.torch_module is not None else "")},
            "io_quantization": io_q, "fp32_path": fp32_path, "seconds": round(time.monotonic() - t0, 2), "batch": batch}


def _spec_dict(spec: InputSpec, quant: Mapping | None = None, dtype: str | None = None) -> dict:
    shape = ["batch" if i == 0 and not (isinstance(d, int) and d > 0) else (d if isinstance(d, int) and d >= 0
                                                                              else -1)
             for i, d in enumerate(spec.shape)]
    d = {"name": spec.name, "dtype": dtype or spec.dtype, "shape": shape}
    if quant:
        d["quantization"] = {"scale": quant["scale"], "zero_point": quant["zero_point"]}
    return d


def _report_dict(runs: list[dict], *, src: _Source, max_drop: float, method: str, machine: dict,
                 threads_batch: int) -> dict:
    rep = {"kind": "quantize", "model": src.name, "version": src.version, "source": src.provenance,
           "max_drop": max_drop, "method": method, "machine": machine,
           "latency": {"batch1_threads": 1, "batch_threads": threads_batch, "statistic": "median ms"},
           "targets": {}}
    for r in runs:
        base = next(c for c in r["candidates"] if c.method == "fp32")
        ch = r["chosen"]
        rep["targets"][r["target"]] = {
            "metric": r["metric"], "batch": r["batch"],
            "calibration_samples": len(r["calib"]), "eval_samples": len(r["eval"]),
            "chosen": ch.name, "ok": r["decision"].ok, "reason": r["decision"].reason,
            "fp32": {"metric": base.metric_value, "points": base.points, "size": base.size,
                     "latency_b1_ms": base.latency_b1_ms, "latency_batch_ms": base.latency_batch_ms},
            "int8": None if ch.method == "fp32" else {
                "metric": ch.metric_value, "points": ch.points, "drop": ch.drop, "size": ch.size,
                "latency_b1_ms": ch.latency_b1_ms, "latency_batch_ms": ch.latency_batch_ms,
                "size_ratio": ch.size / base.size if base.size else None,
                "latency_b1_ratio": (ch.latency_b1_ms / base.latency_b1_ms) if base.latency_b1_ms else None,
                "latency_batch_ratio": (ch.latency_batch_ms / base.latency_batch_ms) if base.latency_batch_ms
                else None},
            "excluded_nodes": ch.excluded_nodes,
            "candidates": [c.to_dict() for c in r["candidates"]],
            "speed_vs_fp32": dict(r["decision"].speed),
            "node_errors": r["node_errors"],
            "recovery": r["recovery"],
            "notes": r["notes"],
            "io_quantization": r["io_quantization"],
            "seconds": r["seconds"],
        }
    return rep


def _write_side_report(out_base: Path, rep: dict, runs: list[dict]) -> tuple[Path, list[Path]]:
    from . import report as rp

    plots = []
    sections = []
    for r in runs:
        t = r["target"]
        tr = rep["targets"][t]
        pts = [{"name": c.name, "latency": c.latency_b1_ms, "points": c.points} for c in r["candidates"]
               if c.error is None and c.duplicate_of is None]
        fp32_pts = tr["fp32"]["points"]
        png = out_base.with_name(f"{out_base.name}.{t}.candidates.png")
        plots.append(rp.plot_scatter(png, pts, x="latency", y="points", highlight=tr["chosen"],
                                     title=f"{rep['model']} ({t}): {tr['metric']} vs batch-1 latency",
                                     xlabel="median latency, batch 1, 1 thread (ms)",
                                     ylabel=f"{tr['metric']} (points)",
                                     hline=None if fp32_pts is None else fp32_pts - rep["max_drop"],
                                     hline_label=f"budget: fp32 - {rep['max_drop']:g} pt"))
        if tr["node_errors"]:
            rows = sorted(tr["node_errors"], key=lambda x: -x["added_db"])
            png = out_base.with_name(f"{out_base.name}.{t}.node_error.png")
            plots.append(rp.plot_bars(png, ["+".join(x.get("nodes") or [x["node"]]) for x in rows],
                                      [x["added_db"] for x in rows], ylabel="SQNR lost at this node (dB)",
                                      title=f"per-node error of {tr['chosen']}"))
        cols = ["name", "method", "calibration", "points", "drop", "latency_b1_ms", "latency_batch_ms", "size",
                "meets_budget", "note"]
        rows = []
        for c in r["candidates"]:
            d = c.to_dict()
            d["note"] = (f"duplicate of {c.duplicate_of}" if c.duplicate_of else c.error or
                         (f"{len(c.excluded_nodes)} nodes kept in float" if c.excluded_nodes else ""))
            rows.append(d)
        body = [f"**Chosen: {tr['chosen']}** — {tr['reason']}", "",
                f"Metric `{tr['metric']}` on {tr['eval_samples']} eval samples; calibration on "
                f"{tr['calibration_samples']} samples; budget {rep['max_drop']:g} points.", "",
                rp.markdown_table(rows, cols, ["candidate", "method", "calibration", "points", "drop (pt)",
                                               "b1 ms", f"b{tr['batch']} ms", "bytes", "in budget", "note"])]
        if tr["int8"]:
            i8 = tr["int8"]
            body += ["", f"Size {rp.fmt(i8['size_ratio'])}x fp32, latency {rp.fmt(i8['latency_b1_ratio'])}x "
                         f"(batch 1, 1 thread) and {rp.fmt(i8['latency_batch_ratio'])}x (batch {tr['batch']}, "
                         f"{rep['latency']['batch_threads']} threads)."]
        if tr["excluded_nodes"]:
            body += ["", "Kept in float: " + ", ".join(f"`{n}`" for n in tr["excluded_nodes"])]
        if tr["node_errors"]:
            worst = [{**x, "node": "+".join(x.get("nodes") or [x["node"]])}
                     for x in sorted(tr["node_errors"], key=lambda x: -x["added_db"])[:10]]
            body += ["", "Nodes adding the most error:", "",
                     rp.markdown_table(worst, ["node", "op", "sqnr_db", "added_db"],
                                       ["node", "op", "output SQNR (dB)", "SQNR lost (dB)"])]
        sections.append((f"Target {t}", "\n".join(body)))
    m = rep["machine"]
    sections.append(("Machine", "\n".join(f"- {k}: {rp.fmt(v)}" for k, v in m.items())))
    md = rp.write_markdown(out_base.with_name(f"{out_base.name}.report.md"),
                           f"Quantization report: {rep['model']} {rep['version']}", sections)
    return md, plots


def _package(out: Path, runs: list[dict], rep: dict, src: _Source, *, signing_key) -> Path:
    from .. import package as pkgmod

    files: dict[str, str] = {}
    variants = []
    for r in runs:
        ch = r["chosen"]
        member = "model.onnx" if r["target"] == "onnx" else "model.tflite"
        files[member] = ch.path
        io_q = r["io_quantization"] if r["target"] == "tflite" else {}
        if r["target"] == "tflite" and ch.method != "fp32":
            m = ev.TfliteModel(ch.path)
            v_in = [_spec_dict(s, (io_q.get("inputs") or {}).get(s.name), s.dtype) for s in m.inputs]
            v_out = [_spec_dict(s, (io_q.get("outputs") or {}).get(s.name), s.dtype) for s in m.outputs]
        else:
            v_in = [_spec_dict(s) for s in r["specs"]]
            v_out = [_spec_dict(s) for s in r["out_specs"]]
        metrics = {r["metric"]: ch.metric_value, "points": ch.points, "drop": ch.drop,
                   "latency_ms_b1": ch.latency_b1_ms, f"latency_ms_b{r['batch']}": ch.latency_batch_ms,
                   "size": ch.size}
        variants.append({"id": f"{r['target']}-{ch.precision}", "file": member,
                         "runtime": "onnxruntime" if r["target"] == "onnx" else "tflite",
                         "precision": ch.precision, "default": not variants, "metrics": metrics,
                         "inputs": v_in, "outputs": v_out})
    first = runs[0]
    example = first["eval"].take(1)
    example_input = next(iter(example.inputs.values())) if len(example.inputs) == 1 else dict(example.inputs)
    provenance = {**{k: v for k, v in src.provenance.items() if k != "quantization"},
                  "quantization": {
                      r["target"]: {"method": r["chosen"].method, "calibration": r["chosen"].calibration,
                                    "candidate": r["chosen"].name, "calibration_samples": len(r["calib"]),
                                    "per_channel": (r["chosen"].method == "static") if r["target"] == "onnx" else None,
                                    "format": "QDQ" if r["target"] == "onnx" and r["chosen"].method == "static"
                                    else None,
                                    "excluded_nodes": r["chosen"].excluded_nodes, "metric": r["metric"],
                                    "drop": r["chosen"].drop, "max_drop": rep["max_drop"],
                                    "io": r["io_quantization"], "reason": r["decision"].reason}
                      for r in runs}}
    labels = src.labels or (list(first["eval"].label_names) if first["eval"].label_names else None)
    from .refstats import compute_reference_stats

    # What the model was built for (fp32 outputs on calib + eval data), for on-device drift monitoring.
    ref_stats = compute_reference_stats(first["fp32_path"], [first["calib"], first["eval"]], labels=labels,
                                        preprocess=src.preprocess)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        pkgmod.build(tmp, files, name=src.name, version=src.version,
                     inputs=[_spec_dict(s) for s in first["specs"]],
                     outputs=[_spec_dict(s) for s in first["out_specs"]],
                     preprocess=src.preprocess, labels=labels, example_input=example_input, report=rep,
                     provenance=provenance, variants=variants, reference_stats=ref_stats, signing_key=signing_key)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def quantize(model, calib, eval, *, max_drop: float = 1.0, metric: str | None = None,  # noqa: A002 - issue's name
             method: str = "auto", target: str = "onnx", out=None, allow_fp32: bool = False, batch: int = 32,
             signing_key=None, name: str | None = None, version: str | None = None, quiet: bool = False,
             work_dir=None, threads: int | None = None, repeats: int = 30,
             calibrations: Sequence[str] = CALIBRATIONS, recovery_steps: int = 3,
             preprocess: Mapping | None = None, labels: Sequence[str] | None = None) -> QuantizeResult:
    """Quantize ``model`` to int8, keeping the fastest candidate within ``max_drop`` points of fp32.

    ``model``: ``.onnx``, float ``.tflite``, ``.edgepkg`` or a torch module
    (exported here to ONNX and/or float TFLite; the TFLite target then also
    tries litert-torch's PT2E full-integer export). ``calib``/``eval``:
    anything :func:`~edgeship.converters.data.load_data` takes. ``metric``:
    ``top1|agreement|mse|cosine`` (default from output shape and labels).
    ``target``: ``onnx``, ``tflite`` (needs a float ``.tflite`` model) or
    ``both``. ``out``: the ``.edgepkg`` to write (with ``<out>.report.md`` and
    PNG plots beside it). ``threads``: threads for the batch-``batch``
    latency (batch 1 is always timed on 1 thread); default ``min(4, cpus)``.
    ``preprocess``/``labels``: the manifest's (image folders are decoded with
    ``preprocess``); taken from the package when ``model`` is an ``.edgepkg``.

    Raises :class:`DataError` for unusable data, :class:`ConversionError`
    for a model it cannot handle, :class:`AccuracyBudgetError` when no int8
    candidate meets the budget and ``allow_fp32`` is False — in every error
    case no package is written.
    """
    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if max_drop < 0:
        raise ConversionError(f"max_drop must be >= 0 points, got {max_drop}")
    if batch < 1:
        raise ConversionError(f"batch must be >= 1, got {batch}")
    bad = [c for c in calibrations if c not in CALIBRATIONS]
    if bad:
        raise ConversionError(f"unknown calibration {bad[0]!r}; use {', '.join(CALIBRATIONS)}")
    out = Path(out) if out is not None else None
    if out is not None and out.suffix != ".edgepkg":
        raise ConversionError(f"{out}: the output must be an .edgepkg file")
    threads_batch = threads or max(1, min(4, os.cpu_count() or 1))
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="edgeship-quantize-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    keep_work = not own_work or out is None
    try:
        src = _resolve_model(model, work, name, version)
        if preprocess is not None:
            src.preprocess = dict(preprocess)
        if labels is not None:
            src.labels = list(labels)
        wanted = ["onnx", "tflite"] if target == "both" else [target]
        if src.kind == "torch":
            for t in wanted:
                src.files[t] = _export_torch(src, calib, t, work, quiet)
        elif src.kind == "onnx" and "tflite" in wanted:
            # ONNX -> float TFLite (#20), gated on agreement with onnxruntime on the first calibration sample.
            from .onnx_tflite import tflite_from_onnx_data

            src.files["tflite"] = tflite_from_onnx_data(src.path, calib, work / "source.tflite", src.preprocess,
                                                        quiet=quiet)
        elif wanted != [src.kind]:
            raise ConversionError(
                f"{src.path.name}: target {target} needs a {' and a '.join(wanted)} model but this is {src.kind}; "
                "ONNX and TFLite are not converted into each other here — pass the torch model (library call) "
                f"or the float .tflite/.onnx, or use --target {src.kind}")
        common = dict(max_drop=max_drop, metric=metric, method=method, batch=batch, threads_batch=threads_batch,
                      repeats=repeats, work=work, quiet=quiet)
        runs = []
        for t in wanted:
            if t == "onnx":
                runs.append(_run_onnx(src, calib, eval, calibrations=calibrations, recovery_steps=recovery_steps,
                                      **common))
            else:
                runs.append(_run_tflite(src, calib, eval, **common))
        from .report import machine_info

        rep = _report_dict(runs, src=src, max_drop=max_drop, method=method, machine=machine_info(),
                           threads_batch=threads_batch)
        report_md, plots = (None, [])
        if out is not None:
            report_md, plots = _write_side_report(out, rep, runs)
        failed = [r for r in runs if not r["decision"].ok]
        if failed and not allow_fp32:
            r = failed[0]
            results = [c.to_dict() for c in r["candidates"]]
            raise AccuracyBudgetError(f"{r['decision'].reason}; no package written — raise --max-drop, improve the "
                                      "calibration data, or pass --allow-fp32 to ship fp32"
                                      + (f" (see {report_md})" if report_md else ""), results=results)
        for r in failed:
            r["decision"] = dataclasses.replace(
                r["decision"], reason=f"fp32 kept (--allow-fp32): {r['decision'].reason}")
            rep["targets"][r["target"]]["reason"] = r["decision"].reason
        package = None
        if out is not None:
            if failed:  # the markdown must say what was shipped
                report_md, plots = _write_side_report(out, rep, runs)
            package = _package(out, runs, rep, src, signing_key=signing_key)
        artifacts = {r["target"]: Path(r["chosen"].path) for r in runs} if keep_work else {}
        return QuantizeResult(chosen={r["target"]: r["chosen"].name for r in runs}, artifacts=artifacts,
                              decisions={r["target"]: r["decision"] for r in runs},
                              candidates=[c for r in runs for c in r["candidates"]], report=rep, package=package,
                              report_md=report_md, plots=plots)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
