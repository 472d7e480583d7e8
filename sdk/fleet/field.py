"""The field dataset: labelled feedback inputs from the fleet DB, with provenance and a by-device split.

:func:`export_field_data` is what ``edgeship fleet export-feedback`` calls.
It reads every current feedback message that carries an input and a label
(``label``: the user's correction; ``correct``: the prediction confirmed),
decodes the inputs and writes, next to ``out`` (say ``field.npz``):

* ``field.npz``          every sample: one array per model input + ``labels``
                         (the layout every convert command reads);
* ``field.train.npz``    the samples of the training devices;
* ``field.holdout.npz``  the samples of the held-out devices;
* ``field.json``         provenance per sample (row order of ``field.npz``):
                         device, model version, time, msg_id, prediction_id,
                         kind, predicted label, split; plus what was skipped.

The held-out split is **by device** (:func:`split_devices`): a device's
samples are all in one split, so a retrained model is judged on devices it
never learnt from. Bad samples never stop an export: an input that does not
decode, holds NaN/inf, or has a shape/dtype other than the one most samples
(or the given ``expect``) have is skipped and counted by reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError
from ..fielddata import sidecar_paths

__all__ = ["FieldExport", "export_field_data", "split_devices", "SKIP_REASONS"]

#: Why a feedback row with an input did not become a sample (counted per reason in the export).
SKIP_REASONS = ("no_label", "unknown_label", "corrupt", "wrong_shape")


@dataclasses.dataclass(frozen=True)
class FieldExport:
    """What one export wrote: the files, sample counts per split, the held-out devices, skips per reason."""

    path: Path
    provenance: Path
    train_path: Path
    holdout_path: Path | None
    samples: int
    train: int
    holdout: int
    devices: tuple[str, ...]
    holdout_devices: tuple[str, ...]
    skipped: Mapping[str, int]

    def summary(self) -> str:
        """One line for the CLI."""
        skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in self.skipped.items() if n)
        held = (f"{self.holdout} held out from {len(self.holdout_devices)} device(s) in {self.holdout_path.name}"
                if self.holdout_path is not None else "none held out")
        return (f"wrote {self.samples} labelled samples from {len(self.devices)} device(s) to {self.path} "
                f"({self.train} for training in {self.train_path.name}, {held}; provenance in "
                f"{self.provenance.name}); skipped: {skipped or 'none'}")


def split_devices(devices: Sequence[str], holdout: float, salt: str = "edgeship-field") -> set[str]:
    """The held-out devices: a stable share ``holdout`` of them, at least one, never all of them. Pure.

    Devices are ordered by a hash of (salt, device) and the first
    ``ceil(holdout * n)`` are held out, so the same devices stay held out
    when an export is repeated with more samples.
    """
    devs = sorted(set(devices))
    if holdout <= 0 or len(devs) < 2:
        return set()
    if holdout >= 1:
        raise DataError(f"--holdout must be below 1 (a share of devices), got {holdout:g}")
    order = sorted(devs, key=lambda d: hashlib.sha256(f"{salt}/{d}".encode()).hexdigest())
    k = min(len(devs) - 1, max(1, -int(-holdout * len(devs) // 1)))
    return set(order[:k])


def _decode(data: str) -> dict:
    """A feedback input's JSON (``{name: array field}``) as arrays; ValueError when it is corrupt."""
    import numpy as np

    from ..protocol import MessageError, parse_array_field

    try:
        fields = json.loads(data)
        if not isinstance(fields, dict) or not fields:
            raise ValueError("no input arrays")
        out = {}
        for name, f in fields.items():
            dtype, shape, raw = parse_array_field(f, what=f"input {name!r}")
            a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"input {name!r} holds NaN or inf")
            out[str(name)] = a.astype(a.dtype.newbyteorder("="))
        return out
    except (ValueError, TypeError, MessageError) as exc:
        raise ValueError(str(exc)) from exc


def _signature(arrays: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, a.dtype.str, tuple(a.shape)) for k, a in arrays.items()))


def _label_index(lab: Any, index: Mapping[str, int] | None) -> int | None:
    if index is not None:
        return index.get(str(lab))
    try:
        return int(str(lab))
    except ValueError:
        return None


def export_field_data(db: Any, out: str | os.PathLike, *, model_version: str | None = None, since: float = 0.0,
                      labels: Sequence[str] | None = None, holdout: float = 0.2,
                      expect: Mapping[str, Sequence[int]] | None = None) -> FieldExport:
    """Write the field dataset (see the module docstring); returns a :class:`FieldExport`.

    ``labels`` (class names in index order) maps label names to indices;
    without it labels must be integers (others are skipped as
    ``unknown_label``). ``expect`` maps input names to one sample's shape
    (e.g. from the serving package); without it the most common shape wins.
    Raises :class:`DataError` (one line) when no labelled sample remains.
    """
    import numpy as np

    rows = db.feedback_samples(model_version=model_version, since=since)
    index = {str(name): i for i, name in enumerate(labels)} if labels else None
    skipped = Counter({k: 0 for k in SKIP_REASONS})
    kept: list[tuple[dict, int, dict]] = []
    for r in rows:
        if r["kind"] not in ("label", "correct"):
            continue  # "incorrect" alone says what the answer is not: no label to learn from
        if r["label"] is None:
            skipped["no_label"] += 1
            continue
        y = _label_index(r["label"], index)
        if y is None or y < 0:
            skipped["unknown_label"] += 1
            continue
        try:
            arrays = _decode(r["data"])
        except ValueError:
            skipped["corrupt"] += 1
            continue
        kept.append((arrays, y, r))
    if expect is not None:
        want = {str(k): tuple(int(d) for d in v) for k, v in expect.items()}

        def fits(a: Mapping) -> bool:
            return set(a) == set(want) and all(tuple(a[k].shape) == want[k] for k in want)
    else:
        common = Counter(_signature(a) for a, _, _ in kept).most_common(1)
        sig = common[0][0] if common else None

        def fits(a: Mapping) -> bool:
            return _signature(a) == sig
    good = []
    for arrays, y, r in kept:
        if fits(arrays):
            good.append((arrays, y, r))
        else:
            skipped["wrong_shape"] += 1
    if not good:
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in skipped.items() if n)
        hint = ("; labels are names, not class indices: pass the model's labels (--labels labels.txt)"
                if skipped["unknown_label"] and index is None else "")
        raise DataError("no labelled feedback with attached inputs to export"
                        + (f" ({why})" if why else "") + hint + "; inputs are attached when agents run with "
                        "[feedback] keep_inputs = true and users send --label or --correct")
    devices = sorted({r["device"] for _, _, r in good})
    held = split_devices(devices, holdout)
    names = sorted(good[0][0])
    paths = sidecar_paths(out)
    paths["all"].parent.mkdir(parents=True, exist_ok=True)

    def write(path: Path, items: list) -> None:
        arrays = {k: np.stack([a[k] for a, _, _ in items]) for k in names}
        arrays["labels"] = np.asarray([y for _, y, _ in items], dtype=np.int64)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # never a half-written dataset under the real name

    train = [g for g in good if g[2]["device"] not in held]
    hold = [g for g in good if g[2]["device"] in held]
    write(paths["all"], good)
    write(paths["train"], train)
    if hold:
        write(paths["holdout"], hold)
    else:
        paths["holdout"].unlink(missing_ok=True)  # an earlier export's held-out set would mislead
    prov = {"format": 1, "samples": [
        {"device": r["device"], "model_version": r["model_version"], "ts": r["ts"], "msg_id": r["msg_id"],
         "prediction_id": r["prediction_id"], "kind": r["kind"], "label": int(y),
         "split": "holdout" if r["device"] in held else "train"} for _, y, r in good],
        "holdout_devices": sorted(held), "skipped": dict(skipped), "labels": list(labels) if labels else None,
        "filters": {"model_version": model_version, "since": since, "holdout": holdout}}
    tmp = paths["provenance"].with_name(paths["provenance"].name + ".tmp")
    tmp.write_text(json.dumps(prov, indent=1))
    os.replace(tmp, paths["provenance"])
    return FieldExport(path=paths["all"], provenance=paths["provenance"], train_path=paths["train"],
                       holdout_path=paths["holdout"] if hold else None, samples=len(good), train=len(train),
                       holdout=len(hold), devices=tuple(devices), holdout_devices=tuple(sorted(held)),
                       skipped=dict(skipped))
