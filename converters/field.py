"""Field data in a recipe (#22): mix the fleet's labelled samples into training, gate on them.

A recipe's ``[field]`` section names a field export (``edgeship fleet
export-feedback --out field.npz``: ``field.npz`` + ``field.json`` with the
by-device split) and the package serving in the field now::

    [field]
    data = "field.npz"
    serving = "digits-1.0.0.edgepkg"
    mix = 0.3            # share of field samples in the training set
    dedup = true         # drop repeated inputs, field inputs already in the original training data, and
                         # field inputs of the original test set ([data] eval) or of held-out devices
    max_samples = 0      # use at most this many distinct field training samples (0 = all)
    val_share = 0.2      # of the distinct field training samples, validate instead (distill's epoch choice)
    min_gain = 0.0       # points the new model must beat serving by on the held-out field set
    max_regress = 1.0    # points it may lose against serving on the original test set

The recipe then runs two more steps: ``field_data`` (before ``distill``:
writes the mixed training set, the validation set with its field share,
and the held-out field set) and
``field_gate`` (after ``evaluate``: the new int8 model and the serving one
on the original test set and on the held-out field set). A model that does
not improve on the field, or regresses on the original data beyond the
budget, stops the recipe with :class:`AccuracyBudgetError` — no package —
and the message says which figure failed.

The pieces here are pure (numpy only): :func:`dedup`, :func:`mix`,
:func:`field_verdict`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np

__all__ = ["row_keys", "dedup", "mix", "FieldVerdict", "field_verdict"]


def row_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """One content hash per sample (all inputs of the row, their dtype and shape)."""
    names = sorted(arrays)
    n = len(arrays[names[0]]) if names else 0
    out = []
    for i in range(n):
        h = hashlib.sha1()
        for k in names:
            a = np.ascontiguousarray(arrays[k][i])
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        out.append(h.hexdigest())
    return out


def dedup(field_keys: Sequence[str], *, exclude: set[str] = frozenset()) -> tuple[list[int], int]:
    """Indices of the first occurrence of each field key not in ``exclude``; and how many were dropped. Pure."""
    seen = set(exclude)
    keep = []
    for i, k in enumerate(field_keys):
        if k in seen:
            continue
        seen.add(k)
        keep.append(i)
    return keep, len(field_keys) - len(keep)


def mix(n_original: int, n_field: int, share: float, seed: int = 0) -> np.ndarray:
    """Indices into the field samples so that they make up ``share`` of ``n_original + len(result)``. Pure.

    Few field samples are repeated (each the same number of times, the
    remainder drawn without replacement); many are subsampled. ``share`` 0
    or no field samples gives an empty index.
    """
    if not 0 <= share < 1:
        raise ValueError(f"mix must be in [0, 1), got {share}")
    if n_field <= 0 or share == 0:
        return np.zeros(0, dtype=np.int64)
    want = max(1, round(share / (1 - share) * n_original)) if n_original else n_field
    rng = np.random.default_rng(seed)
    reps, rest = divmod(want, n_field)
    idx = np.concatenate([np.tile(np.arange(n_field), reps), rng.choice(n_field, size=rest, replace=False)])
    return idx.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class FieldVerdict:
    """The field gate: new vs serving on the original test set and the held-out field set (points, 0..100)."""

    ok: bool
    reason: str
    original_new: float
    original_serving: float
    field_new: float
    field_serving: float
    field_samples: int
    original_samples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_verdict(*, original_new: float, original_serving: float, field_new: float, field_serving: float,
                  min_gain: float, max_regress: float, field_samples: int, original_samples: int) -> FieldVerdict:
    """Pass when the new model beats serving on the field by more than ``min_gain`` and loses at most
    ``max_regress`` on the original test set. Pure."""
    gain = field_new - field_serving
    drop = original_serving - original_new
    figures = (f"held-out field set ({field_samples} samples): new {field_new:.2f} vs serving {field_serving:.2f} "
               f"({gain:+.2f} pt); original test set ({original_samples} samples): new {original_new:.2f} vs serving "
               f"{original_serving:.2f} ({-drop:+.2f} pt)")
    if field_samples == 0:
        return FieldVerdict(False, "no held-out field samples to judge the new model on; export with --holdout > 0 "
                                   "from at least two devices", original_new, original_serving, field_new,
                            field_serving, field_samples, original_samples)
    if gain <= min_gain:
        why = (f"the new model does not beat the serving one on the held-out field set by more than {min_gain:g} pt: "
               f"{figures}")
        return FieldVerdict(False, why, original_new, original_serving, field_new, field_serving, field_samples,
                            original_samples)
    if drop > max_regress:
        why = f"the new model regresses on the original test set by more than {max_regress:g} pt: {figures}"
        return FieldVerdict(False, why, original_new, original_serving, field_new, field_serving, field_samples,
                            original_samples)
    return FieldVerdict(True, f"better on the field, within budget on the original data: {figures}", original_new,
                        original_serving, field_new, field_serving, field_samples, original_samples)
