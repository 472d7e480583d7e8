"""Post-processing hooks a package declares for outputs that are not plain class scores.

The manifest's ``postprocess`` names one built-in hook (a package carries
data, never code: a device runs no Python that came inside a package)::

    {"kind": "topk", "k": 3, "activation": "softmax"}            # labels + probabilities
    {"kind": "topk", "k": 5, "activation": "sigmoid", "threshold": 0.5}   # multi-label
    {"kind": "boxes", "layout": "grid", "stride": 8, "score_threshold": 0.3,
     "iou_threshold": 0.45, "max_detections": 100}               # dense detector head + NMS
    {"kind": "boxes", "layout": "rows", ...}                     # (K, 4 + 1 + classes) rows, boxes x1 y1 x2 y2
    {"kind": "threshold", "threshold": 0.5, "activation": "sigmoid"}      # a map -> 0/1 mask
    {"kind": "ctc", "blank": 0, "activation": "none"}            # (steps, classes) -> text (greedy CTC)

``output`` picks the output tensor (default: the first). :func:`apply`
turns one sample's outputs into what a caller reads: ``label``/``score``/
``top`` where there are labels, ``detections`` (label, score, box in input
pixels) for a detector, ``mask`` and ``positive`` (the fraction above the
threshold) for a map, ``text`` and ``score`` for a CTC sequence recognizer
(best class per step, repeats merged, blanks dropped; the labels are the
characters, ``score`` the mean probability of the kept steps). Pure: numpy only; no torch on the device.

The ``grid`` layout is a CenterNet/YOLO-style head ``(5 + classes, gh, gw)``:
objectness logit, ``tx ty tw th``, class logits per cell; the box centre is
``((gx + sigmoid(tx)) * stride, (gy + sigmoid(ty)) * stride)`` and its size
``exp(tw) * stride`` by ``exp(th) * stride``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import PackageFormatError
from ..tensorspec import TensorSpec

__all__ = ["KINDS", "check_postprocess", "apply", "nms"]

KINDS = ("topk", "boxes", "threshold", "ctc")
_ACTIVATIONS = ("softmax", "sigmoid", "none")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "topk": {"k": 5, "activation": "softmax", "threshold": None},
    "boxes": {"layout": "grid", "stride": 8, "score_threshold": 0.3, "iou_threshold": 0.45, "max_detections": 100},
    "threshold": {"threshold": 0.5, "activation": "sigmoid"},
    "ctc": {"blank": 0, "activation": "softmax"},
}


def _num(spec: Mapping, key: str, where: str, lo: float, hi: float, integer: bool = False) -> None:
    v = spec.get(key)
    if v is None and key == "threshold" and spec.get("kind") == "topk":
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) or \
            not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise PackageFormatError(f"{where}: postprocess {key} must be {kind} in [{lo:g}, {hi:g}], got {v!r}")


def check_postprocess(spec: Any, outputs: Sequence[TensorSpec] = (), where: str = "manifest") -> dict | None:
    """The manifest's ``postprocess`` with defaults filled in; one-line :class:`PackageFormatError` when bad."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
        raise PackageFormatError(f"{where}: postprocess must be an object with kind one of {', '.join(KINDS)}, "
                                 f"got {spec!r}")
    kind = spec["kind"]
    out = {"kind": kind, **_DEFAULTS[kind], **dict(spec)}
    unknown = sorted(set(out) - {"kind", "output", *_DEFAULTS[kind]})
    if unknown:
        raise PackageFormatError(f"{where}: postprocess {kind} has unknown key {unknown[0]!r}; known: "
                                 f"output, {', '.join(_DEFAULTS[kind])}")
    names = [s.name for s in outputs]
    if "output" in out and names and out["output"] not in names:
        raise PackageFormatError(f"{where}: postprocess output {out['output']!r} is not a model output "
                                 f"({', '.join(names)})")
    if out.get("activation", "none") not in _ACTIVATIONS:
        raise PackageFormatError(f"{where}: postprocess activation must be one of {', '.join(_ACTIVATIONS)}")
    if kind == "topk":
        _num(out, "k", where, 1, 1000, integer=True)
        _num(out, "threshold", where, 0.0, 1.0)
    elif kind == "boxes":
        if out["layout"] not in ("grid", "rows"):
            raise PackageFormatError(f"{where}: postprocess boxes layout must be grid or rows, got {out['layout']!r}")
        _num(out, "stride", where, 1, 4096, integer=True)
        _num(out, "score_threshold", where, 0.0, 1.0)
        _num(out, "iou_threshold", where, 0.0, 1.0)
        _num(out, "max_detections", where, 1, 100000, integer=True)
    elif kind == "ctc":
        _num(out, "blank", where, 0, 1 << 20, integer=True)
    else:
        _num(out, "threshold", where, -1e9, 1e9)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _act(x: np.ndarray, how: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return _softmax(x) if how == "softmax" else _sigmoid(x) if how == "sigmoid" else x


def _label(labels: Sequence[str] | None, i: int) -> str:
    return labels[i] if labels and i < len(labels) else str(i)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> list[int]:
    """Greedy non-maximum suppression on ``(n, 4)`` x1 y1 x2 y2 boxes; indices kept, best first."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return keep


def _grid_rows(out: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``(5 + classes, gh, gw)`` head -> boxes (n, 4), objectness (n,), class probabilities (n, classes)."""
    if out.ndim != 3 or out.shape[0] < 6:
        raise ValueError(f"a grid head must be (5 + classes, gh, gw), got {out.shape}")
    c, gh, gw = out.shape
    flat = out.reshape(c, gh * gw).astype(np.float64)
    gy, gx = np.divmod(np.arange(gh * gw), gw)
    cx = (gx + _sigmoid(flat[1])) * stride
    cy = (gy + _sigmoid(flat[2])) * stride
    w = np.exp(np.clip(flat[3], -10, 10)) * stride
    h = np.exp(np.clip(flat[4], -10, 10)) * stride
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, _sigmoid(flat[0]), _softmax(flat[5:].T)


def _boxes(spec: Mapping, out: np.ndarray, labels) -> dict:
    if spec["layout"] == "grid":
        boxes, obj, cls = _grid_rows(out, spec["stride"])
    else:
        if out.ndim != 2 or out.shape[1] < 6:
            raise ValueError(f"rows must be (K, 4 + 1 + classes), got {out.shape}")
        rows = out.astype(np.float64)
        boxes, obj, cls = rows[:, :4], rows[:, 4], rows[:, 5:]
    k = cls.argmax(axis=1)
    score = obj * cls[np.arange(len(k)), k]
    sel = np.flatnonzero(score >= spec["score_threshold"])
    dets = []
    # Per-class NMS: a dog's box does not suppress the cat it overlaps.
    for c in np.unique(k[sel]):
        idx = sel[k[sel] == c]
        for j in nms(boxes[idx], score[idx], spec["iou_threshold"], spec["max_detections"]):
            i = int(idx[j])
            dets.append({"label": _label(labels, int(c)), "class": int(c), "score": float(score[i]),
                         "box": [round(float(v), 2) for v in boxes[i]]})
    dets.sort(key=lambda d: -d["score"])
    return {"detections": dets[: spec["max_detections"]]}


def _ctc(spec: Mapping, out: np.ndarray, labels) -> dict:
    if out.ndim != 2:
        raise ValueError(f"a CTC output must be (steps, classes) per sample, got {out.shape}")
    p = _act(out, spec["activation"])
    best = p.argmax(axis=1)
    keep = np.flatnonzero((best != spec["blank"]) & np.r_[True, best[1:] != best[:-1]])
    text = "".join(_label(labels, int(best[i])) for i in keep)
    score = float(p[keep, best[keep]].mean()) if keep.size else 0.0
    return {"text": text, "score": score}


def apply(spec: Mapping, outputs: Mapping[str, np.ndarray], labels: Sequence[str] | None = None) -> dict:
    """One sample's outputs (no batch axis) -> the declared hook's answer (see the module docstring)."""
    name = spec.get("output") or next(iter(outputs))
    out = np.asarray(outputs[name])
    kind = spec["kind"]
    if kind == "topk":
        p = _act(out.reshape(-1), spec["activation"])
        order = np.argsort(-p, kind="stable")[: spec["k"]]
        if spec.get("threshold") is not None:
            order = order[p[order] >= spec["threshold"]]
        top = [(_label(labels, int(i)), float(p[i])) for i in order]
        best = int(np.argmax(p))
        return {"label": _label(labels, best), "score": float(p[best]), "top": top}
    if kind == "boxes":
        return _boxes(spec, out, labels)
    if kind == "ctc":
        return _ctc(spec, out, labels)
    m = _act(out, spec["activation"])
    mask = (m >= spec["threshold"]).astype(np.uint8)
    return {"mask": mask, "positive": float(mask.mean()) if mask.size else 0.0}
