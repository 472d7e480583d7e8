"""Prepare the digits example from nothing but scikit-learn's bundled data.

Writes, under ``examples/digits/data/`` (or ``--out``):

* ``train.npz``, ``calib.npz``, ``eval.npz`` — model inputs (pixels / 16,
  NCHW float32) under ``input`` and integer ``labels``;
* ``teacher.pt`` (state dict) and ``teacher.onnx`` — the ~0.63M-parameter
  teacher CNN, trained with plain cross-entropy;
* ``keys/dev.key`` / ``keys/dev.pub`` — an Ed25519 key pair to sign the package
  (a development key: use your own for real fleets).

Every output is skipped when it already exists (``--force`` redoes it), so
running the example twice costs nothing the second time. The work is
:func:`edgeship.demo_data.prepare.prepare`, which ``edgeship demo`` uses too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgeship.demo_data.prepare import TEACHER_EPOCHS, prepare

__all__ = ["prepare", "main"]

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ap.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS)
    ap.add_argument("--force", action="store_true", help="redo every output")
    args = ap.parse_args(argv)
    prepare(args.out, teacher_epochs=args.teacher_epochs, force=args.force)


if __name__ == "__main__":
    main()
