"""int8 quantization that gates on accuracy *and* measured speed.

``quantize(model, calib, eval, max_drop=1.0)`` tries every candidate that
makes sense for the model, measures each on the user's eval data and on this
machine, and keeps the most accurate of the fastest ones within the accuracy
budget — or says why none qualified. edgeship's value is the search, the
gate, the report and the package; the quantizing itself is done by well-kept
engines (issue 18):

1. **onnxruntime static int8** — QDQ, per-channel weights, after
   ``quant_pre_process`` (symbolic shape inference falls back to plain ONNX
   shape inference, then to no optimisation, instead of stopping); opset < 13
   is upgraded first. u8 activations (onnxruntime's default and the fast
   kernels) with per-channel and with per-tensor weights — the latter is
   plain ``quantize_static``'s default, so that peer is always a candidate —
   share one MinMax calibration pass (the calibration cache holds ranges, not
   scales). Signed activations, Percentile and Entropy run only when no
   cheaper candidate meets the budget (or when asked for); a calibration whose
   scales and zero points equal an earlier one is dropped as a duplicate.
2. **NNCF** (optional, ``pip install nncf``) — its ONNX post-training
   quantization: default preset, fast bias correction, its own ignored
   patterns, transformer model type when the graph has attention; statistics
   per sample as NNCF's defaults take them, from batched inference. Without
   an explicit ``engines`` it runs after the onnxruntime candidates unless
   one of them already equals fp32 on a metric measured against fp32.
3. **onnxruntime dynamic int8** (weights only) — for MatMul/RNN-heavy models;
   auto mode skips it on conv nets, where it is several times slower than fp32.
4. **Accuracy recovery** — for an onnxruntime family that misses the budget,
   compare fp32 and int8 activations node by node (:func:`node_errors`,
   streamed over a few samples), keep the nodes adding the most error in
   float, re-quantize and re-measure, for at most ``recovery_steps`` steps.
5. **Choice** (:func:`choose`, pure) — among the candidates within the
   budget that are as fast as the fastest (within :data:`SPEED_TIE`, the
   timing noise), the most accurate; latency = geometric mean of the batch-1
   and batch-8 ratios to fp32 (the best of 3 interleaved rounds of fp32 and
   the candidates within the budget). With both peers' defaults among the
   candidates, the choice is at least as accurate as either when as fast.
   In ``auto`` mode fp32 competes too: a model where int8 is slower stays
   fp32 and the report says on which machine.
   ``target_bench`` (``edgeship bench --json`` of both variants on the device)
   lets the device decide instead. When no int8 candidate meets the budget:
   :class:`AccuracyBudgetError` (no package written) unless ``allow_fp32``.
6. **TFLite int8** — from a float ``.tflite`` with ai-edge-quantizer
   (static a8w8 and dynamic w8), see :mod:`edgeship.converters.tflite_export`
   (torch models go through litert-torch's PT2E quantizer there).
7. **Report and package** — ``report.json`` in the package (with the time per
   phase and peak RSS), ``<out>.report.md`` and PNG plots next to it; the
   package carries the chosen model and the other precision as variants; the
   manifest records provenance and the int8 scale/zero-point of quantized IO.

Cost: the fp32 model runs once over the eval data (its outputs are the
reference and the baseline's score) and once over the calibration data when a
package is written (for its reference statistics); the per-node error table of
the chosen model is made only on demand (``analyze``).

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

__all__ = ["quantize", "QuantizeResult", "Candidate", "Decision", "DeviceBench", "choose", "node_errors",
           "load_target_bench", "nncf_available", "MIN_CALIB_SAMPLES", "MIN_EVAL_SAMPLES", "CALIBRATIONS",
           "ENGINES", "ACTIVATION_TYPES"]

MIN_CALIB_SAMPLES = 16
MIN_EVAL_SAMPLES = 20
CALIBRATIONS = ("minmax", "percentile", "entropy")
ENGINES = ("onnxruntime", "nncf")
#: uint8 first: onnxruntime's own default, and on x86 and ARM its u8 x s8 kernels are the fast ones
#: (signed activations made the detector/recognizer 1.4-1.6x fp32 against 0.7-0.9x, issue 18).
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
#: Samples the per-node error analysis streams through (it never holds more than one batch of
#: intermediates); enough to rank nodes, far from the 64 x all-tensors that cost 11.9 GB.
NODE_ERROR_SAMPLES = 8
TIMING_BATCH = 8
#: Input bytes per batch for calibration (onnxruntime's MinMax pass and NNCF's statistics keep every
#: activation of a batch alive: PP-OCRv4's detector at 320x320 held ~370 MB a sample, 11.8 GB at
#: batch 32) and for plain inference (eval, reference). Small inputs keep the full batch.
CALIB_BATCH_BYTES = 512 << 10
EVAL_BATCH_BYTES = 8 << 20
TARGETS = ("onnx", "tflite", "both")
METHODS = ("auto", "static", "dynamic")
#: int8 must be at least this much slower than fp32 (geometric-mean latency ratio)
#: before auto mode keeps fp32; below it the difference is measurement noise and
#: the smaller int8 file wins.
SLOWER_TOLERANCE = 0.05
#: Candidates whose speed is within this fraction of the fastest one count as equally fast (the short,
#: interleaved timing phase on a shared 2-core machine did not resolve less: plain ORT's own configuration
#: and the fastest differed by 5-8 % between runs); :func:`choose` takes the most accurate of them.
SPEED_TIE = 0.10
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
    engine: str = "onnxruntime"      # "onnxruntime" | "nncf" | "ai-edge-quantizer" | ...
    activation_type: str | None = None   # "uint8" | "int8" (static ONNX)
    per_channel: bool | None = None
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
    best_int8: str | None = None     # the int8 candidate the rule picked, also when fp32 was kept


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


@dataclasses.dataclass(frozen=True)
class DeviceBench:
    """fp32 and int8 batch-1 latency measured on the target device (``edgeship bench --json`` files)."""

    machine: str
    fp32_ms: float
    int8_ms: float
    source: str

    @property
    def ratio(self) -> float:
        return self.int8_ms / self.fp32_ms


def load_target_bench(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> DeviceBench:
    """Read ``edgeship bench --json`` outputs of an fp32 and an int8 variant measured on one device.

    One file may hold a list of bench results; several files are merged. Each
    result names its variant's ``precision`` (``edgeship bench --variant ID
    --json``) and its ``device``; the p50 of ``raw_latency_ms_b1`` is compared.
    """
    import json

    from ..errors import ConfigError

    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: dict[str, tuple[float, str, str]] = {}
    for p in items:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--target-bench {p}: not a readable bench JSON file ({_one_line(exc, 120)})") from exc
        for r in data if isinstance(data, list) else [data]:
            lat = ((r or {}).get("raw_latency_ms_b1") or {}).get("p50") if isinstance(r, dict) else None
            prec = r.get("precision") if isinstance(r, dict) else None
            if lat is None or prec not in ("fp32", "int8"):
                raise ConfigError(f"--target-bench {p}: no precision and raw_latency_ms_b1.p50; make it on the "
                                  "device with: edgeship bench PACKAGE --variant ID --json")
            dev = r.get("device") or {}
            machine = r.get("device_name") or f"{dev.get('machine', '?')} with {dev.get('cpus', '?')} CPUs"
            found[prec] = (float(lat), machine, str(p))
    missing = [k for k in ("fp32", "int8") if k not in found]
    if missing:
        raise ConfigError(f"--target-bench: no {missing[0]} measurement; bench both variants of the package on "
                          "the device (edgeship bench PACKAGE --variant onnx-fp32 / onnx-int8 --json)")
    if found["fp32"][1] != found["int8"][1]:
        raise ConfigError(f"--target-bench: fp32 was measured on {found['fp32'][1]} but int8 on "
                          f"{found['int8'][1]}; compare them on one device")
    return DeviceBench(machine=found["fp32"][1], fp32_ms=found["fp32"][0], int8_ms=found["int8"][0],
                       source=", ".join(dict.fromkeys(Path(found[k][2]).name for k in ("fp32", "int8"))))


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
           tolerance: float = SLOWER_TOLERANCE, device: DeviceBench | None = None,
           machine: str = "this machine", speed_tie: float = SPEED_TIE) -> Decision:
    """Pick the most accurate candidate within ``max_drop`` points among the fastest; pure, given measured numbers.

    The int8 candidates within the budget whose speed is within ``speed_tie``
    of the fastest one are as fast as timing can tell; of those the one with
    the smallest drop wins (then the faster, then the smaller). Taking the
    plain fastest instead threw accuracy away for a difference below the
    timing noise (issue 18: the detector at IoU 99.9 where plain onnxruntime,
    equally fast, had 100.0).

    ``candidates`` must hold exactly one ``method == "fp32"`` baseline. With
    ``fp32_competes`` (auto mode) fp32 is kept when the chosen int8 candidate
    is more than ``tolerance`` slower than fp32. ``ok`` is False only when no
    int8 candidate met the budget (the caller then refuses, or ships fp32
    with ``allow_fp32``).

    ``device``: int8 vs fp32 measured on the target device; then *that*
    machine decides fp32 vs int8 (the int8 candidates are still ranked by
    this machine's timings). ``machine`` names where the timings were taken,
    for the reason.
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
    fastest = min(within, key=lambda c: (speed[c.name], c.drop, c.size or 0))
    tied = [c for c in within if speed[c.name] <= speed[fastest.name] * (1.0 + speed_tie)]
    best = min(tied, key=lambda c: (c.drop, speed[c.name], c.size or 0))
    s = speed[best.name]
    lat = (f"b1 {best.latency_b1_ms:.3g} ms vs {base.latency_b1_ms:.3g} ms, "
           f"batch {best.latency_batch_ms:.3g} ms vs {base.latency_batch_ms:.3g} ms"
           if None not in (best.latency_b1_ms, base.latency_b1_ms, best.latency_batch_ms, base.latency_batch_ms)
           else "")
    if best is fastest:
        rank = f"{best.name} is the fastest candidate within {max_drop:g} pt"
    else:
        rank = (f"{best.name} is the most accurate of the candidates within {max_drop:g} pt that are as fast as "
                f"the fastest ({fastest.name}, {speed[fastest.name]:.2f}x; {100 * speed_tie:g} % timing noise), "
                f"{fastest.drop:.2f} pt drop there")
    if device is not None:
        on_dev = (f"on {device.machine} (edgeship bench: int8 {device.int8_ms:.3g} ms vs fp32 "
                  f"{device.fp32_ms:.3g} ms at batch 1, {device.source})")
        if fp32_competes and device.ratio > 1.0 + tolerance:
            return Decision(chosen=base.name, ok=True, speed=speed, best_int8=best.name,
                            reason=(f"kept fp32: int8 is {device.ratio:.2f}x the fp32 latency {on_dev}; "
                                    f"{best.name} stays in the package as a variant"))
        return Decision(chosen=best.name, ok=True, speed=speed, best_int8=best.name,
                        reason=(f"{rank} here ({s:.2f}x fp32 on {machine}), {best.drop:.2f} pt drop; int8 takes "
                                f"{device.ratio:.2f}x the fp32 latency {on_dev}"))
    if fp32_competes and s > 1.0 + tolerance:
        return Decision(chosen=base.name, ok=True, speed=speed, best_int8=best.name,
                        reason=(f"kept fp32: int8 is slower on {machine} — the best int8 candidate within "
                                f"{max_drop:g} pt ({best.name}) takes {s:.2f}x the fp32 latency ({lat})"))
    return Decision(chosen=best.name, ok=True, speed=speed, best_int8=best.name,
                    reason=(f"{rank}: {s:.2f}x fp32 latency on {machine} ({lat}), {best.drop:.2f} pt drop"))


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


def _batch_for(data: Dataset, batch: int, budget: int) -> int:
    """``batch`` or fewer samples, so that one batch holds at most ``budget`` bytes of input."""
    per_sample = sum(np.asarray(v[:1]).nbytes for v in data.inputs.values()) or 1
    return max(1, min(batch, budget // per_sample))


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


def _peak_rss_mb() -> float:
    """This process's peak RSS so far (MB): the quantize run's cost in memory.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a process started by a big
    parent reports the parent's peak (the benchmark's children all showed the parent's 1,469 MB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    # Zero points too: u8 and s8 activations share their scales and differ only there.
    for init in sorted((i for i in m.graph.initializer if i.name.endswith(("_scale", "_zero_point"))),
                       key=lambda i: i.name):
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


_QTYPES = {"uint8": "QUInt8", "int8": "QInt8"}


@dataclasses.dataclass(frozen=True)
class _Knobs:
    """What the user may set, as onnxruntime's quantize_static users expect (all optional)."""

    exclude_nodes: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    per_channel: bool | None = None      # None: the search tries both (per-tensor is onnxruntime's default)
    weight_type: str = "int8"


def _build_candidate(prepped: Path, out: Path, *, method: str, calibration: str | None, feeds, cache_dir: Path,
                     exclude: Sequence[str], quiet: bool, activation_type: str = "int8",
                     knobs: _Knobs = _Knobs(), per_channel: bool = True) -> None:
    """One onnxruntime int8 model (QDQ static or dynamic) from the prepared fp32 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    exclude = list(dict.fromkeys([*knobs.exclude_nodes, *exclude]))
    op_types = list(knobs.op_types) if knobs.op_types else None
    wtype = getattr(QuantType, _QTYPES[knobs.weight_type])
    with _quiet_ort_logging():
        if method == "dynamic":
            quantize_dynamic(str(prepped), str(out), weight_type=wtype, per_channel=False,
                             nodes_to_exclude=exclude, op_types_to_quantize=op_types)
            return
        cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibration]
        # Not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the chunk it
        # clears instead of folding it into the ranges ("No data is collected").
        extra = {"CalibPercentile": 99.999} if calibration == "percentile" else {}
        # The cache holds tensor ranges, which do not depend on the activation type: u8 and s8
        # candidates of one calibration share a single calibration pass.
        cache = cache_dir / f"calib-{calibration}.json"
        if calibration != "minmax" and len({len(next(iter(f.values()))) for f in feeds}) > 1:
            # The histogram calibrators stack per-run outputs into one array, so every run
            # must have the same batch (a short last batch breaks it): feed one sample at a time.
            feeds = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
        reader = None if cache.is_file() else _reader(feeds, desc=f"calibrating ({calibration})", quiet=quiet)
        # onnxruntime prints calibration chatter to stdout; our stdout belongs to the CLI's result
        # and our progress bar already says what is happening.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            quantize_static(str(prepped), str(out), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=getattr(QuantType, _QTYPES[activation_type]),
                            weight_type=wtype, calibrate_method=cm, nodes_to_exclude=exclude,
                            op_types_to_quantize=op_types, extra_options=extra, calibration_cache_path=str(cache))


def _dynamic_worth_trying(path: Path) -> bool:
    """Dynamic int8 pays off for MatMul/Gemm/RNN-heavy models; on a conv net it becomes ConvInteger,
    several times slower than fp32 (7x on a 224x224 MobileNet), so auto mode does not spend time on it."""
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    dense = sum(op in ("MatMul", "Gemm", "LSTM", "GRU", "Attention") for op in ops)
    return dense >= sum(op == "Conv" for op in ops)


def nncf_available() -> bool:
    """Whether NNCF (the optional engine, ``pip install nncf``) can be imported."""
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


def _looks_like_transformer(path: Path) -> bool:
    """Attention present (Softmax fed by a MatMul): NNCF's transformer model type then applies."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    return any(n.op_type == "Softmax" and any(producers.get(t) in ("MatMul", "Add", "Div", "Where")
                                               for t in n.input) for n in m.graph.node) and \
        sum(n.op_type == "MatMul" for n in m.graph.node) >= 2


def _build_nncf(src: Path, out: Path, *, feeds, exclude: Sequence[str], transformer: bool,
                knobs: _Knobs = _Knobs()) -> None:
    """NNCF post-training quantization (ONNX backend): default preset, fast bias correction,
    its own model-aware ignored patterns, plus the user's excluded nodes / op types."""
    with _without_torch():
        _nncf_quantize(src, out, feeds=feeds, exclude=exclude, transformer=transformer, knobs=knobs)


@contextlib.contextmanager
def _without_torch():
    """``import nncf`` imports torch when it is installed (5-7 s, most of an NNCF run on a small model),
    for torch tensor functions the ONNX backend never calls; NNCF skips that backend on ImportError. So
    while NNCF runs here, and torch is not loaded yet, importing it fails. quantize runs in the caller's
    thread and nothing else in it imports torch meanwhile; a torch model was exported (and torch
    imported) before, so then nothing is blocked."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None   # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _nncf_quantize(src: Path, out: Path, *, feeds, exclude: Sequence[str], transformer: bool, knobs: _Knobs) -> None:
    import logging

    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    model = onnx.load(str(src))
    names = [n.name for n in model.graph.node]
    ignored = list(dict.fromkeys([*knobs.exclude_nodes, *exclude]))
    if knobs.op_types:
        wanted = set(knobs.op_types)
        ignored += [n.name for n in model.graph.node if n.op_type not in wanted and n.name in names]
    # Whole batches per item: NNCF's statistics and fast bias correction then run a few batched
    # inferences instead of one per sample (4x less time on a 224x224 CNN). Batch-wise statistics keep
    # its activation ranges those of single samples (mean of per-sample min/max, NNCF's default), so
    # the candidate is NNCF's default configuration, not a coarser one; graphs where an output has no
    # batch axis (embeddings, attention in NNCF's transformer mode) get single-sample items instead.
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    n = sum(len(next(iter(f.values()))) for f in feeds)
    kwargs = {}
    if transformer or _has_embedding(model):
        items = [{k: v[i:i + 1] for k, v in f.items()} for f in feeds for i in range(len(next(iter(f.values()))))]
    else:
        items = list(feeds)
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(batchwise_statistics=True)
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=False)
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        # NNCF reports progress through rich on stdout and warns about optional backends it does not find.
        warnings.simplefilter("ignore")
        q = nncf.quantize(model, nncf.Dataset(items), subset_size=n, fast_bias_correction=True, **kwargs)
    onnx.save(q, str(out))


def _has_embedding(model) -> bool:
    """A Gather from a weight table (an embedding) or RoiAlign: outputs without a batch axis (NNCF's list)."""
    weights = {i.name for i in model.graph.initializer}
    return any(n.op_type == "RoiAlign" or (n.op_type == "Gather" and n.input and n.input[0] in weights)
               for n in model.graph.node)


# --------------------------------------------------------------------------- per-node error

def _sqnr_db(signal_ss: float, noise_ss: float) -> float:
    """SQNR in dB from sums of squares of the reference and of the error (capped)."""
    signal, noise = math.sqrt(signal_ss), math.sqrt(noise_ss)
    if noise <= 1e-12 * max(signal, 1e-12):
        return _SQNR_CAP_DB
    return float(min(_SQNR_CAP_DB, 20.0 * math.log10(max(signal, 1e-30) / noise)))


def node_errors(fp32_path, int8_path, data: Dataset, *, work_dir, batch: int = 4,
                max_samples: int = NODE_ERROR_SAMPLES, quiet: bool = True) -> list[dict]:
    """Per-node error of an int8 model against its fp32 source, in graph order.

    Both models run with every intermediate tensor as an output on the first
    ``max_samples`` samples, ``batch`` at a time; only running sums of squares
    per tensor are kept, so memory is one batch of intermediates whatever the
    sample count. For each fp32 node: ``sqnr_db`` is the
    signal-to-quantisation-noise ratio of its output in the int8 model (after
    its QDQ pair when it has one), ``added_db`` how much SQNR the node loses
    relative to its worst activation input — the error this node adds, the
    ranking used to choose nodes to keep in float.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors
    from onnxruntime.quantization.quant_utils import DEQUANT_OUTPUT_SUFFIX

    work = Path(work_dir)
    sample = data.take(max_samples)
    fixed = ev.OnnxModel(fp32_path).fixed_batch
    models = {}
    for tag, path in (("fp32", fp32_path), ("int8", int8_path)):
        aug = work / f"aug-{tag}-{os.getpid()}.onnx"
        try:
            with _quiet_ort_logging():
                modify_model_output_intermediate_tensors(str(path), str(aug))
            models[tag] = ev.OnnxModel(aug)
        finally:
            aug.unlink(missing_ok=True)
    names = {tag: [o.name for o in m.session.get_outputs()] for tag, m in models.items()}
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    mismatch: set[str] = set()
    for feed in _progress(_feeds(sample, batch, fixed), desc="per-node error", quiet=quiet):
        f = dict(zip(names["fp32"], models["fp32"].run(feed)))
        q = dict(zip(names["int8"], models["int8"].run(feed)))
        for name, arr in feed.items():   # graph inputs: their own QDQ error counts too
            if np.asarray(arr).dtype.kind == "f":
                f.setdefault(name, np.asarray(arr))
        for t, ref in f.items():
            other = q.get(t + DEQUANT_OUTPUT_SUFFIX, q.get(t))
            if other is None:
                continue
            if np.shape(other) != np.shape(ref):
                mismatch.add(t)
                continue
            r = np.asarray(ref, np.float64)
            signal[t] = signal.get(t, 0.0) + float(np.sum(r * r))
            noise[t] = noise.get(t, 0.0) + float(np.sum((r - np.asarray(other, np.float64)) ** 2))
        del f, q
    sqnr = {t: _sqnr_db(signal[t], noise[t]) for t in signal if t not in mismatch}
    sqnr.update({t: float("nan") for t in mismatch})
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
             fp32_points: float | None, batch: int, max_drop: float, metric_options: Mapping | None = None,
             outputs: np.ndarray | None = None) -> None:
    """Accuracy and size of one candidate; latency is timed later for all at once (:func:`_time_all`)."""
    c.path = str(model_path)
    c.size = model_path.stat().st_size
    res = ev.evaluate(model_path, evald, metric=metric, reference=reference, batch=batch, options=metric_options,
                      outputs=outputs)
    c.metric_value = res["value"]
    c.points = res["points"]
    c.drop = 0.0 if fp32_points is None else round(fp32_points - c.points, 6)
    c.meets_budget = c.drop <= max_drop


def _time_all(cands: Sequence[Candidate], evald: Dataset, *, batch: int, threads_batch: int, repeats: int,
              quiet: bool, rounds: int = 3) -> None:
    """Latency (best round of medians) at batch 1 (1 thread) and ``batch`` (``threads_batch``) of every candidate.

    Candidates are timed in interleaved rounds rather than one after another,
    so a burst of load from another process lands on all of them instead of
    deciding the choice by itself. ``repeats`` batch-1 runs in all (the
    batch-``batch`` runs are a third of that): the phase stays a few seconds
    even for a 224x224 CNN.
    """
    live = [c for c in cands if c.error is None and c.duplicate_of is None and c.path]
    if not live:
        return
    per_round = max(2, repeats // rounds)
    b1 = {c.name: [] for c in live}
    bn = {c.name: [] for c in live}
    m1 = {c.name: ev.open_model(c.path, threads=1) for c in live}
    mn = {c.name: ev.open_model(c.path, threads=threads_batch) for c in live}
    for r in _progress(range(rounds), desc="timing", quiet=quiet):
        for c in live:
            b1[c.name].append(ev.measure_latency(m1[c.name], evald.inputs, threads=1, batch=1, repeats=per_round,
                                                 warmup=1))
            # one warm-up run per session is enough at batch N (a run of PP-OCR's recognizer at batch 8
            # took 0.7 s: warming up every round was a third of the timing phase)
            bn[c.name].append(ev.measure_latency(mn[c.name], evald.inputs, threads=threads_batch, batch=batch,
                                                 repeats=max(1, per_round // 3), warmup=1 if r == 0 else 0))
    for c in live:
        # The best round: load from other processes only ever adds time, so the least disturbed
        # round is the closest to the model's own cost (medians moved 5-8 % between runs here).
        c.latency_b1_ms = float(np.min(b1[c.name]))
        c.latency_batch_ms = float(np.min(bn[c.name]))


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


@contextlib.contextmanager
def _phase(phases: dict, name: str, quiet: bool = True):
    """Wall time of one phase of the run, for the report (where the minutes went); a progress line
    per phase on a terminal (phases with steps show their own bar inside)."""
    t = time.monotonic()
    bar = _progress(None, desc=name, quiet=quiet, total=1)
    try:
        yield
    finally:
        bar.update(1)
        bar.close()
        phases[name] = round(phases.get(name, 0.0) + time.monotonic() - t, 2)


def _candidate_name(engine: str, method: str, calibration: str | None, act: str | None,
                    per_channel: bool | None = True) -> str:
    if engine == "nncf":
        return "nncf"
    if method == "dynamic":
        return "dynamic"
    return f"ort-{'u8' if act == 'uint8' else 's8'}-{calibration}" + ("" if per_channel else "-pt")


def _attempt(c: Candidate, build, measure) -> None:
    """Build and measure one candidate; a failure is recorded on it and never sinks the search."""
    t = time.monotonic()
    try:
        if build() is not False:
            measure()
    except EdgeshipError as exc:
        c.error = str(exc)
    except Exception as exc:  # onnxruntime.quantization / NNCF raise bare Exceptions; keep the other candidates
        c.error = f"{type(exc).__name__}: {_one_line(exc)}"
    finally:
        c.seconds = round(time.monotonic() - t, 2)


#: Stage kinds of the search: ``peer`` steps run unless a candidate already equals fp32 on a metric
#: measured against fp32 (nothing can score higher); ``escalate`` steps only while nothing meets the budget.
PEER, ESCALATE = "peer", "escalate"


def _search_plan(method: str, engines: Sequence[str] | None, calibrations: Sequence[str] | None,
                 activation_types: Sequence[str] | None, per_channel: bool | None, dense: bool,
                 nncf_installed: bool) -> tuple[list, list[tuple[str, list]]]:
    """The candidates to try first, and the later steps as ``(kind, candidates)``; pure.

    Each candidate is ``(engine, method, calibration, activation type, per_channel)``. With nothing
    given, the first steps hold both peers' default configurations — onnxruntime's ``quantize_static``
    defaults (u8 activations, per-tensor weights, MinMax) and NNCF's default preset — beside
    onnxruntime u8 per-channel, so the choice among them is never worse than either peer. Signed
    activations, Percentile and Entropy (a calibration pass each) come only while nothing meets the
    budget: on the real models they cost time and were never the only candidate in budget but once.
    """
    staged = engines is None
    engines = [e for e in (engines or ENGINES) if e != "nncf" or nncf_installed]
    acts = tuple(activation_types) if activation_types is not None else ACTIVATION_TYPES
    first_acts = acts if activation_types is not None else acts[:1]
    explicit = calibrations is not None
    first_cals = tuple(calibrations) if explicit else ("minmax",)
    layouts = (per_channel,) if per_channel is not None else (True,)

    def ort(cals, acts_, *, peer_layout: bool = False):
        out = [("onnxruntime", "static", cal, act, pc) for cal in cals for act in acts_ for pc in layouts]
        if peer_layout and per_channel is None and "uint8" in acts_ and "minmax" in cals:
            # onnxruntime's own default: the plain-ORT peer, per-tensor weights.
            out.insert(1, ("onnxruntime", "static", "minmax", "uint8", False))
        return out

    plan, later = [], []
    if method in ("auto", "static"):
        if "onnxruntime" in engines:
            plan += ort(first_cals, first_acts, peer_layout=True)
        if "nncf" in engines:
            (later.append((PEER, [("nncf", "static", None, None, True)])) if staged
             else plan.append(("nncf", "static", None, None, True)))
    if method == "dynamic" or (method == "auto" and "onnxruntime" in engines and dense):
        plan.append(("onnxruntime", "dynamic", None, None, False))
    if method != "dynamic" and "onnxruntime" in engines:
        rest = [a for a in acts if a not in first_acts]
        if rest:
            later.append((ESCALATE, ort(first_cals, rest)))
        if not explicit:
            later += [(ESCALATE, ort((cal,), acts)) for cal in ("percentile", "entropy")]
    return plan, later


def _recover(candidates: list[Candidate], *, prepped: Path, calib_d: Dataset, work: Path, quiet: bool, steps: int,
             node_tables: dict, log: list, build, measure) -> None:
    """Accuracy recovery (onnxruntime candidates): per family with no candidate in the budget, start from
    its most accurate onnxruntime candidate and keep the nodes adding the most error in float, for at
    most ``steps`` steps; new candidates are appended to ``candidates``."""
    for fam in ("static", "dynamic"):
        fam_cands = [c for c in candidates if c.method == fam and c.error is None and c.drop is not None]
        ort_cands = [c for c in fam_cands if c.engine == "onnxruntime"]
        if not ort_cands or any(c.meets_budget for c in fam_cands) or steps <= 0:
            continue
        start = min(ort_cands, key=lambda c: c.drop)
        quantizable = _quantizable_nodes(prepped, fam)
        per_step = max(1, math.ceil(0.1 * len(quantizable)))
        excluded: list[str] = []
        current = start
        for step in range(1, steps + 1):
            try:
                # one sample at a time: both models' every intermediate of PP-OCR's recognizer
                # took 5.5 GB at batch 4
                rows = node_errors(prepped, Path(current.path), calib_d, work_dir=work, quiet=quiet, batch=1)
            except Exception as exc:  # analysis is best effort: report it, keep the candidates we have
                log.append({"from": current.name, "step": step, "error": _one_line(exc)})
                break
            node_tables[current.name] = rows
            ranked = [r for r in sorted(rows, key=lambda r: -r["added_db"])
                      if r["added_db"] > 0 and _fixes(r, quantizable, excluded)]
            if not ranked:
                log.append({"from": current.name, "step": step, "note": "no node adds measurable error"})
                break
            worst = list(dict.fromkeys(n for r in ranked[:per_step] for n in _fixes(r, quantizable, excluded)))
            excluded = excluded + worst
            name = f"{start.name}+float{len(excluded)}"
            c = Candidate(name=name, target="onnx", method=fam, calibration=start.calibration,
                          excluded_nodes=list(excluded), engine="onnxruntime", activation_type=start.activation_type,
                          per_channel=start.per_channel)
            candidates.append(c)
            out = work / f"{name}.onnx"
            _attempt(c, lambda c=c, out=out: build(c, out), lambda c=c, out=out: measure(c, out))
            log.append({"from": current.name, "step": step, "excluded": worst, "candidate": name,
                        "drop": c.drop, "meets_budget": c.meets_budget})
            if c.error is not None or c.meets_budget:
                break
            current = c


def _run_onnx(src: _Source, calib, evald, *, max_drop: float, metric: str | None, method: str, batch: int,
              threads_batch: int, repeats: int, calibrations: Sequence[str] | None, recovery_steps: int,
              work: Path, quiet: bool, metric_options: Mapping | None = None,
              engines: Sequence[str] | None = None, activation_types: Sequence[str] | None = None,
              knobs: _Knobs = _Knobs(), samples: int | None = None, analyze: bool = False,
              device: DeviceBench | None = None, machine: str = "this machine", model_type: str | None = None,
              packaging: bool = False) -> dict:
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    fp32_path = src.file_for("onnx")
    with _phase(phases, "prepare", quiet):
        prepped, notes = _prepare_onnx(fp32_path, work, quiet=quiet)
        # One fp32 session for the IO specs, the batch and the reference run (each session costs
        # a graph optimisation pass: ~0.3 s on the 10 MB recognizer).
        fp32_model = ev.OnnxModel(fp32_path)
        specs, out_specs = fp32_model.inputs, fp32_model.outputs
        calib_d, eval_d = _load_sets(calib, evald, specs, src.preprocess)
        if samples is not None:
            calib_d = calib_d.take(samples)
        fixed = fp32_model.fixed_batch
    bs = fixed or _batch_for(eval_d, batch, EVAL_BATCH_BYTES)
    # Latency is compared at batch 1 and at a serving-size batch; 8 ranks candidates like 32 does
    # at a quarter of the cost (a batch of 32 224x224 images takes a second per run), and large
    # inputs get fewer (PP-OCR's detector at 320x320 took a second per batch of 8).
    timing_batch = fixed or _batch_for(eval_d, min(batch, TIMING_BATCH), CALIB_BATCH_BYTES)
    with _phase(phases, "fp32 reference", quiet):
        # The fp32 model runs once over the eval data (its outputs are the reference *and* the
        # baseline's score) and, only when a package is written, once over the calibration data
        # for the reference statistics.
        reference = ev.predict(fp32_model, eval_d, batch=bs)
        calib_reference = ev.predict(fp32_model, calib_d, batch=bs) if packaging else None
        fp32_model.close()
    metric = ev.choose_metric(reference.shape, eval_d.labels is not None, metric)
    ev.metric_value(metric, reference, labels=eval_d.labels, reference=reference, options=metric_options)
    base = Candidate(name="fp32", target="onnx", method="fp32", engine="fp32")
    measure_kw = dict(metric=metric, reference=reference, batch=bs, max_drop=max_drop, metric_options=metric_options)
    _measure(base, fp32_path, eval_d, fp32_points=None, outputs=reference, **measure_kw)
    fp32_points = base.points
    feeds = _feeds(calib_d, _batch_for(calib_d, batch, CALIB_BATCH_BYTES), fixed)
    transformer = model_type == "transformer" or (model_type is None and _looks_like_transformer(prepped))
    notes["model_type"] = "transformer" if transformer else "default"
    candidates = [base]
    digests: dict[str, str] = {}

    def run(plan) -> None:
        for engine, meth, cal, act, pc in _progress(plan, desc="candidates", quiet=quiet):
            name = _candidate_name(engine, meth, cal, act, pc)
            c = Candidate(name=name, target="onnx", method=meth, calibration=cal, engine=engine,
                          activation_type=act if meth == "static" else None, per_channel=pc)
            candidates.append(c)
            out = work / f"{name}.onnx"

            def build(c=c, out=out, engine=engine, meth=meth, cal=cal, act=act, pc=pc):
                if engine == "nncf":
                    _build_nncf(prepped, out, feeds=feeds, exclude=[], transformer=transformer, knobs=knobs)
                    return True
                _build_candidate(prepped, out, method=meth, calibration=cal, feeds=feeds, cache_dir=work,
                                 exclude=[], quiet=quiet, activation_type=act or "int8", knobs=knobs,
                                 per_channel=bool(pc))
                if meth == "static":
                    dig = _scale_digest(out)
                    if dig in digests:
                        c.duplicate_of = digests[dig]
                        c.path, c.size = str(out), out.stat().st_size
                        return False
                    digests[dig] = c.name
                return True

            _attempt(c, build, lambda c=c, out=out: _measure(c, out, eval_d, fp32_points=fp32_points, **measure_kw))

    # Staged search (engines not given): onnxruntime's u8 MinMax candidates first (one calibration
    # pass serves them all), NNCF's default next unless one of them already equals fp32, then signed
    # activations and the histogram calibrations (a pass each) only while nothing meets the budget.
    notes["engines"] = [e for e in (engines or ENGINES) if e != "nncf" or nncf_available()]
    plan, later = _search_plan(method, engines, calibrations, activation_types, knobs.per_channel,
                               dense=method == "auto" and _dynamic_worth_trying(prepped),
                               nncf_installed=nncf_available())
    node_tables: dict[str, list[dict]] = {}
    recovery_log: list[dict] = []

    def recover() -> None:
        t_rec = time.monotonic()
        _recover(candidates, prepped=prepped, calib_d=calib_d, work=work, quiet=quiet, steps=recovery_steps,
                 node_tables=node_tables, log=recovery_log,
                 build=lambda c, out: _build_candidate(
                     prepped, out, method=c.method, calibration=c.calibration, feeds=feeds, cache_dir=work,
                     exclude=c.excluded_nodes, quiet=quiet, activation_type=c.activation_type or "int8",
                     knobs=knobs, per_channel=bool(c.per_channel)),
                 measure=lambda c, out: _measure(c, out, eval_d, fp32_points=fp32_points, **measure_kw))
        if recovery_log:
            phases["recovery"] = round(phases.get("recovery", 0.0) + time.monotonic() - t_rec, 2)

    recovered = False
    with _phase(phases, "candidates", quiet):
        run(plan)
        for kind, step in later:
            tried = [c for c in candidates if c.method != "fp32" and c.drop is not None]
            if kind == PEER and metric != "top1" and any(c.drop <= 0 for c in tried):
                notes.setdefault("skipped", []).append(
                    ", ".join(_candidate_name(*x) for x in step) + " (a candidate already equals fp32)")
                continue
            if kind == ESCALATE and not recovered:
                # Keeping the worst nodes in float costs one streamed analysis and one build (0.5-2 s
                # on the PP-OCR models) where another calibration costs a pass over the data and a
                # full evaluation per activation type: it goes first.
                recover()
                recovered = True
            if kind == ESCALATE and any(c.meets_budget for c in candidates if c.method != "fp32"):
                break
            if kind == ESCALATE:
                notes.setdefault("escalated", []).append(", ".join(_candidate_name(*x) for x in step))
            run(step)
    if not recovered:
        recover()

    with _phase(phases, "timing", quiet):
        # Only fp32 and the candidates within the budget can be chosen, so only they are timed
        # (a 224x224 CNN costs ~1 s of timing per candidate).
        _time_all([c for c in candidates if c.method == "fp32" or c.meets_budget], eval_d, batch=timing_batch,
                  threads_batch=threads_batch, repeats=repeats, quiet=quiet)
    decision = choose(candidates, max_drop=max_drop, fp32_competes=(method == "auto"), device=device,
                      machine=machine)
    chosen = next(c for c in candidates if c.name == decision.chosen)
    if analyze and chosen.method != "fp32" and chosen.name not in node_tables:
        with _phase(phases, "per-node error", quiet):
            try:
                node_tables[chosen.name] = node_errors(prepped, Path(chosen.path), calib_d, work_dir=work,
                                                       quiet=quiet, batch=_batch_for(calib_d, 4, CALIB_BATCH_BYTES))
            except Exception as exc:  # the table is a report nicety, never a reason to fail
                recovery_log.append({"from": chosen.name, "error": f"per-node analysis failed: {_one_line(exc)}"})
    return {"target": "onnx", "candidates": candidates, "decision": decision, "chosen": chosen, "metric": metric,
            "metric_options": dict(metric_options or {}),
            "reference": reference, "calib_reference": calib_reference, "calib": calib_d, "eval": eval_d,
            "specs": specs, "out_specs": out_specs,
            "node_errors": node_tables.get(chosen.name, []), "recovery": recovery_log, "notes": notes,
            "io_quantization": _io_quantization(Path(chosen.path)) if chosen.method == "static" else {},
            "fp32_path": fp32_path, "seconds": round(time.monotonic() - t0, 2), "batch": timing_batch,
            "phases": phases,
            "device": device}


def _run_tflite(src: _Source, calib, evald, *, max_drop: float, metric: str | None, method: str, batch: int,
                threads_batch: int, repeats: int, work: Path, quiet: bool, metric_options: Mapping | None = None,
                samples: int | None = None, device: DeviceBench | None = None, machine: str = "this machine",
                packaging: bool = False, **_onnx_only) -> dict:
    from .tflite_export import quantize_tflite

    t0 = time.monotonic()
    fp32_path = src.file_for("tflite")
    fp32_model = ev.TfliteModel(fp32_path)
    specs, out_specs = fp32_model.inputs, fp32_model.outputs
    calib_d, eval_d = _load_sets(calib, evald, specs, src.preprocess)
    if samples is not None:
        calib_d = calib_d.take(samples)
    reference = ev.predict(fp32_path, eval_d, batch=batch)
    calib_reference = ev.predict(fp32_path, calib_d, batch=batch) if packaging else None
    metric = ev.choose_metric(reference.shape, eval_d.labels is not None, metric)
    base = Candidate(name="tflite-fp32", target="tflite", method="fp32", engine="fp32")
    measure_kw = dict(metric=metric, reference=reference, batch=batch, max_drop=max_drop, metric_options=metric_options)
    _measure(base, fp32_path, eval_d, fp32_points=None, outputs=reference, **measure_kw)
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
                      calibration={"static": "minmax", "pt2e": "histogram"}.get(meth),
                      engine="litert-torch" if meth == "pt2e" else "ai-edge-quantizer")
        candidates.append(c)
        out = work / f"tflite-{meth}.tflite"

        def build(meth=meth, out=out):
            if meth == "pt2e":
                from .tflite_export import export_tflite_int8

                arrays = [calib_d.inputs[s.name] if s.name in calib_d.inputs else v
                          for s, v in zip(specs, calib_d.inputs.values())]
                export_tflite_int8(src.torch_module, tuple(a[:1] for a in arrays), tuple(arrays), out, quiet=quiet)
            else:
                quantize_tflite(fp32_path, calib_d, out, mode=meth, quiet=quiet)

        _attempt(c, build, lambda c=c, out=out: _measure(c, out, eval_d, fp32_points=base.points, **measure_kw))
    _time_all(candidates, eval_d, batch=batch, threads_batch=threads_batch, repeats=repeats, quiet=quiet)
    decision = choose(candidates, max_drop=max_drop, fp32_competes=(method == "auto"), device=device,
                      machine=machine)
    chosen = next(c for c in candidates if c.name == decision.chosen)
    io_q = {}
    if chosen.method != "fp32":
        m = ev.TfliteModel(chosen.path)
        io_q = {"inputs": {s.name: q for s, q in zip(m.inputs, m.quantization("inputs")) if q},
                "outputs": {s.name: q for s, q in zip(m.outputs, m.quantization("outputs")) if q}}
    return {"target": "tflite", "candidates": candidates, "decision": decision, "chosen": chosen, "metric": metric,
            "metric_options": dict(metric_options or {}), "calib_reference": calib_reference, "phases": {},
            "device": device,
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
           "latency": {"batch1_threads": 1, "batch_threads": threads_batch, "statistic": "ms, best of 3 interleaved rounds of medians"},
           "targets": {}}
    for r in runs:
        base = next(c for c in r["candidates"] if c.method == "fp32")
        ch = r["chosen"]
        rep["targets"][r["target"]] = {
            "metric": r["metric"], "metric_options": r["metric_options"], "batch": r["batch"],
            "decided_on": (dataclasses.asdict(r["device"]) if r["device"] is not None
                           else {"machine": machine.get("cpu") or machine.get("machine"), "source": "this machine"}),
            "phases": r["phases"],
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
    rep["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return rep


def _write_side_report(out_base: Path, rep: dict, runs: list[dict]) -> tuple[Path, list[Path]]:
    from . import report as rp

    plots = []
    sections = []
    for r in runs:
        t = r["target"]
        tr = rep["targets"][t]
        pts = [{"name": c.name, "latency": c.latency_b1_ms, "points": c.points} for c in r["candidates"]
               if c.error is None and c.duplicate_of is None and c.latency_b1_ms is not None]
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
        cols = ["name", "engine", "activation_type", "calibration", "points", "drop", "latency_b1_ms",
                "latency_batch_ms", "size", "meets_budget", "note"]
        rows = []
        for c in r["candidates"]:
            d = c.to_dict()
            d["note"] = (f"duplicate of {c.duplicate_of}" if c.duplicate_of else c.error or
                         (f"{len(c.excluded_nodes)} nodes kept in float" if c.excluded_nodes else "") or
                         ("not timed (out of budget)" if c.meets_budget is False else ""))
            rows.append(d)
        body = [f"**Chosen: {tr['chosen']}** — {tr['reason']}", "",
                f"Metric `{tr['metric']}` on {tr['eval_samples']} eval samples; calibration on "
                f"{tr['calibration_samples']} samples; budget {rep['max_drop']:g} points.", "",
                rp.markdown_table(rows, cols, ["candidate", "engine", "activations", "calibration", "points",
                                               "drop (pt)",
                                               "b1 ms", f"b{tr['batch']} ms", "bytes", "in budget", "note"])]
        if tr["int8"]:
            i8 = tr["int8"]
            body += ["", f"Size {rp.fmt(i8['size_ratio'])}x fp32, latency {rp.fmt(i8['latency_b1_ratio'])}x "
                         f"(batch 1, 1 thread) and {rp.fmt(i8['latency_batch_ratio'])}x (batch {tr['batch']}, "
                         f"{rep['latency']['batch_threads']} threads)."]
        if tr["phases"]:
            body += ["", "Time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in tr["phases"].items())
                     + f"; peak RSS {rep['peak_rss_mb']:.0f} MB."]
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


def _variant(r: dict, c: Candidate, member: str, default: bool) -> dict:
    io_q = r["io_quantization"] if r["target"] == "tflite" and c is r["chosen"] else {}
    if r["target"] == "tflite" and c.method != "fp32":
        m = ev.TfliteModel(c.path)
        v_in = [_spec_dict(s, (io_q.get("inputs") or {}).get(s.name), s.dtype) for s in m.inputs]
        v_out = [_spec_dict(s, (io_q.get("outputs") or {}).get(s.name), s.dtype) for s in m.outputs]
    else:
        v_in = [_spec_dict(s) for s in r["specs"]]
        v_out = [_spec_dict(s) for s in r["out_specs"]]
    metrics = {r["metric"]: c.metric_value, "points": c.points, "drop": c.drop,
               "latency_ms_b1": c.latency_b1_ms, f"latency_ms_b{r['batch']}": c.latency_batch_ms, "size": c.size}
    return {"id": f"{r['target']}-{c.precision}", "file": member,
            "runtime": "onnxruntime" if r["target"] == "onnx" else "tflite", "precision": c.precision,
            "default": default, "metrics": metrics, "inputs": v_in, "outputs": v_out}


def _package(out: Path, runs: list[dict], rep: dict, src: _Source, *, signing_key, both_precisions: bool = True
             ) -> Path:
    """Write the package: per target the chosen model, and (``both_precisions``) the other precision as a
    second variant — fp32 beside int8, or the best int8 beside a kept fp32 — so the agent can measure
    both on the device and pick (``adapt``)."""
    from .. import package as pkgmod

    files: dict[str, str] = {}
    variants = []
    for r in runs:
        ch = r["chosen"]
        ext = "onnx" if r["target"] == "onnx" else "tflite"
        member = f"model.{ext}"
        files[member] = ch.path
        variants.append(_variant(r, ch, member, default=not variants))
        other = None
        if both_precisions and r["decision"].ok:
            other_name = "fp32" if ch.method != "fp32" else r["decision"].best_int8
            other = next((c for c in r["candidates"] if c.name == other_name or
                          (other_name == "fp32" and c.method == "fp32")), None) if other_name else None
        if other is not None and other is not ch:
            member = f"model.{other.precision}.{ext}"
            files[member] = other.path
            variants.append(_variant(r, other, member, default=False))
    first = runs[0]
    example = first["eval"].take(1)
    example_input = next(iter(example.inputs.values())) if len(example.inputs) == 1 else dict(example.inputs)
    provenance = {**{k: v for k, v in src.provenance.items() if k != "quantization"},
                  "quantization": {
                      r["target"]: {"method": r["chosen"].method, "calibration": r["chosen"].calibration,
                                    "candidate": r["chosen"].name, "calibration_samples": len(r["calib"]),
                                    "engine": r["chosen"].engine, "activation_type": r["chosen"].activation_type,
                                    "per_channel": r["chosen"].per_channel if r["target"] == "onnx" else None,
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
                                        preprocess=src.preprocess,
                                        outputs=None if first["calib_reference"] is None
                                        else [first["calib_reference"], first["reference"]])
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


def _check_options(*, method, target, max_drop, batch, calibrations, activation_types, weight_type, engines,
                   samples, model_type) -> None:
    """:func:`quantize`'s arguments, each refused in one line before any work starts."""
    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if max_drop < 0:
        raise ConversionError(f"max_drop must be >= 0 points, got {max_drop}")
    if batch < 1:
        raise ConversionError(f"batch must be >= 1, got {batch}")
    bad = [c for c in calibrations or () if c not in CALIBRATIONS]
    if bad:
        raise ConversionError(f"unknown calibration {bad[0]!r}; use {', '.join(CALIBRATIONS)}")
    if calibrations is not None and not calibrations:
        raise ConversionError("calibrations: give at least one of " + ", ".join(CALIBRATIONS))
    for what, given, allowed in (("activation type", ACTIVATION_TYPES if activation_types is None
                                  else activation_types, ACTIVATION_TYPES),
                                 ("weight type", [weight_type], WEIGHT_TYPES),
                                 ("engine", engines or (), ENGINES)):
        bad = [x for x in given if x not in allowed]
        if bad or not given and what != "engine":
            raise ConversionError(f"unknown {what} {bad[0] if bad else '(none)'!r}; use {', '.join(allowed)}")
    if engines is not None and "nncf" in engines and not nncf_available():
        raise ConversionError("engine nncf is not installed: pip install 'edgeship[convert]' (or pip install nncf)")
    if samples is not None and samples < MIN_CALIB_SAMPLES:
        raise ConversionError(f"samples must be >= {MIN_CALIB_SAMPLES} calibration samples, got {samples}")
    if model_type not in (None, "transformer", "default"):
        raise ConversionError(f"unknown model type {model_type!r}; use transformer or default")


def quantize(model, calib, eval, *, max_drop: float = 1.0, metric: str | None = None,  # noqa: A002 - issue's name
             method: str = "auto", target: str = "onnx", out=None, allow_fp32: bool = False, batch: int = 32,
             signing_key=None, name: str | None = None, version: str | None = None, quiet: bool = False,
             work_dir=None, threads: int | None = None, repeats: int = 12,
             calibrations: Sequence[str] | None = None, recovery_steps: int = 3,
             preprocess: Mapping | None = None, labels: Sequence[str] | None = None,
             metric_options: Mapping | None = None, engines: Sequence[str] | None = None,
             activation_types: Sequence[str] | None = None, weight_type: str = "int8",
             per_channel: bool | None = None, exclude_nodes: Sequence[str] = (), op_types: Sequence[str] | None = None,
             samples: int | None = None, analyze: bool = False, target_bench=None,
             model_type: str | None = None, both_precisions: bool = True) -> QuantizeResult:
    """Quantize ``model`` to int8, keeping the most accurate of the fastest candidates within ``max_drop`` points.

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

    The ONNX search (issue 18): every engine in ``engines`` gives
    candidates (default: onnxruntime first, then NNCF when installed unless
    an onnxruntime candidate already equals fp32) — onnxruntime QDQ static
    with ``activation_types`` (default u8, s8 only while nothing meets the
    budget) and ``weight_type`` weights per channel and, with ``per_channel``
    None, also per tensor (onnxruntime's own default), NNCF's default preset
    with fast bias correction (``model_type="transformer"`` is detected from
    attention when not given), onnxruntime dynamic — each gated on
    ``metric`` (``metric_options`` e.g. ``{"threshold": 0.0, "channel": 0}``
    for ``iou``). ``calibrations``: default MinMax, escalating to Percentile
    and Entropy only when nothing meets the budget; given explicitly, all are
    tried. ``exclude_nodes``/``op_types``: nodes kept in float / the only op
    types quantized, for every engine. ``samples``: calibration samples
    used (default all). ``analyze``: per-node error table of the chosen
    model in the report (streamed over a few samples). ``target_bench``:
    ``edgeship bench --json`` file(s) of the fp32 and int8 variants measured
    on the target device — that machine then decides fp32 vs int8.
    ``both_precisions``: the package also carries the other precision as a
    variant (fp32 beside int8, or the best int8 beside a kept fp32).

    Raises :class:`DataError` for unusable data, :class:`ConversionError`
    for a model it cannot handle, :class:`AccuracyBudgetError` when no int8
    candidate meets the budget and ``allow_fp32`` is False — in every error
    case no package is written.
    """
    _check_options(method=method, target=target, max_drop=max_drop, batch=batch, calibrations=calibrations,
                   activation_types=activation_types, weight_type=weight_type, engines=engines, samples=samples,
                   model_type=model_type)
    device = load_target_bench(target_bench) if target_bench else None
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
                "TFLite is not converted to ONNX here — pass the torch model (library call) or the .onnx, "
                f"or use --target {src.kind}")
        from .report import machine_info

        machine = machine_info()
        common = dict(max_drop=max_drop, metric=metric, method=method, batch=batch, threads_batch=threads_batch,
                      repeats=repeats, work=work, quiet=quiet, metric_options=metric_options, samples=samples,
                      device=device, machine=f"this machine ({machine.get('cpu') or machine.get('machine')})",
                      packaging=out is not None)
        knobs = _Knobs(exclude_nodes=tuple(exclude_nodes), op_types=tuple(op_types) if op_types else None,
                       per_channel=per_channel, weight_type=weight_type)
        runs = []
        for t in wanted:
            if t == "onnx":
                runs.append(_run_onnx(src, calib, eval, calibrations=calibrations, recovery_steps=recovery_steps,
                                      engines=tuple(engines) if engines else None,
                                      activation_types=None if activation_types is None
                                      else tuple(activation_types),
                                      knobs=knobs, analyze=analyze, model_type=model_type, **common))
            else:
                runs.append(_run_tflite(src, calib, eval, **common))
        rep = _report_dict(runs, src=src, max_drop=max_drop, method=method, machine=machine,
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
            package = _package(out, runs, rep, src, signing_key=signing_key, both_precisions=both_precisions)
        artifacts = {r["target"]: Path(r["chosen"].path) for r in runs} if keep_work else {}
        return QuantizeResult(chosen={r["target"]: r["chosen"].name for r in runs}, artifacts=artifacts,
                              decisions={r["target"]: r["decision"] for r in runs},
                              candidates=[c for r in runs for c in r["candidates"]], report=rep, package=package,
                              report_md=report_md, plots=plots)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
