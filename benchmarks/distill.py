"""What distillation buys on digits, and how long the example takes.

    python benchmarks/distill.py [--seeds 3] [--epochs 40] [--skip-example]

1. Runs the digits example from nothing (a fresh copy of examples/digits in
   benchmarks/out/: data, teacher, the whole recipe) and times it — the
   issue's "one command under 10 minutes on 2 cores".
2. Teacher top-1 on the 400 held-out digits; the recipe's student int8
   (ONNX and TFLite) top-1 next to it — target: within 1.5 points.
3. The same student trained with and without distillation, same epochs,
   same loop (:func:`edgeship.converters.distill` with alpha 0.7 /
   T 4 vs alpha 0 = plain cross-entropy), same best-epoch selection on the
   calibration split, for several seeds: fp32 and int8 (ONNX static) top-1,
   mean ± std.

Prints a table and writes ``benchmarks/out/distill.json``. Timings depend on
the machine's load (recorded in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
EXAMPLE = ROOT / "examples" / "digits"
sys.path.insert(0, str(EXAMPLE))


def run_example(dest: Path) -> dict:
    """Copy the example's sources (no data, no build) to ``dest`` and run its one command, timed."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in ("model.py", "prepare.py", "run.py", "recipe.toml"):
        shutil.copy(EXAMPLE / f, dest / f)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(dest / "run.py"), "--quiet"], capture_output=True, text=True,
                          timeout=1800, cwd=dest)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the example failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    from edgeship.package import verify

    pkg = dest / "build" / "digits-1.0.0.edgepkg"
    verified = verify(pkg, [dest / "data" / "keys" / "dev.pub"])
    steps = {}
    for d in sorted((dest / "build" / ".cache").glob("*/step.json")):
        info = json.loads(d.read_text())
        steps[info["step"]] = info["seconds"]
    table = json.loads(verified.read("report.json"))["table"]
    return {"wall_seconds": round(wall, 1), "step_seconds": steps, "package": str(pkg),
            "variants": [v["id"] for v in verified.variants], "table": table}


def top1(model_or_path, x, y) -> float:
    from edgeship.converters import evaluate as ev
    from edgeship.converters.data import Dataset

    out = ev.predict(model_or_path, Dataset(inputs={"input": x}, labels=y))
    return float(np.mean(out.argmax(1) == y))


def one_seed(data: Path, train: Path, teacher: Path, seed: int, alpha: float, epochs: int, work: Path) -> dict:
    import model as digits
    import torch

    from edgeship.converters import distill, quantize
    from edgeship.converters.onnx_export import export_onnx

    z = np.load(data / "eval.npz")
    x, y = z["input"].astype(np.float32), z["labels"]
    torch.manual_seed(seed)
    student = digits.Student()
    res = distill(str(teacher), student, train, val=data / "calib.npz", alpha=alpha, temperature=4.0,
                  epochs=epochs, lr=3e-3, batch_size=64, seed=seed, early_stopping=None,
                  cache_dir=work / "cache", quiet=True)
    tag = f"{train.stem}-a{alpha}-s{seed}"
    onnx_path = work / f"student-{tag}.onnx"
    export_onnx(student, x[:2], onnx_path)
    q = quantize(onnx_path, data / "calib.npz", data / "eval.npz", max_drop=100.0, method="static",
                 calibrations=("minmax", "percentile"), recovery_steps=0, repeats=5, quiet=True,
                 work_dir=work / f"q-{tag}")
    return {"seed": seed, "alpha": alpha, "fp32_top1": top1(student, x, y),
            "int8_top1": top1(q.artifacts["onnx"], x, y),
            "best_epoch": res.best_epoch, "seconds": res.seconds}


def mean_std(values) -> tuple[float, float]:
    return float(statistics.mean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--low-data", type=int, default=100,
                    help="also compare on the first N training samples only (0 = skip)")
    ap.add_argument("--skip-example", action="store_true", help="reuse benchmarks/out/digits-example if present")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    example_dir = OUT / "digits-example"
    if args.skip_example and (example_dir / "build" / "digits-1.0.0.edgepkg").is_file():
        example = {"wall_seconds": None, "note": "reused an earlier run (--skip-example)"}
        from edgeship.package import verify

        example["table"] = json.loads(verify(example_dir / "build" / "digits-1.0.0.edgepkg",
                                             [example_dir / "data" / "keys" / "dev.pub"]).read("report.json"))["table"]
    else:
        print("running the digits example from nothing ...", file=sys.stderr)
        example = run_example(example_dir)
    rows = {r["id"]: r for r in example["table"]}
    teacher_top1 = rows["teacher"]["value"]

    data = example_dir / "data"
    work = OUT / "distill-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    z = np.load(data / "train.npz")
    regimes = [("all 1,200 training samples", data / "train.npz")]
    if args.low_data:
        low = work / f"train{args.low_data}.npz"
        np.savez(low, input=z["input"][:args.low_data], labels=z["labels"][:args.low_data])
        regimes.append((f"first {args.low_data} training samples", low))
    runs = []
    for regime, train in regimes:
        for alpha in (0.7, 0.0):
            for seed in range(args.seeds):
                print(f"{regime}: alpha {alpha} seed {seed} ...", file=sys.stderr)
                runs.append({"regime": regime, **one_seed(data, train, data / "teacher.onnx", seed, alpha,
                                                          args.epochs, work)})
    summary = {}
    for regime, _ in regimes:
        for alpha, label in ((0.7, "distilled (alpha 0.7, T 4)"), (0.0, "no distillation (cross-entropy only)")):
            rs = [r for r in runs if r["alpha"] == alpha and r["regime"] == regime]
            summary[f"{regime}: {label}"] = {k: mean_std([100 * r[k] for r in rs]) for k in ("fp32_top1", "int8_top1")}

    int8_onnx = 100 * rows["student_int8_onnx"]["value"]
    int8_tfl = 100 * rows["student_int8_tflite"]["value"] if "student_int8_tflite" in rows else None
    t = 100 * teacher_top1
    print()
    print(f"digits, 400 held-out samples; teacher {rows['teacher']['params']:,} params, "
          f"student {rows['student_fp32']['params']:,} params "
          f"({rows['teacher']['params'] / rows['student_fp32']['params']:.1f}x fewer)")
    print(f"{'model':<42} {'top-1 (%)':>16}")
    print(f"{'teacher (fp32)':<42} {t:>16.2f}")
    print(f"{'recipe student fp32':<42} {100 * rows['student_fp32']['value']:>16.2f}")
    print(f"{'recipe student int8 ONNX':<42} {int8_onnx:>16.2f}   (teacher - {t - int8_onnx:.2f} pt; "
          f"target <= 1.5: {'met' if t - int8_onnx <= 1.5 else 'MISSED'})")
    if int8_tfl is not None:
        print(f"{'recipe student int8 TFLite':<42} {int8_tfl:>16.2f}   (teacher - {t - int8_tfl:.2f} pt; "
              f"target <= 1.5: {'met' if t - int8_tfl <= 1.5 else 'MISSED'})")
    print(f"\n{args.seeds} seeds, {args.epochs} epochs each, same loop and best-epoch selection:")
    print(f"{'student':<72} {'fp32 top-1 (%)':>16} {'int8 top-1 (%)':>16}")
    for label, s in summary.items():
        print(f"{label:<72} {s['fp32_top1'][0]:>9.2f} ± {s['fp32_top1'][1]:<4.2f} "
              f"{s['int8_top1'][0]:>9.2f} ± {s['int8_top1'][1]:<4.2f}")
    vals = list(summary.values())
    for i, (regime, _) in enumerate(regimes):
        d, p = vals[2 * i], vals[2 * i + 1]
        print(f"{regime}: distillation buys {d['int8_top1'][0] - p['int8_top1'][0]:+.2f} pt int8 top-1 "
              f"({d['fp32_top1'][0] - p['fp32_top1'][0]:+.2f} pt fp32)")
    if example.get("wall_seconds") is not None:
        print(f"\nexample from nothing (`python examples/digits/run.py`): {example['wall_seconds']:.0f} s wall "
              f"(target < 600 s on 2 cores); steps: {example['step_seconds']}")
    print(f"load average before/after: {load_before} / {os.getloadavg()}")

    from edgeship.converters.report import machine_info

    result = {"teacher_top1": teacher_top1, "recipe": example,
              "target": {"student_int8_within_pt_of_teacher": 1.5,
                         "int8_onnx_gap_pt": t - int8_onnx, "int8_tflite_gap_pt": None if int8_tfl is None
                         else t - int8_tfl},
              "seeds": args.seeds, "epochs": args.epochs, "runs": runs,
              "summary": {k: {m: {"mean": v[0], "std": v[1]} for m, v in s.items()} for k, s in summary.items()},
              "machine": machine_info(), "load_before": load_before}
    (OUT / "distill.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {OUT / 'distill.json'}")


if __name__ == "__main__":
    main()
