"""Benchmark for issue 10 (pruning): digits student, 50 % of the channels pruned, fine-tuned.

    python benchmarks/prune.py [--epochs 15] [--sweep 0.25,0.5,0.75]

The digits student CNN is trained here (20 epochs on the 1,200 training
images), then :func:`edgeship.converters.prune` removes 50 % of the
channels of every prunable layer by L1 magnitude and fine-tunes with
distillation from the unpruned model. Target: within 1 point of top-1 on the
400 held-out images. Also prints the same without fine-tuning and with plain
cross-entropy fine-tuning, and the accuracy / ONNX size / latency trade-off
over the ratios (``benchmarks/out/prune/prune_tradeoff.png``).
Writes ``benchmarks/out/prune.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.digits.model import PREPROCESS, Student, count_params, load_digits_split, train_classifier  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SCALE = np.float32(PREPROCESS["scale"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--sweep", default="0.25,0.5,0.75")
    args = ap.parse_args(argv)

    from edgeship.converters import prune

    split = load_digits_split(0)
    train = {"input": split["x_train"] * SCALE, "labels": split["y_train"]}
    evald = {"input": split["x_eval"] * SCALE, "labels": split["y_eval"]}
    t0 = time.monotonic()
    student = train_classifier(Student(), split["x_train"], split["y_train"], epochs=20, seed=0)
    train_s = time.monotonic() - t0
    sweep = [float(r) for r in args.sweep.split(",") if r.strip()]
    out = OUT / "prune"
    runs = {}
    for name, kw in (("distilled", dict(teacher=True, finetune_epochs=args.epochs, sweep=sweep, out=out)),
                     ("cross-entropy", dict(teacher=None, finetune_epochs=args.epochs)),
                     ("no fine-tuning", dict(teacher=None, finetune_epochs=0))):
        t = time.monotonic()
        res = prune(student, train, ratio=args.ratio, eval=evald, max_drop=100.0, quiet=True, **kw)
        runs[name] = {**res.to_dict(), "seconds": round(time.monotonic() - t, 1)}
    d = runs["distilled"]
    result = {"student_params": count_params(student), "train_s": round(train_s, 1), "ratio": args.ratio,
              "epochs": args.epochs, "runs": runs, "target_drop": 1.0, "within_target": d["drop"] <= 1.0}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"digits student: {result['student_params']:,} params, top-1 {d['points_before']:.2f} on 400 held-out images")
    print(f"pruned {args.ratio:.0%} of the channels per layer -> {d['params_after']:,} params "
          f"({1 - d['params_after'] / d['params_before']:.0%} fewer), {args.epochs} fine-tune epochs:")
    for name, r in runs.items():
        print(f"  {name:<15} top-1 {r['points_after']:.2f}  drop {r['drop']:+.2f} pt")
    print(f"target: distilled drop <= 1 pt: {result['within_target']}")
    lb, la = d["latency_ms"]["before"], d["latency_ms"]["after"]
    print(f"ONNX size {d['size_before'] / 1024:.1f} -> {d['size_after'] / 1024:.1f} KiB "
          f"(x{d['size_after'] / d['size_before']:.2f}); latency b1 {lb['b1']:.4f} -> {la['b1']:.4f} ms "
          f"(x{la['b1'] / lb['b1']:.2f}), b32 {lb['b32']:.4f} -> {la['b32']:.4f} ms (x{la['b32'] / lb['b32']:.2f}) "
          "(1 thread, medians)")
    print("trade-off (distilled fine-tuning):")
    print(f"  {'ratio':>5} {'params':>7} {'top-1':>6} {'KiB':>6} {'b1 ms':>7} {'b32 ms':>7}")
    for r in d["sweep"]:
        print(f"  {r['ratio']:>5.2f} {r['params']:>7,} {r['points']:>6.2f} {r['size_kib']:>6.1f} "
              f"{r['latency_ms_b1']:>7.4f} {r['latency_ms_b32']:>7.4f}")
    print(f"plot: {d['plot']}")
    return result


if __name__ == "__main__":
    main()
