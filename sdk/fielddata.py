"""The field dataset's files: the contract between ``fleet export-feedback`` and a recipe's ``[field]``.

An export to ``field.npz`` writes ``field.npz`` (every sample), ``field.train.npz``
and ``field.holdout.npz`` (split by device) and ``field.json`` (provenance per
sample of ``field.npz``, in row order: device, model_version, ts, msg_id,
prediction_id, kind, label, split; plus ``holdout_devices`` and ``skipped``).
:mod:`edgeship.fleet.field` writes them, :mod:`edgeship.converters.field`
reads them; this module only names them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError

__all__ = ["sidecar_paths", "load_field_provenance"]


def sidecar_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files an export to ``out`` writes: ``all``, ``train``, ``holdout``, ``provenance``."""
    p = Path(out)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    return {"all": p, "train": p.with_name(stem + ".train.npz"), "holdout": p.with_name(stem + ".holdout.npz"),
            "provenance": p.with_name(stem + ".json")}


def load_field_provenance(out: str | os.PathLike) -> dict:
    """The ``field.json`` written next to an export; DataError when missing or unreadable."""
    p = sidecar_paths(out)["provenance"]
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: the export's provenance file is missing or unreadable ({exc}); "
                        "export again with edgeship fleet export-feedback") from exc
    if not isinstance(d, dict) or not isinstance(d.get("samples"), list):
        raise DataError(f"{p}: not an edgeship field-export provenance file")
    return d
