"""Benchmark for issue 10 (drift): do the drift scores separate clean inputs from shifted ones?

    python benchmarks/drift.py [--windows 20] [--window-size 200]

The digits student CNN (trained here) is packaged with reference statistics
computed at conversion (:func:`edgeship.converters.refstats.compute_reference_stats`
on the training + calibration split and the fp32 outputs). A real agent
serves it with the :class:`~edgeship.agent.drift.DriftMonitor` component;
each window of held-out eval images (never in the reference) goes through
``agent.submit`` and one telemetry window is closed per condition window:

* ``clean``      — eval images as they are;
* ``noise``      — Gaussian pixel noise (sigma 0.15 of full scale), clipped;
* ``rotation``   — rotated by 20-30 degrees (a camera knocked sideways);
* ``occlusion``  — a 4x4 patch (a quarter of the image) blanked.

Target: every clean window's score (the largest PSI over input channels and
predictions) below ``PSI_ALARM`` and every shifted window above it. Also
reports the cost of the drift update per batch against the model call.
Prints a table; writes ``benchmarks/out/drift.json`` and ``drift.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeship import drift  # noqa: E402
from examples.digits.model import LABELS, PREPROCESS, Student, load_digits_split, train_classifier  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SCALE = np.float32(PREPROCESS["scale"])


def shift(kind: str, x: np.ndarray, rng: np.random.Generator, hi: float = 16.0) -> np.ndarray:
    """x: (N, 1, 8, 8) raw pixels in 0..hi (the agent applies the package's preprocess)."""
    if kind == "clean":
        return x
    if kind == "noise":
        return np.clip(x + rng.normal(0, 0.15 * hi, x.shape), 0, hi).astype(np.float32)
    if kind == "rotation":
        from scipy.ndimage import rotate

        out = np.empty_like(x)
        for i in range(len(x)):
            ang = rng.uniform(20, 30) * rng.choice([-1, 1])
            out[i, 0] = np.clip(rotate(x[i, 0], ang, reshape=False, order=1, mode="constant"), 0, hi)
        return out
    if kind == "occlusion":
        out = x.copy()
        for i in range(len(x)):
            r, c = rng.integers(0, 5, 2)
            out[i, 0, r:r + 4, c:c + 4] = 0.0
        return out
    raise ValueError(kind)


def build_package(work: Path, split: dict) -> tuple[Path, dict]:
    import torch

    from edgeship import package
    from edgeship.converters.onnx_export import export_onnx
    from edgeship.converters.refstats import compute_reference_stats

    t0 = time.monotonic()
    model = train_classifier(Student(), split["x_train"], split["y_train"], epochs=20, seed=0)
    onnx_path = work / "student.onnx"
    export_onnx(model, split["x_eval"][:2] * SCALE, onnx_path)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(split["x_eval"] * SCALE)).argmax(1).numpy() == split["y_eval"]).mean())
    ref_data = [{"input": split["x_train"] * SCALE}, {"input": split["x_calib"] * SCALE}]
    ref = compute_reference_stats(onnx_path, ref_data, labels=LABELS, preprocess=PREPROCESS)
    pkg = package.build(work / "digits.edgepkg", onnx_path, name="digits", version="1.0.0", labels=LABELS,
                        preprocess=PREPROCESS, reference_stats=ref,
                        example_input=(split["x_eval"][:1] * SCALE).astype(np.float32))
    return pkg, {"eval_top1": acc, "train_s": round(time.monotonic() - t0, 1), "reference_samples": ref["samples"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=20, help="windows per condition")
    ap.add_argument("--window-size", type=int, default=200, help="samples per window")
    args = ap.parse_args(argv)

    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.drift import DriftMonitor

    split = load_digits_split(0)
    x_eval = split["x_eval"].astype(np.float32)  # raw pixels: the agent applies the manifest preprocess
    rng = np.random.default_rng(1)
    conditions = ("clean", "noise", "rotation", "occlusion")
    rows: dict[str, list[dict]] = {c: [] for c in conditions}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pkg, info = build_package(work, split)
        agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(work / "state")},
                                    "runtime": {"threads": 1}, "batcher": {"max_batch": 32}}))
        with agent:
            monitor = agent.add_component(DriftMonitor(agent))
            for _ in range(args.windows):
                for cond in conditions:
                    idx = rng.choice(len(x_eval), args.window_size, replace=False)
                    xs = shift(cond, x_eval[idx], rng)
                    futs = [agent.submit(x) for x in xs]
                    for f in futs:
                        f.result(30)
                    rep = monitor.telemetry_fields()["drift"]
                    p = rep["predictions"]
                    rows[cond].append({"score": rep["score"], "alarm": rep["alarm"],
                                       "input_psi": rep["inputs"]["input"]["psi"], "input_z": rep["inputs"]["input"]["z"],
                                       "pred_psi": p["psi"], "conf_psi": p["confidence_psi"],
                                       "mean_conf": p["mean_confidence"], "samples": rep["samples"]})
        # cost of one drift update next to one model call, batch 32, same process
        ref = json.loads(json.dumps(agent.handle.manifest["reference_stats"]))
        ws = drift.WindowStats(ref)
        batch = (x_eval[:32] * SCALE).astype(np.float32)
        from edgeship.runtime import load

        with load(str(pkg), threads=1) as runner:
            out = runner.run(batch)
            t_upd, t_run = [], []
            for _ in range(200):
                t0 = time.perf_counter()
                ws.update(batch, out)
                t1 = time.perf_counter()
                runner.run_unchecked({"input": batch})
                t2 = time.perf_counter()
                t_upd.append((t1 - t0) * 1e6)
                t_run.append((t2 - t1) * 1e6)
    summary = {}
    for cond, rs in rows.items():
        scores = [r["score"] for r in rs]
        summary[cond] = {
            "windows": len(rs), "score_min": min(scores), "score_median": statistics.median(scores),
            "score_max": max(scores), "alarm_rate": sum(bool(r["alarm"]) for r in rs) / len(rs),
            "input_psi_median": statistics.median(r["input_psi"] for r in rs),
            "input_z_median": statistics.median(r["input_z"] for r in rs),
            "pred_psi_median": statistics.median(r["pred_psi"] for r in rs),
            "conf_psi_median": statistics.median(r["conf_psi"] for r in rs),
            "mean_conf_median": statistics.median(r["mean_conf"] for r in rs)}
    clean_max = summary["clean"]["score_max"]
    shifted_min = min(summary[c]["score_min"] for c in conditions if c != "clean")
    result = {
        "model": info, "window_size": args.window_size, "psi_alarm": drift.PSI_ALARM, "conditions": summary,
        "separated": clean_max < drift.PSI_ALARM < shifted_min,
        "clean_max_score": clean_max, "shifted_min_score": shifted_min,
        "update_us_b32": statistics.median(t_upd), "model_call_us_b32": statistics.median(t_run),
        "windows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "drift.json").write_text(json.dumps(result, indent=1))
    plot(rows, OUT / "drift.png")
    print(f"digits student: eval top-1 {info['eval_top1']:.3f}; reference from {info['reference_samples']} samples; "
          f"{args.windows} windows x {args.window_size} held-out samples per condition")
    print(f"{'condition':<10} {'score min/med/max':>22} {'alarms':>7} {'in PSI':>7} {'in z':>6} {'pred PSI':>8} "
          f"{'conf PSI':>8} {'mean conf':>9}")
    for cond, s in summary.items():
        print(f"{cond:<10} {s['score_min']:>6.3f} {s['score_median']:>6.3f} {s['score_max']:>8.3f} "
              f"{s['alarm_rate']:>6.0%} {s['input_psi_median']:>7.3f} {s['input_z_median']:>6.2f} "
              f"{s['pred_psi_median']:>8.3f} {s['conf_psi_median']:>8.3f} {s['mean_conf_median']:>9.3f}")
    print(f"separated at PSI {drift.PSI_ALARM}: {result['separated']} (clean max {clean_max:.3f}, "
          f"shifted min {shifted_min:.3f})")
    print(f"drift update, batch 32: {result['update_us_b32']:.0f} us vs model call {result['model_call_us_b32']:.0f} us "
          f"(x{result['update_us_b32'] / result['model_call_us_b32']:.2f})")
    return result


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for cond, rs in rows.items():
        ax.plot(range(1, len(rs) + 1), [r["score"] for r in rs], marker="o", markersize=3, label=cond)
    ax.axhline(drift.PSI_ALARM, color="tab:red", linestyle="--", linewidth=1, label=f"alarm (PSI {drift.PSI_ALARM})")
    ax.set_yscale("log")
    ax.set_xlabel("window")
    ax.set_ylabel("drift score (max PSI)")
    ax.set_title("digits: drift score per telemetry window")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
