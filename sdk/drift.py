"""Drift statistics: a reference at conversion, constant-memory windows on the device, scores.

No raw data leaves the device. At conversion :func:`reference_stats` records,
from the calibration/eval data and the float model's outputs, what the
model was built for; the manifest keeps it under ``reference_stats``. On the
device a :class:`WindowStats` folds every batch into fixed-size counters laid
out exactly like the reference (same groups, same bin edges), and
:meth:`WindowStats.report` turns one telemetry window into scores.

What is recorded (all JSON-ready, ``rev`` 1)::

    {"rev": 1, "samples": N,
     "inputs": {"<name>": {"axis": 1 | -1 | null, "groups": [GROUP, ...]}},
     "outputs": {"task": "classifier", "name": "logits", "labels": [...],
                 "probabilities": false, "class_counts": [...],
                 "confidence": {"edges": [...], "hist": [...]}, "mean_confidence": m}
              | {"task": "regressor", "name": "y", "axis": ..., "groups": [GROUP, ...]}}
    GROUP = {"mean", "std", "min", "max", "count", "edges": [...], "hist": [...]}

*Groups* are the channels of an image (NCHW axis 1, NHWC axis -1), the
features of a tabular input ``(N, F)`` or of a sequence ``(N, T, F)``; with
more than :data:`MAX_GROUPS` of them (a flattened image) the whole input is
one group. Bin edges are the reference's quantiles (deduplicated, so a
pixel that is 0 half the time makes one bin), plus two open tails: a value
below the reference minimum or above its maximum lands in a bin the
reference never filled, which is what a failing sensor looks like.

Scores per window:

* **PSI** (population stability index) per group and for the predictions
  (class distribution, confidence histogram; output-value histogram for
  regressors): ``sum((a - e) * ln(a / e))`` over bins, with every proportion
  floored at :data:`PSI_EPSILON` (an empty bin would be infinite otherwise).
  Rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 (:data:`PSI_ALARM`)
  a real shift.
* **Mean-shift z**: ``(window mean - reference mean) / reference std`` —
  the shift in reference standard deviations, independent of window size
  (a standard-error z grows without bound with the sample count, so every
  busy device would alarm). :data:`Z_ALARM` is half a standard deviation.

**The alarm is calibrated for the window's sample count.** PSI has a
small-sample bias: between a window of ``n`` samples and a reference of
``N``, both drawn from one distribution, it is about
``chi2(bins - 1) * (1/n + 1/N)`` — 0.09 on average for ten classes, 120
predictions and a 600-sample reference, and a heavy tail where a bin the
reference rarely fills stays empty (the epsilon floor makes that cost
``e * ln(e / eps)``). A fixed 0.2 then alarms on most clean short windows.
So each statistic's threshold is the larger of the rule of thumb
(:data:`PSI_ALARM`, :data:`Z_ALARM`: the smallest shift worth an alarm)
and its null quantile for this window: :func:`psi_null_quantile` draws
(seeded Monte Carlo, so deterministic) windows of ``n`` and references of
``N`` from the reference's own histogram; the z threshold is the normal
quantile of ``sqrt(1/n + 1/N)``. The window's false-alarm budget
:data:`FALSE_ALARM_RATE` is split evenly (Bonferroni) over every
statistic the window judges, so a window drawn from the reference data
alarms with probability at most that rate whatever its size.
``n`` counts samples (rows), not values: the pixels of one image move
together, and the proportion of a row's values in a bin varies at most as
much as one value's would, so a multinomial of ``n`` rows bounds the
variance of an input histogram from above (conservative). Windows are
bucketed by ``n`` rounded down to a geometric grid (a smaller ``n`` has the
higher threshold), so the thresholds are computed once per bucket.

A window is judged (``alarm`` true/false) only with at least
:data:`MIN_ALARM_SAMPLES` samples; below that it reports its scores with
``alarm: null``.

Pure: numpy only, no I/O, no threads. The device agent, the converters and
the fleet side (report, rollout gate) all use this one module.
"""
from __future__ import annotations

import math
import threading
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import DataError, InputError, PackageFormatError

__all__ = [
    "REF_REV", "PSI_EPSILON", "PSI_WARN", "PSI_ALARM", "Z_ALARM", "MIN_ALARM_SAMPLES", "MAX_GROUPS",
    "INPUT_BINS", "CONFIDENCE_EDGES", "MAX_VALUES_PER_UPDATE",
    "psi", "mean_shift_z", "psi_from_counts", "reference_stats", "check_reference", "WindowStats",
    "confidence_of", "is_alarm", "FALSE_ALARM_RATE", "psi_null_quantile", "psi_threshold", "z_threshold",
    "n_bucket", "Thresholds",
]

#: Format revision of a reference-stats dict and of a window report.
REF_REV = 1
#: Floor for every bin proportion in PSI (epsilon smoothing).
PSI_EPSILON = 1e-4
#: PSI above this is a moderate shift (reported, not alarmed).
PSI_WARN = 0.1
#: PSI above this is a real shift: the smallest PSI that alarms (short windows need more, see the docstring).
PSI_ALARM = 0.2
#: |mean-shift z| above this (in reference standard deviations) is the smallest mean shift that alarms.
Z_ALARM = 0.5
#: A window drawn from the reference distribution alarms with at most this probability (all statistics together).
FALSE_ALARM_RATE = 0.01
#: Monte Carlo draws for one PSI null quantile: at least the first, about 25 draws beyond the quantile, at most
#: the second (bounds the once-per-bucket cost: ~10 ms per 10,000 draws of 12 bins on an idle x86 core).
NULL_DRAWS = (10_000, 200_000)
#: A window with fewer samples reports scores but is not judged (alarm = None). The thresholds adapt to the
#: window's size; below this the multinomial bound on an image's correlated pixels is too loose to be useful.
MIN_ALARM_SAMPLES = 50
#: More channels/features than this and an input is summarised as one group.
MAX_GROUPS = 32
#: Quantile bins per group in the reference (before deduplication; plus two tails).
INPUT_BINS = 10
#: Upper edges of the confidence (top-1 probability) histogram; a last bin takes the rest.
CONFIDENCE_EDGES: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: Values per group and batch a window folds in; more are subsampled with a rotating stride
#: so a 224x224 camera frame costs the same as a small one, and every position is seen over time.
MAX_VALUES_PER_UPDATE = 8192
#: Values per group used to find the reference quantiles (a strided subsample beyond).
_MAX_QUANTILE_VALUES = 1_000_000


# --------------------------------------------------------------------------- scores

def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
        eps: float = PSI_EPSILON) -> float | None:
    """Population stability index between two histograms (counts or proportions) over the same bins.

    Each side is normalised to proportions, floored at ``eps`` and
    renormalised, so an empty bin costs a large but finite amount. None when
    either side is empty.
    """
    e = np.asarray(expected, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if e.shape != a.shape:
        raise ValueError(f"psi: histograms differ in length ({e.size} vs {a.size} bins)")
    se, sa = e.sum(), a.sum()
    if e.size == 0 or se <= 0 or sa <= 0:
        return None
    e = np.maximum(e / se, eps)
    a = np.maximum(a / sa, eps)
    e /= e.sum()
    a /= a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def psi_from_counts(expected: Mapping[str, float], actual: Mapping[str, float],
                    eps: float = PSI_EPSILON) -> float | None:
    """PSI between two ``{label: count}`` maps (e.g. telemetry ``classes`` of canary vs control)."""
    keys = sorted(set(expected) | set(actual))
    return psi([float(expected.get(k, 0)) for k in keys], [float(actual.get(k, 0)) for k in keys], eps)


def mean_shift_z(ref_mean: float, ref_std: float, window_mean: float) -> float:
    """Shift of the window mean in reference standard deviations (std floored so a constant reference stays finite)."""
    floor = 1e-6 + 1e-3 * abs(ref_mean)
    return float((window_mean - ref_mean) / max(ref_std, floor))


def is_alarm(psi_value: float | None = None, z_value: float | None = None, *, psi_alarm: float = PSI_ALARM,
             z_alarm: float = Z_ALARM) -> bool:
    """The alarm rule in one place: PSI above ``psi_alarm`` or |z| above ``z_alarm``.

    The defaults are the fixed rules of thumb (for scores whose window size is
    unknown); a window passes its calibrated thresholds (:class:`Thresholds`).
    """
    return bool((psi_value is not None and psi_value > psi_alarm)
                or (z_value is not None and abs(z_value) > z_alarm))


# --------------------------------------------------------------------------- calibrated thresholds

def _psi_rows(e: np.ndarray, a: np.ndarray, eps: float) -> np.ndarray:
    """:func:`psi` of each row pair of two ``(draws, bins)`` count arrays, vectorised (same smoothing)."""
    e = np.maximum(e / e.sum(axis=1, keepdims=True), eps)
    a = np.maximum(a / a.sum(axis=1, keepdims=True), eps)
    e /= e.sum(axis=1, keepdims=True)
    a /= a.sum(axis=1, keepdims=True)
    return np.sum((a - e) * np.log(a / e), axis=1)


def psi_null_quantile(hist: Sequence[float] | np.ndarray, n: int, ref_n: int | None, q: float, *,
                      draws: int | None = None, seed: int = 0, eps: float = PSI_EPSILON) -> float:
    """The ``q``-quantile of PSI when nothing drifted: a window of ``n`` samples against a reference of ``ref_n``,
    both multinomial draws from ``hist``'s proportions (``ref_n`` None: an exact reference). Pure and seeded.

    This is the PSI a clean window exceeds with probability ``1 - q``:
    the small-sample bias and the heavy tail of rarely filled bins included.
    """
    p = np.asarray(hist, dtype=np.float64).ravel()
    if p.size == 0 or p.sum() <= 0 or n < 1:
        raise ValueError(f"psi_null_quantile: needs a non-empty histogram and n >= 1 (n={n})")
    if not 0.0 < q < 1.0:
        raise ValueError(f"psi_null_quantile: q must be in (0, 1), got {q}")
    p = p / p.sum()
    lo, hi = NULL_DRAWS
    total = draws or int(min(hi, max(lo, math.ceil(25.0 / (1.0 - q)))))
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, total, lo):  # in chunks: bounded memory on a small device
        k = min(lo, total - start)
        w = rng.multinomial(int(n), p, size=k).astype(np.float64)
        r = (rng.multinomial(int(ref_n), p, size=k).astype(np.float64) if ref_n else np.tile(p, (k, 1)))
        out.append(_psi_rows(r, w, eps))
    return float(np.quantile(np.concatenate(out), q))


def psi_threshold(hist: Sequence[float] | np.ndarray, n: int, ref_n: int | None, alpha: float, *,
                  seed: int = 0) -> float:
    """The PSI a window of ``n`` must exceed to alarm at false-alarm rate ``alpha``: at least :data:`PSI_ALARM`."""
    return max(PSI_ALARM, psi_null_quantile(hist, n, ref_n, 1.0 - alpha, seed=seed))


def z_threshold(n: int, ref_n: int | None, alpha: float) -> float:
    """The |mean-shift z| a window of ``n`` must exceed to alarm at rate ``alpha``: at least :data:`Z_ALARM`.

    The window mean of ``n`` rows moves by at most ``std / sqrt(n)`` (rows
    average correlated values), the reference's by ``std / sqrt(ref_n)``.
    """
    se = math.sqrt(1.0 / max(1, n) + (1.0 / ref_n if ref_n else 0.0))
    return max(Z_ALARM, NormalDist().inv_cdf(1.0 - alpha / 2.0) * se)


def n_bucket(n: int) -> int:
    """``n`` rounded down to a geometric grid (8 steps per doubling): windows of about one size share thresholds."""
    if n < 16:
        return max(1, int(n))
    return int(2.0 ** (math.floor(8.0 * math.log2(n) + 1e-9) / 8.0))


class Thresholds:
    """Calibrated alarm thresholds of one reference, cached per window-size bucket (bounded; thread-safe).

    ``alpha`` is the false-alarm budget of one statistic (the window's
    :data:`FALSE_ALARM_RATE` over the statistics it judges).
    """

    MAX_ENTRIES = 512

    def __init__(self, reference: Mapping) -> None:
        self.ref_n = int(reference.get("samples") or 0) or None
        self._lock = threading.Lock()
        self._cache: dict[tuple, float] = {}

    def psi(self, key: str, hist: Sequence[float], n: int, alpha: float) -> float:
        b = n_bucket(n)
        with self._lock:
            hit = self._cache.get((key, b, alpha))
        if hit is not None:
            return hit
        t = round(psi_threshold(hist, b, self.ref_n, alpha, seed=b), 5)
        with self._lock:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()  # a bound, not an LRU: a device's window sizes repeat, so this is rare
            self._cache[(key, b, alpha)] = t
        return t

    def z(self, n: int, alpha: float) -> float:
        return round(z_threshold(n_bucket(n), self.ref_n, alpha), 5)


def _softmax_max(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    return (e.max(axis=1) / e.sum(axis=1)).astype(np.float64)


def confidence_of(outputs: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, top-1 confidence) per row of a classifier's ``(N, C)`` output."""
    x = np.asarray(outputs, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    cls = x.argmax(axis=1)
    conf = x.max(axis=1) if probabilities else _softmax_max(x)
    return cls, np.clip(conf, 0.0, 1.0)


# --------------------------------------------------------------------------- layout helpers

def _as_named(arrays: Any, names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    if isinstance(arrays, Mapping):
        missing = [n for n in names if n not in arrays]
        if missing:
            raise InputError(f"{what}: no array for {missing[0]!r} (got {sorted(arrays)}); pass one per name",
                             input_name=missing[0])
        return {n: np.asarray(arrays[n]) for n in names}
    if isinstance(arrays, (list, tuple)):
        if len(arrays) != len(names):
            raise InputError(f"{what}: got {len(arrays)} arrays for {len(names)} names {list(names)}")
        return {n: np.asarray(a) for n, a in zip(names, arrays)}
    if len(names) != 1:
        raise InputError(f"{what}: one array given but the reference has {len(names)}: {list(names)}; pass a dict")
    return {names[0]: np.asarray(arrays)}


def _default_axis(shape: tuple[int, ...], layout: str | None) -> int | None:
    """Which axis holds channels/features for a batch of this shape; None = one group."""
    nd = len(shape)
    if nd <= 1:
        return None
    if nd == 2:
        axis = 1
    elif nd == 4:
        if layout:
            axis = 1 if layout.upper() == "NCHW" else -1
        else:  # guess: a small last axis with a larger second axis is channels-last
            axis = -1 if (shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4)) else 1
    else:  # (N, T, F) sequences and anything else: the last axis
        axis = -1
    return axis if shape[axis] <= MAX_GROUPS else None


def _grouped(x: np.ndarray, axis: int | None, max_values: int | None = None, phase: int = 0) -> np.ndarray:
    """``(groups, values)`` view/copy of a batch; at most ``max_values`` values per group (rotating stride)."""
    if x.ndim == 0:
        x = x.reshape(1)
    b = x.shape[0]
    if axis is None:
        xm = x.reshape(b, 1, -1)
    else:
        xm = np.moveaxis(x, axis, 1).reshape(b, x.shape[axis], -1)  # a view when the layout allows
    rest = xm.shape[2]
    if max_values is not None and b * rest > max_values:
        step = -(-b * rest // max_values)
        if step <= rest:
            xm = xm[:, :, phase % step::step]
        else:  # few values per row (a tabular batch): keep whole rows, stride over rows
            rstep = -(-b // max(1, max_values // rest))
            xm = xm[phase % rstep::rstep]
    return np.ascontiguousarray(xm.transpose(1, 0, 2)).reshape(xm.shape[1], -1)


def _group_ref(v: np.ndarray, bins: int) -> dict:
    v = v[np.isfinite(v)].astype(np.float64)
    if v.size == 0:
        raise DataError("reference statistics: a group of the data holds no finite value")
    sample = v if v.size <= _MAX_QUANTILE_VALUES else v[:: -(-v.size // _MAX_QUANTILE_VALUES)]
    edges = np.unique(np.quantile(sample, np.linspace(0.0, 1.0, bins + 1)))
    hist = np.bincount(np.searchsorted(edges, v, side="left"), minlength=edges.size + 1)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "count": int(v.size), "edges": [float(e) for e in edges], "hist": [int(c) for c in hist]}


def _groups_ref(x: np.ndarray, axis: int | None, bins: int) -> list[dict]:
    g = _grouped(np.asarray(x), axis)
    return [_group_ref(g[i], bins) for i in range(g.shape[0])]


# --------------------------------------------------------------------------- reference

def reference_stats(inputs: Any, outputs: Any = None, *, input_names: Sequence[str] | None = None,
                    output_name: str | None = None, task: str = "auto", labels: Sequence[str] | None = None,
                    layout: str | None = None, bins: int = INPUT_BINS,
                    confidence_edges: Sequence[float] = CONFIDENCE_EDGES) -> dict:
    """Reference statistics (JSON-ready) of model inputs and, when given, the float model's outputs.

    ``inputs``: one array ``(N, ...)`` or ``{name: array}`` (what the model
    is fed, i.e. after preprocessing). ``outputs``: the reference model's
    outputs for those inputs (one array or ``{name: array}``; with several,
    ``output_name`` picks one, default the first). ``task``: ``"classifier"``
    (class distribution + confidence histogram), ``"regressor"``
    (output-value histogram) or ``"auto"`` (a 2-D output with >= 2 columns
    is a classifier). ``layout`` (``"NCHW"``/``"NHWC"``) says where the
    channels of 4-D inputs are; guessed when absent.
    """
    if bins < 1:
        raise DataError(f"reference statistics: bins must be >= 1 (got {bins})")
    if isinstance(inputs, Mapping):
        names = list(input_names or inputs.keys())
    else:
        names = list(input_names or (["input"] if not isinstance(inputs, (list, tuple)) else
                                      [f"input{i}" for i in range(len(inputs))]))
    xs = _as_named(inputs, names, "reference statistics inputs")
    n = None
    ref_inputs: dict[str, Any] = {}
    for name, x in xs.items():
        if x.ndim == 0 or x.shape[0] == 0:
            raise DataError(f"reference statistics: input {name!r} holds no samples (shape {x.shape})")
        if n is not None and x.shape[0] != n:
            raise DataError(f"reference statistics: inputs differ in sample count ({n} vs {x.shape[0]} for {name!r})")
        n = x.shape[0]
        axis = _default_axis(x.shape, layout)
        ref_inputs[name] = {"axis": axis, "shape": [int(s) for s in x.shape[1:]],
                            "groups": _groups_ref(x.astype(np.float64, copy=False), axis, bins)}
    ref: dict[str, Any] = {"rev": REF_REV, "samples": int(n or 0), "inputs": ref_inputs, "outputs": None}
    if outputs is None:
        return ref
    if isinstance(outputs, Mapping):
        oname = output_name or next(iter(outputs))
        if oname not in outputs:
            raise DataError(f"reference statistics: no output named {oname!r} (have {sorted(outputs)})")
        y = np.asarray(outputs[oname])
    elif isinstance(outputs, (list, tuple)):
        oname, y = output_name or "output0", np.asarray(outputs[0])
    else:
        oname, y = output_name or "output", np.asarray(outputs)
    if y.ndim == 0 or y.shape[0] != n:
        raise DataError(f"reference statistics: outputs have {y.shape[0] if y.ndim else 0} rows for {n} input samples")
    if task == "auto":
        task = "classifier" if (y.ndim == 2 and y.shape[1] >= 2) else "regressor"
    if task == "classifier":
        y2 = y.reshape(y.shape[0], -1).astype(np.float64)
        c = y2.shape[1]
        if c < 2:
            raise DataError(f"reference statistics: a classifier needs >= 2 output columns (got {c})")
        probs = bool(np.all(y2 >= 0) and np.allclose(y2.sum(axis=1), 1.0, atol=1e-3))
        cls, conf = confidence_of(y2, probs)
        cedges = [float(e) for e in confidence_edges]
        if labels is not None and len(labels) != c:
            raise DataError(f"reference statistics: {len(labels)} labels for {c} output classes")
        ref["outputs"] = {
            "task": "classifier", "name": oname, "labels": [str(s) for s in labels] if labels is not None else None,
            "probabilities": probs, "class_counts": [int(v) for v in np.bincount(cls, minlength=c)],
            "confidence": {"edges": cedges,
                           "hist": [int(v) for v in np.bincount(np.searchsorted(cedges, conf, side="left"),
                                                                minlength=len(cedges) + 1)]},
            "mean_confidence": float(conf.mean()), "std_confidence": float(conf.std()),
        }
    elif task == "regressor":
        axis = _default_axis(y.shape, None)
        ref["outputs"] = {"task": "regressor", "name": oname, "axis": axis,
                          "groups": _groups_ref(y.astype(np.float64, copy=False), axis, bins)}
    else:
        raise DataError(f"reference statistics: task must be 'auto', 'classifier' or 'regressor' (got {task!r})")
    return ref


def _check_group(g: Any, where: str) -> None:
    if not isinstance(g, Mapping):
        raise PackageFormatError(f"reference_stats {where}: must be an object")
    for k in ("mean", "std", "edges", "hist"):
        if k not in g:
            raise PackageFormatError(f"reference_stats {where}: missing {k!r}; rebuild the package")
    if len(g["hist"]) != len(g["edges"]) + 1:
        raise PackageFormatError(f"reference_stats {where}: hist must have len(edges) + 1 counts")
    e = list(g["edges"])
    if any(not (e[i] < e[i + 1]) for i in range(len(e) - 1)):
        raise PackageFormatError(f"reference_stats {where}: edges must be strictly ascending")


def check_reference(ref: Any) -> Mapping:
    """Validate a manifest's ``reference_stats``; raises PackageFormatError naming the bad field."""
    if not isinstance(ref, Mapping):
        raise PackageFormatError("reference_stats: must be an object; rebuild the package")
    if ref.get("rev") != REF_REV:
        raise PackageFormatError(f"reference_stats rev {ref.get('rev')!r} is not supported (this edgeship reads "
                                 f"rev {REF_REV}); upgrade edgeship or rebuild the package")
    inputs = ref.get("inputs")
    if not isinstance(inputs, Mapping) or not inputs:
        raise PackageFormatError("reference_stats inputs: must name at least one input")
    for name, spec in inputs.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("groups"), list) or not spec["groups"]:
            raise PackageFormatError(f"reference_stats inputs.{name}: needs a non-empty 'groups' list")
        for i, g in enumerate(spec["groups"]):
            _check_group(g, f"inputs.{name}.groups[{i}]")
    out = ref.get("outputs")
    if out is not None:
        if not isinstance(out, Mapping) or out.get("task") not in ("classifier", "regressor"):
            raise PackageFormatError("reference_stats outputs.task: must be 'classifier' or 'regressor'")
        if out["task"] == "classifier":
            if len(out.get("class_counts") or []) < 2:
                raise PackageFormatError("reference_stats outputs.class_counts: needs >= 2 classes")
            conf = out.get("confidence") or {}
            if len(conf.get("hist", [])) != len(conf.get("edges", [])) + 1:
                raise PackageFormatError("reference_stats outputs.confidence: hist must have len(edges) + 1 counts")
        else:
            for i, g in enumerate(out.get("groups") or []):
                _check_group(g, f"outputs.groups[{i}]")
    return ref


# --------------------------------------------------------------------------- window

class _GroupAcc:
    """Fixed-size accumulators of one input/output: counts per bin and moments per group."""

    __slots__ = ("axis", "edges", "counts", "n", "sum", "sumsq", "ref")

    def __init__(self, axis: int | None, groups: Sequence[Mapping]) -> None:
        self.axis = axis
        self.ref = groups
        self.edges = [np.asarray(g["edges"], dtype=np.float64) for g in groups]
        self.counts = [np.zeros(len(g["edges"]) + 1, dtype=np.int64) for g in groups]
        g = len(groups)
        self.n = np.zeros(g, dtype=np.int64)
        self.sum = np.zeros(g, dtype=np.float64)
        self.sumsq = np.zeros(g, dtype=np.float64)

    def reset(self) -> None:
        for c in self.counts:
            c[:] = 0
        self.n[:] = 0
        self.sum[:] = 0.0
        self.sumsq[:] = 0.0

    def update(self, x: np.ndarray, phase: int, max_values: int, what: str) -> int:
        """Fold a batch in; returns the number of non-finite values skipped."""
        groups = len(self.counts)
        if self.axis is not None:
            if x.ndim < 2 or x.shape[self.axis] != groups:
                raise InputError(f"drift: {what} has shape {x.shape}; the reference expects {groups} "
                                 f"channels/features on axis {self.axis}")
        g = _grouped(x, self.axis, max_values, phase)
        bad = 0
        for i in range(groups):
            v = g[i]
            finite = np.isfinite(v)
            if not finite.all():
                bad += int(v.size - finite.sum())
                v = v[finite]
            if v.size == 0:
                continue
            v = v.astype(np.float64, copy=False)
            self.counts[i] += np.bincount(np.searchsorted(self.edges[i], v, side="left"), minlength=self.counts[i].size)
            self.n[i] += v.size
            self.sum[i] += float(v.sum())
            self.sumsq[i] += float(np.dot(v, v))
        return bad

    def merge(self, other: "_GroupAcc") -> None:
        for a, b in zip(self.counts, other.counts):
            a += b
        self.n += other.n
        self.sum += other.sum
        self.sumsq += other.sumsq

    def scores(self) -> dict:
        psis, zs, means = [], [], []
        for i, g in enumerate(self.ref):
            if self.n[i] == 0:
                psis.append(None), zs.append(None), means.append(None)
                continue
            m = self.sum[i] / self.n[i]
            psis.append(_r(psi(g["hist"], self.counts[i])))
            zs.append(_r(mean_shift_z(float(g["mean"]), float(g["std"]), m)))
            means.append(_r(m))
        vp = [p for p in psis if p is not None]
        vz = [z for z in zs if z is not None]
        return {"psi": max(vp) if vp else None,
                "z": max(vz, key=abs) if vz else None,
                "psi_groups": psis, "z_groups": zs, "mean_groups": means}

    def judge(self, scores: dict, th: "Thresholds", key: str, n: int, alpha: float) -> bool:
        """Whether any group crossed its calibrated threshold; adds the thresholds to ``scores``."""
        pt = [th.psi(f"{key}:{i}", g["hist"], n, alpha) for i, g in enumerate(self.ref)]
        zt = th.z(n, alpha)
        scores["thresholds"] = {"psi": pt, "z": zt}
        return any(is_alarm(p, z, psi_alarm=t, z_alarm=zt)
                   for p, z, t in zip(scores["psi_groups"], scores["z_groups"], pt))

    @property
    def statistics(self) -> int:
        """How many statistics a judged window tests here (PSI and z per group)."""
        return 2 * len(self.ref)


def _r(v: float | None, nd: int = 5) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), nd)


class WindowStats:
    """Per-window statistics laid out like a reference; constant memory whatever the traffic.

    ``update(batch_inputs, batch_outputs)`` folds one batch in (inputs: one
    array or ``{name: array}``, batch first; outputs likewise, may be None).
    ``report()`` gives the window's scores (JSON-ready) and ``reset()`` starts
    the next window. Not thread-safe: one owner (the agent's drift component
    serialises access).
    """

    def __init__(self, reference: Mapping, *, max_values_per_update: int = MAX_VALUES_PER_UPDATE,
                 thresholds: Thresholds | None = None, false_alarm_rate: float = FALSE_ALARM_RATE) -> None:
        self.reference = check_reference(reference)
        if not 0.0 < false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self.thresholds = thresholds or Thresholds(reference)
        self.false_alarm_rate = float(false_alarm_rate)
        self.max_values = int(max_values_per_update)
        self.input_names = list(reference["inputs"].keys())
        self._inputs = {name: _GroupAcc(spec.get("axis"), spec["groups"])
                        for name, spec in reference["inputs"].items()}
        out = reference.get("outputs")
        self._out = out
        self._out_acc: _GroupAcc | None = None
        self._class_counts: np.ndarray | None = None
        self._conf_counts: np.ndarray | None = None
        self._conf_edges: np.ndarray | None = None
        if out is not None and out["task"] == "classifier":
            self._class_counts = np.zeros(len(out["class_counts"]), dtype=np.int64)
            self._conf_edges = np.asarray(out["confidence"]["edges"], dtype=np.float64)
            self._conf_counts = np.zeros(self._conf_edges.size + 1, dtype=np.int64)
            self._conf_sum = 0.0
        elif out is not None:
            self._out_acc = _GroupAcc(out.get("axis"), out["groups"])
        self.samples = 0
        self.predictions = 0
        self.nonfinite = 0
        self._phase = 0

    def empty_like(self) -> "WindowStats":
        """A new empty window over the same reference, sharing the cached thresholds."""
        return WindowStats(self.reference, max_values_per_update=self.max_values, thresholds=self.thresholds,
                           false_alarm_rate=self.false_alarm_rate)

    # -- recording -----------------------------------------------------------
    def update(self, batch_inputs: Any, batch_outputs: Any = None) -> None:
        xs = _as_named(batch_inputs, self.input_names, "drift inputs")
        n = None
        for name, x in xs.items():
            if x.ndim == 0:
                raise InputError(f"drift: input {name!r} has no batch axis (shape {x.shape})", input_name=name)
            n = x.shape[0]
            self.nonfinite += self._inputs[name].update(x, self._phase, self.max_values, f"input {name!r}")
        self._phase += 1
        self.samples += int(n or 0)
        if batch_outputs is None or self._out is None:
            return
        y = self._pick_output(batch_outputs)
        if self._class_counts is not None:
            y2 = np.asarray(y, dtype=np.float64).reshape(y.shape[0], -1)
            if y2.shape[1] != self._class_counts.size:
                raise InputError(f"drift: output has {y2.shape[1]} classes; the reference has {self._class_counts.size}")
            keep = np.isfinite(y2).all(axis=1)
            if not keep.all():
                self.nonfinite += int((~keep).sum())
                y2 = y2[keep]
            if y2.shape[0] == 0:
                return
            cls, conf = confidence_of(y2, bool(self._out.get("probabilities")))
            self._class_counts += np.bincount(cls, minlength=self._class_counts.size)
            self._conf_counts += np.bincount(np.searchsorted(self._conf_edges, conf, side="left"),
                                             minlength=self._conf_counts.size)
            self._conf_sum += float(conf.sum())
            self.predictions += int(y2.shape[0])
        else:
            self.nonfinite += self._out_acc.update(np.asarray(y), self._phase, self.max_values, "output")
            self.predictions += int(np.asarray(y).shape[0])

    def _pick_output(self, outputs: Any) -> np.ndarray:
        name = self._out.get("name")
        if isinstance(outputs, Mapping):
            if name in outputs:
                return np.asarray(outputs[name])
            return np.asarray(next(iter(outputs.values())))
        if isinstance(outputs, (list, tuple)):
            return np.asarray(outputs[0])
        return np.asarray(outputs)

    def merge(self, other: "WindowStats") -> "WindowStats":
        """Add another window over the same reference (e.g. several windows into one)."""
        if other.reference is not self.reference and other.reference != self.reference:
            raise ValueError("cannot merge windows over different references")
        for k, acc in self._inputs.items():
            acc.merge(other._inputs[k])
        if self._class_counts is not None:
            self._class_counts += other._class_counts
            self._conf_counts += other._conf_counts
            self._conf_sum += other._conf_sum
        elif self._out_acc is not None:
            self._out_acc.merge(other._out_acc)
        self.samples += other.samples
        self.predictions += other.predictions
        self.nonfinite += other.nonfinite
        return self

    def reset(self) -> None:
        for acc in self._inputs.values():
            acc.reset()
        if self._class_counts is not None:
            self._class_counts[:] = 0
            self._conf_counts[:] = 0
            self._conf_sum = 0.0
        elif self._out_acc is not None:
            self._out_acc.reset()
        self.samples = self.predictions = self.nonfinite = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (fixed by the reference; the memory test checks it never grows)."""
        total = 0
        accs = list(self._inputs.values()) + ([self._out_acc] if self._out_acc is not None else [])
        for acc in accs:
            total += sum(c.nbytes for c in acc.counts) + acc.n.nbytes + acc.sum.nbytes + acc.sumsq.nbytes
        if self._class_counts is not None:
            total += self._class_counts.nbytes + self._conf_counts.nbytes
        return total

    # -- reading -------------------------------------------------------------
    def report(self, *, min_samples: int = MIN_ALARM_SAMPLES) -> dict:
        """The window's drift field for telemetry (JSON-ready).

        ``score`` is the largest PSI of any input group or of the predictions;
        ``alarms`` names what crossed its threshold, calibrated for this
        window's sample count (``thresholds`` in each part, see the module
        docstring); ``alarm`` is None below ``min_samples`` samples (not
        enough to judge). A judged window of data like the reference alarms
        with probability at most ``false_alarm_rate``.
        """
        inputs = {name: acc.scores() for name, acc in self._inputs.items()}
        psis = [s["psi"] for s in inputs.values() if s["psi"] is not None]
        preds: dict[str, Any] | None = None
        if self._class_counts is not None:
            out = self._out
            p_cls = psi(out["class_counts"], self._class_counts) if self.predictions else None
            p_conf = psi(out["confidence"]["hist"], self._conf_counts) if self.predictions else None
            mean_conf = self._conf_sum / self.predictions if self.predictions else None
            z = (mean_shift_z(out["mean_confidence"], out.get("std_confidence", 0.0), mean_conf)
                 if mean_conf is not None else None)
            preds = {"psi": _r(p_cls), "confidence_psi": _r(p_conf), "mean_confidence": _r(mean_conf),
                     "confidence_z": _r(z),
                     "confidence_hist": {"edges": list(out["confidence"]["edges"]),
                                         "counts": [int(c) for c in self._conf_counts]},
                     "class_counts": [int(c) for c in self._class_counts]}
            psis += [p for p in (preds["psi"], preds["confidence_psi"]) if p is not None]
        elif self._out_acc is not None:
            s = self._out_acc.scores()
            preds = {"psi": s["psi"], "z": s["z"], "psi_groups": s["psi_groups"], "z_groups": s["z_groups"]}
            if s["psi"] is not None:
                psis.append(s["psi"])
        judged = self.samples >= min_samples
        alarms = self._judge(inputs, preds) if judged else []
        return {
            "rev": REF_REV,
            "samples": int(self.samples),
            "nonfinite": int(self.nonfinite),
            "score": max(psis) if psis else None,
            "alarm": (bool(alarms) if judged else None),
            "alarms": alarms,
            "false_alarm_rate": self.false_alarm_rate,
            "inputs": inputs,
            "predictions": preds,
        }

    def _judge(self, inputs: dict, preds: dict | None) -> list[str]:
        """What crossed its calibrated threshold; the thresholds go into ``inputs`` and ``preds``."""
        th = self.thresholds
        stats = sum(acc.statistics for acc in self._inputs.values())
        if self._class_counts is not None:
            stats += 2  # class PSI and confidence PSI (the confidence z is reported, not judged)
        elif self._out_acc is not None:
            stats += self._out_acc.statistics
        alpha = self.false_alarm_rate / stats  # Bonferroni: the window's budget over every statistic it tests
        alarms = [f"input:{name}" for name, acc in self._inputs.items()
                  if acc.judge(inputs[name], th, f"input:{name}", self.samples, alpha)]
        n = self.predictions
        if preds is None or n == 0:
            return alarms
        if self._class_counts is not None:
            out = self._out
            t_cls = th.psi("predictions:class", out["class_counts"], n, alpha)
            t_conf = th.psi("predictions:confidence", out["confidence"]["hist"], n, alpha)
            preds["thresholds"] = {"psi": t_cls, "confidence_psi": t_conf}
            if is_alarm(preds["psi"], psi_alarm=t_cls) or is_alarm(preds["confidence_psi"], psi_alarm=t_conf):
                alarms.append("predictions")
        elif self._out_acc.judge(preds, th, "output", n, alpha):
            alarms.append("predictions")
        return alarms
