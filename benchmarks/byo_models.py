"""#20: the model set through build, verify, load and ONNX -> TFLite, exported both ways.

For each model of ``edgeship.demo_data.zoo`` (small widths) and each torch
exporter (dynamo with external data, legacy TorchScript):

* builds  — ``edgeship.package.build`` from the exporter's files;
* verifies — ``edgeship.package.verify`` after the source folder is deleted;
* runs = raw — ``edgeship.runtime.load`` from another directory, output
  within 1e-4 of onnxruntime on the exporter's files;
* TFLite  — the ONNX -> TFLite route (``edgeship.converters.onnx_tflite``),
  gated on agreement with onnxruntime; the refusal line otherwise.

Prints a markdown table. ``python benchmarks/byo_models.py [--only NAME]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def models():
    from edgeship.demo_data import zoo

    rng = np.random.default_rng(0)
    yield ("MobileNetV3Like", lambda: zoo.MobileNetV3Like(width=0.5),
           {"input": rng.random((2, 3, 64, 64), dtype=np.float32)})
    yield "ResNetLike", lambda: zoo.ResNetLike(width=8), {"input": rng.random((2, 3, 64, 64), dtype=np.float32)}
    yield "TinyDetector", zoo.TinyDetector, {"input": rng.random((2, 3, 64, 96), dtype=np.float32)}
    yield "SequenceRecognizer", zoo.SequenceRecognizer, {"input": rng.random((2, 1, 32, 64), dtype=np.float32)}
    yield ("TextTransformer", lambda: zoo.TextTransformer(vocab=100, seq_len=16, dim=32, layers=1),
           {"ids": rng.integers(0, 100, (2, 16)), "mask": np.ones((2, 16), np.int64)})
    yield ("GRUKeywordSpotter", lambda: zoo.GRUKeywordSpotter(hidden=16),
           {"frames": rng.random((2, 10, 40), dtype=np.float32), "h": np.zeros((1, 2, 16), np.float32)})
    yield "AudioCNN1D", lambda: zoo.AudioCNN1D(samples=4000), {"input": rng.random((2, 1, 4000), dtype=np.float32)}


def export(model, feed, folder: Path, kind: str) -> Path:
    import torch

    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    args = tuple(torch.from_numpy(v) for v in feed.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(model, args, str(path), input_names=list(feed), dynamo=True, external_data=True,
                              opset_version=18, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), input_names=list(feed), dynamo=False, opset_version=17)
    return path


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def row(name: str, factory, feed, kind: str, work: Path) -> dict:
    import onnxruntime as ort
    import torch

    from edgeship import package as pkgmod
    from edgeship import runtime
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    torch.manual_seed(0)
    model = factory().eval()
    r = {"model": name, "export": kind, "builds": "-", "verifies": "-", "runs": "-", "tflite": "-", "notes": ""}
    src = work / f"{name}-{kind}"
    t0 = time.perf_counter()
    try:
        onnx_path = export(model, feed, src, kind)
    except Exception as exc:  # noqa: BLE001 - a benchmark row records any exporter failure
        r["notes"] = f"export failed: {one_line(exc)}"
        return r
    files = sorted(p.name for p in src.iterdir())
    raw = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)
    # The TFLite route first: it reads the source folder, which the package checks then delete.
    tfl_feed = feed  # the exports fix the sample's batch (2); TFLite gets the same
    try:
        t = time.perf_counter()
        res = onnx_to_tflite(onnx_path, work / f"{name}-{kind}.tflite", tfl_feed)
        r["tflite"] = f"yes ({max(res.max_abs_diff.values()):.1g}, {time.perf_counter() - t:.0f} s)"
    except Exception as exc:  # noqa: BLE001
        r["tflite"] = f"refused: {one_line(exc)}"
    pkg = work / f"{name}-{kind}.edgepkg"
    try:
        pkgmod.build(pkg, onnx_path, name=name.lower(), version="1")
        r["builds"] = "yes"
    except Exception as exc:  # noqa: BLE001
        r["builds"] = f"no: {one_line(exc)}"
        return r
    shutil.rmtree(src)
    try:
        pkgmod.verify(pkg)
        r["verifies"] = "yes"
    except Exception as exc:  # noqa: BLE001
        r["verifies"] = f"no: {one_line(exc)}"
        return r
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with runtime.load(pkg) as runner:
            got = runner.run(feed)
        diff = max(float(np.max(np.abs(g - w))) for g, w in zip(got.values(), raw))
        r["runs"] = f"yes ({diff:.1g})" if diff <= 1e-4 else f"no ({diff:.2g})"
    except Exception as exc:  # noqa: BLE001
        r["runs"] = f"no: {one_line(exc)}"
    finally:
        os.chdir(cwd)
    r["notes"] = f"{'+'.join(files)}; {time.perf_counter() - t0:.0f} s in all"
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="one model name")
    args = ap.parse_args(argv)
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeship-byo-") as tmp:
        for name, factory, feed in models():
            if args.only and name != args.only:
                continue
            for kind in ("dynamo", "legacy"):
                rows.append(row(name, factory, feed, kind, Path(tmp)))
                print(rows[-1], file=sys.stderr, flush=True)
    cols = ["model", "export", "builds", "verifies", "runs", "tflite", "notes"]
    print("| model | export | builds | verifies | runs = raw (max abs diff) | ONNX -> TFLite (diff, time) | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
