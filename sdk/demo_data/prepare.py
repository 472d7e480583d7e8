"""Prepare the digits models from nothing but scikit-learn's bundled data.

Writes, under ``out``:

* ``train.npz``, ``calib.npz``, ``eval.npz`` — model inputs (pixels / 16,
  NCHW float32) under ``input`` and integer ``labels``;
* ``teacher.pt`` (state dict) and ``teacher.onnx`` — the ~0.63M-parameter
  teacher CNN, trained with plain cross-entropy;
* ``keys/dev.key`` / ``keys/dev.pub`` — an Ed25519 key pair to sign the package
  (a development key: use your own for real fleets).

Every output is skipped when it already exists (``force`` redoes it), so
preparing twice costs nothing the second time. ``examples/digits/prepare.py``
is the command-line front.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .model import PREPROCESS, Teacher, count_params, load_digits_split, train_classifier

__all__ = ["prepare", "TEACHER_EPOCHS"]

TEACHER_EPOCHS = 30


def prepare(out: str | Path, *, teacher_epochs: int = TEACHER_EPOCHS, seed: int = 0, force: bool = False,
            quiet: bool = False) -> dict:
    """Write the data sets, the trained teacher (torch + ONNX) and a signing key; returns what was done."""
    import torch

    from .. import signing
    from ..converters.onnx_export import export_onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    split = load_digits_split(seed)
    scale = np.float32(PREPROCESS["scale"])
    for part in ("train", "calib", "eval"):
        path = out / f"{part}.npz"
        if force or not path.is_file():
            np.savez(path, input=split[f"x_{part}"] * scale, labels=split[f"y_{part}"])
            done[part] = len(split[f"y_{part}"])
    pt, onnx_path = out / "teacher.pt", out / "teacher.onnx"
    if force or not pt.is_file():
        t0 = time.monotonic()
        teacher = train_classifier(Teacher(), split["x_train"], split["y_train"], epochs=teacher_epochs, seed=seed)
        torch.save(teacher.state_dict(), pt)
        with torch.no_grad():
            logits = teacher(torch.from_numpy(split["x_eval"] * scale)).numpy()
        acc = float(np.mean(logits.argmax(1) == split["y_eval"]))
        done["teacher"] = {"params": count_params(teacher), "eval_top1": acc,
                           "seconds": round(time.monotonic() - t0, 1)}
        onnx_path.unlink(missing_ok=True)
    if not onnx_path.is_file():
        teacher = Teacher()
        teacher.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
        export_onnx(teacher.eval(), split["x_eval"][:2] * scale, onnx_path)
        done["teacher_onnx"] = str(onnx_path)
    key = out / "keys" / "dev.key"
    if not key.is_file():
        signing.keygen(key, overwrite=True)
        done["key"] = str(key)
    if not quiet:
        print(json.dumps({"prepared": str(out), **done}, indent=1) if done else f"{out}: already prepared")
    return done
