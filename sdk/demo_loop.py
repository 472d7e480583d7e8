"""``edgeship demo --loop``: the field loop closed — shift, alarm, export, retrain, staged rollout, recovery.

The pure parts (the shift, the device partition, the phase figures) come
first; :func:`run_loop` drives the public APIs in this order:

1. **models** — the digits teacher and v1 (``1.0.0``) from the demo's
   recipes (cached between runs, like ``edgeship demo``);
2. **fleet + devices** — the fleet stack and N real agents booted with v1,
   ``[feedback] keep_inputs = true`` (the privacy switch: off by default on a
   real device). Each device streams its own slice of the bundled digits;
   a simulated user confirms right answers (``correct``) and corrects wrong
   ones (``label`` with the true digit), so corrections carry their inputs;
3. **before** — a baseline window: negative-feedback rate and drift score;
4. **shift** — a share of the devices now see the digits rotated a quarter
   turn and written with a thicker pen (:func:`shift_digits`); the demo
   waits for the drift alarm in the devices' telemetry and for the
   negative-feedback rate to rise against the baseline;
5. **export** — :func:`edgeship.fleet.field.export_field_data` (what
   ``edgeship fleet export-feedback`` runs): provenance and a by-device
   held-out split;
6. **retrain** — a recipe with a ``[field]`` section
   (:mod:`edgeship.converters.field`): the field samples mixed into the
   original training data; the gate compares the new model with v1 on the
   original test set and on the held-out field set;
7. **rollout** — the retrained version through staged rollout with the
   field gates (negative feedback, drift score vs control) and
   ``on_insufficient = "wait"``: it completes only on evidence;
8. **after** — the same figures on the new version, then the HTML report
   with a per-phase, per-version table.
"""
from __future__ import annotations

import numpy as np

__all__ = ["shift_digits", "partition", "SHIFTS"]

#: The shifts :func:`shift_digits` knows: a quarter turn, a thicker pen, or both.
SHIFTS = ("rotate", "thick", "rotate+thick")


def shift_digits(images: np.ndarray, kind: str = "rotate+thick") -> np.ndarray:
    """Digits as a shifted fleet writes them: raw 0..16 pixels (N, 1, 8, 8) in, same shape out. Pure.

    ``rotate``: a quarter turn counter-clockwise; ``thick``: a 2x2 maximum
    filter (a thicker pen), clipped to the 0..16 range.
    """
    if kind not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, got {kind!r}")
    x = np.asarray(images, dtype=np.float32)
    if "rotate" in kind:
        x = np.rot90(x, 1, axes=(-2, -1))
    if "thick" in kind:
        t = x.copy()
        t[..., 1:, :] = np.maximum(t[..., 1:, :], x[..., :-1, :])
        t[..., :, 1:] = np.maximum(t[..., :, 1:], t[..., :, :-1])
        x = np.clip(t, 0.0, 16.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def partition(n_items: int, n_parts: int, part: int) -> np.ndarray:
    """Indices of part ``part`` of ``n_parts`` disjoint, interleaved slices of ``range(n_items)``. Pure.

    Every device sees its own digits, so the devices held out of the field
    set hold inputs no training device sent.
    """
    if not 0 <= part < n_parts:
        raise ValueError(f"part {part} is not in 0..{n_parts - 1}")
    return np.arange(part, n_items, n_parts)
