"""Reference statistics at conversion time, for on-device drift monitoring.

:func:`compute_reference_stats` runs the **fp32** model over the
calibration and eval data (what the model was built and judged on) and
records, with :func:`edgeship.drift.reference_stats`, per-input (per-channel
for images) mean, std and fixed-bin histograms, and the output class
distribution plus confidence histogram (an output-value histogram for
regressors). The result goes into the package manifest as
``reference_stats``; the agent compares each telemetry window against it.

The fp32 model is the reference on purpose: the int8 variant's own drift
from fp32 is the quantize gate's business, and every variant of one package
shares one reference.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..drift import reference_stats
from ..errors import DataError
from .data import Dataset, load_data

__all__ = ["compute_reference_stats"]


def _datasets(data, input_names: Sequence[str] | None, preprocess: Mapping | None) -> list[Dataset]:
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    out = [load_data(d, input_names=input_names, preprocess=preprocess) for d in items if d is not None]
    if not out:
        raise DataError("reference statistics need calibration or eval data; none given")
    return out


def compute_reference_stats(model, data, *, labels: Sequence[str] | None = None, preprocess: Mapping | None = None,
                            task: str = "auto", batch: int = 64, max_samples: int = 20000,
                            outputs: Sequence[np.ndarray] | None = None) -> dict:
    """Reference stats of ``data`` (one data set or a list, e.g. ``[calib, eval]``) and ``model``'s outputs.

    ``model``: the fp32 model — an ``.onnx``/``.tflite`` path or a torch
    module. ``preprocess``: the package's (its ``layout`` says where image
    channels are; it also decodes image folders). At most ``max_samples``
    samples are used (evenly spaced), which bounds conversion time, not
    accuracy: the histograms are of quantile bins. ``outputs``: the fp32
    model's (first) outputs for each data set, when the caller already has
    them (quantize does) — the model is then not run again.
    """
    from . import evaluate as ev

    model_obj = ev.open_model(model)
    names = [s.name for s in model_obj.inputs]
    sets = _datasets(data, names, preprocess)
    inputs = {}
    for i, name in enumerate(names):
        parts = []
        for ds in sets:
            arr = ds.inputs.get(name)
            if arr is None and len(ds.inputs) == len(names):
                arr = list(ds.inputs.values())[i]
            if arr is None:
                raise DataError(f"{ds.source}: no array for model input {name!r}")
            parts.append(np.asarray(arr))
        inputs[name] = np.concatenate(parts)
    n = len(next(iter(inputs.values())))
    known = None
    if outputs is not None:
        if len(outputs) != len(sets):
            raise DataError(f"reference statistics: {len(outputs)} output arrays for {len(sets)} data sets")
        known = np.concatenate([np.asarray(o) for o in outputs])
        if len(known) != n:
            raise DataError(f"reference statistics: {len(known)} output rows for {n} input samples")
    if n > max_samples:
        idx = np.linspace(0, n - 1, max_samples).astype(np.int64)
        inputs = {k: v[idx] for k, v in inputs.items()}
        known = None if known is None else known[idx]
    outs = [known] if known is not None else ev.predict(model_obj, Dataset(inputs=inputs), batch=batch, output=None)
    out_names = [getattr(s, "name", f"output{j}") for j, s in enumerate(getattr(model_obj, "outputs", []) or [])]
    if known is not None:   # the first output only, as recorded below
        out_names = out_names[:1]
    if len(out_names) != len(outs):
        out_names = [f"output{j}" for j in range(len(outs))]
    label_names = labels
    if label_names is None:
        label_names = next((list(ds.label_names) for ds in sets if ds.label_names), None)
    y = outs[0]
    if label_names is not None and (y.ndim != 2 or y.shape[1] != len(label_names)):
        label_names = None  # labels that do not match the output are not ours to record
    return reference_stats({k: v.astype(np.float32, copy=False) for k, v in inputs.items()},
                           {out_names[0]: y}, output_name=out_names[0], task=task, labels=label_names,
                           layout=(preprocess or {}).get("layout"))
