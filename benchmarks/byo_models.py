"""#20: the model set through the whole path, as a user with their own model would take it.

Two kinds of model:

* the architectures of ``edgeship.demo_data.zoo`` (small widths), each
  exported twice with torch: dynamo (external data) and legacy TorchScript;
* three real pretrained PP-OCR models from the package index
  (``edgeship.demo_data.pretrained.rapidocr_models()``: text detector with
  a dense map and dynamic H×W, CTC recognizer, angle classifier), fed with
  rendered text.

Per model and export, the columns:

* builds — ``edgeship.package.build`` from the exporter's files;
* verifies — ``edgeship.package.verify`` after the source folder is deleted;
* runs = raw — ``edgeship.runtime.load`` from another directory, output
  within 1e-4 of onnxruntime on the exporter's files (max abs diff shown);
* int8 — ``edgeship.converters.quantize`` on the package: the method it
  kept and the task metric, or its one-line refusal;
* TFLite — the ONNX -> TFLite route (``edgeship.converters.onnx_tflite``),
  gated on agreement with onnxruntime; the refusal line otherwise;
* agent — the package served by an agent, one sample through
  ``POST /v1/infer``, the answer within 1e-4 of onnxruntime (a stateful
  model: three windows of one stream, then one with ``"reset": true``);
* bench — ``edgeship bench`` (``run_bench``, short windows): agent latency
  p50 at batch 1, or its error line.

Prints a markdown table. ``python benchmarks/byo_models.py [--only NAME,...] [--no-int8] [--no-tflite]``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

GATE = 1e-4


def zoo_models():
    """(name, factory, feed, output names, state declaration or None) per zoo architecture."""
    from edgeship.demo_data import zoo

    rng = np.random.default_rng(0)
    yield ("MobileNetV3Like", lambda: zoo.MobileNetV3Like(width=0.5),
           {"input": rng.random((2, 3, 64, 64), dtype=np.float32)}, ["logits"], None)
    yield ("ResNetLike", lambda: zoo.ResNetLike(width=8), {"input": rng.random((2, 3, 64, 64), dtype=np.float32)},
           ["logits"], None)
    yield "TinyDetector", zoo.TinyDetector, {"input": rng.random((2, 3, 64, 96), dtype=np.float32)}, ["dense"], None
    yield ("SequenceRecognizer", zoo.SequenceRecognizer, {"input": rng.random((2, 1, 32, 64), dtype=np.float32)},
           ["steps"], None)
    yield ("TextTransformer", lambda: zoo.TextTransformer(vocab=100, seq_len=16, dim=32, layers=1),
           {"ids": rng.integers(0, 100, (2, 16)), "mask": np.ones((2, 16), np.int64)}, ["logits"], None)
    yield ("GRUKeywordSpotter", lambda: zoo.GRUKeywordSpotter(hidden=16),
           {"frames": rng.random((2, 10, 40), dtype=np.float32), "h": np.zeros((1, 2, 16), np.float32)},
           ["logits", "h_out"], [{"input": "h", "output": "h_out", "batch_axis": 1}])
    yield ("AudioCNN1D", lambda: zoo.AudioCNN1D(samples=4000), {"input": rng.random((2, 1, 4000), dtype=np.float32)},
           ["logits"], None)


def export(model, feed, folder: Path, kind: str, outputs) -> Path:
    import torch

    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    args = tuple(torch.from_numpy(v) for v in feed.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(model, args, str(path), input_names=list(feed), output_names=outputs, dynamo=True,
                              external_data=True, opset_version=18, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), input_names=list(feed), output_names=outputs, dynamo=False,
                              opset_version=17)
    return path


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def max_diff(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) for g, w in zip(got, want))


def raw_run(onnx_path, feed) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)


# -- the columns -------------------------------------------------------------------------------------

def col_int8(pkg: Path, calib: dict, evald: dict, work: Path, metric: str | None, options: dict | None) -> str:
    from edgeship.converters import quantize

    t = time.perf_counter()
    try:
        res = quantize(pkg, calib, evald, max_drop=2.0, metric=metric, metric_options=options, out=work / "q.edgepkg",
                       quiet=True, repeats=3, both_precisions=False, work_dir=work / "q")
    except Exception as exc:  # noqa: BLE001 - the table records the refusal line
        return f"refused: {one_line(exc)}"
    dec = res.decisions["onnx"]
    cand = {c.name: c for c in res.candidates}
    best = cand.get(dec.best_int8 or dec.chosen)
    metric = (res.report.get("targets", {}).get("onnx") or {}).get("metric") or metric or "metric"
    if best is None or best.precision != "int8":
        return f"no int8 within budget: {dec.reason}"[:200]
    kept = "" if dec.chosen == best.name else f"; {dec.chosen} kept on this machine"
    return (f"yes: {best.name}, {metric} {best.metric_value:.4g} (drop {best.drop:.2g}){kept}; "
            f"{time.perf_counter() - t:.0f} s")


def col_tflite(onnx_path: Path, feed: dict, work: Path) -> str:
    from edgeship.converters.onnx_tflite import onnx_to_tflite

    t = time.perf_counter()
    try:
        res = onnx_to_tflite(onnx_path, work / "model.tflite", feed)
    except Exception as exc:  # noqa: BLE001
        return f"refused: {one_line(exc)}"
    return f"yes ({max(res.max_abs_diff.values()):.1g}, {time.perf_counter() - t:.0f} s)"


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def col_agent(pkg: Path, onnx_path: Path, feed: dict, out_names: list[str], state, work: Path) -> str:
    """One sample (row 0) through the HTTP API against raw onnxruntime; a stateful model as a stream."""
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config

    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(work / "agent")},
                        "batcher": {"max_batch": 4, "max_delay_ms": 0}, "api": {"enabled": True, "port": 0}})
    st_in = {d["input"] for d in state or ()}
    data = {k: v for k, v in feed.items() if k not in st_in}
    row = {k: v[:1] for k, v in feed.items()}
    try:
        with Agent(cfg) as agent:
            port = agent.api.port
            if not state:
                sample = {k: v[0].tolist() for k, v in data.items()}
                status, body = _post(port, "/v1/infer", {"inputs": sample, "input": "model"} if len(sample) > 1
                                     else {"x": next(iter(sample.values())), "input": "model"})
                if status != 200:
                    return f"no: HTTP {status} {body.get('error')}"
                want = raw_run(onnx_path, {k: np.repeat(v[:1], len(v), 0) for k, v in feed.items()})
                d = max_diff([body["outputs"][n] for n in out_names], [w[0] for w in want])
                extra = next((k for k in ("label", "detections", "mask", "text") if k in body), None)
                return (f"yes ({d:.1g}{', ' + extra if extra else ''})" if d <= GATE else f"no (diff {d:.2g})")
            # Stateful: 3 windows of one stream continue the state; a 4th with reset equals a fresh stream.
            sample = {k: v[0].tolist() for k, v in data.items()}
            body_of = {"inputs": sample} if len(sample) > 1 else {"x": next(iter(sample.values()))}
            got = []
            for i in range(4):
                status, body = _post(port, "/v1/infer", {**body_of, "input": "model", "stream": "s",
                                                         **({"reset": True} if i == 3 else {})})
                if status != 200:
                    return f"no: HTTP {status} {body.get('error')}"
                got.append(np.asarray(body["outputs"][out_names[0]]))
            pair = state[0]
            h = np.take(feed[pair["input"]], [0], axis=pair["batch_axis"]) * 0
            want = []
            names = [o.name for o in _session(onnx_path).get_outputs()]
            for _ in range(3):
                full = {k: np.repeat(v[:1], feed[k].shape[0], 0) for k, v in row.items() if k not in st_in}
                full[pair["input"]] = np.repeat(h, feed[pair["input"]].shape[pair["batch_axis"]], pair["batch_axis"])
                outs = dict(zip(names, _session(onnx_path).run(None, full)))
                want.append(outs[out_names[0]][0])
                h = np.take(outs[pair["output"]], [0], axis=pair["batch_axis"])
            d = max_diff(got[:3], want)
            d_reset = max_diff([got[3]], [want[0]])
            ok = d <= GATE and d_reset <= GATE
            return f"{'yes' if ok else 'no'} (stream {d:.1g}, after reset {d_reset:.1g})"
    except Exception as exc:  # noqa: BLE001
        return f"no: {one_line(exc)}"


_SESSIONS: dict = {}


def _session(path):
    import onnxruntime as ort

    key = str(path)
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(key, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def col_bench(pkg: Path) -> str:
    from edgeship.agent.bench import run_bench

    try:
        r = run_bench(pkg, seconds=0.2, quiet=True)
    except Exception as exc:  # noqa: BLE001
        return f"no: {one_line(exc)}"
    return (f"yes (p50 {r['agent_latency_ms_b1']['p50']:.2g} ms agent, {r['raw_latency_ms_b1']['p50']:.2g} ms raw; "
            f"{r['agent_throughput']['8']:.0f}/s at b=8)")


# -- one row -----------------------------------------------------------------------------------------

def package_row(r: dict, name: str, onnx_path: Path, src: Path | None, feed: dict, work: Path, build_args: dict,
                out_names: list[str], state, quant: tuple, args) -> dict:
    """Everything after the export: build, verify, runs = raw, int8, TFLite, agent, bench."""
    from edgeship import package as pkgmod
    from edgeship import runtime

    raw = raw_run(onnx_path, feed)
    if args.tflite:
        # The TFLite route first: it reads the source folder, which the package checks then delete.
        r["tflite"] = col_tflite(onnx_path, {k: v for k, v in feed.items()}, work / "tfl")
    pkg = work / f"{name}.edgepkg"
    (work / "tfl").mkdir(exist_ok=True)
    try:
        pkgmod.build(pkg, onnx_path, name=name.lower(), version="1", state=state, **build_args)
        r["builds"] = "yes"
    except Exception as exc:  # noqa: BLE001
        r["builds"] = f"no: {one_line(exc)}"
        return r
    if src is not None:
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
        d = max_diff(list(got.values()), raw)
        r["runs"] = f"yes ({d:.1g})" if d <= GATE else f"no ({d:.2g})"
    except Exception as exc:  # noqa: BLE001
        r["runs"] = f"no: {one_line(exc)}"
    finally:
        os.chdir(cwd)
    if args.int8:
        calib, evald, metric, options = quant
        r["int8"] = col_int8(pkg, calib, evald, work, metric, options)
    r["agent"] = col_agent(pkg, onnx_path if src is None else _keep_copy(pkg, work), feed, out_names, state, work)
    r["bench"] = col_bench(pkg)
    return r


def _keep_copy(pkg: Path, work: Path) -> Path:
    """The package's graph as a file (the export folder is gone): the raw reference for the agent column."""
    from edgeship import package as pkgmod

    p = pkgmod.open_package(pkg)
    dst = work / "ref.onnx"
    dst.write_bytes(p.read("model.onnx"))
    return dst


def zoo_row(name, factory, feed, out_names, state, kind: str, work: Path, args) -> dict:
    import torch

    torch.manual_seed(0)
    model = factory().eval()
    r = {"model": name, "export": kind}
    src = work / "src"
    t0 = time.perf_counter()
    try:
        onnx_path = export(model, feed, src, kind, out_names)
    except Exception as exc:  # noqa: BLE001 - a benchmark row records any exporter failure
        r["notes"] = f"export failed: {one_line(exc)}"
        return r
    files = sorted(p.name for p in src.iterdir())
    rng = np.random.default_rng(1)
    # Calibration / evaluation: more rows like the feed (the exports fix a batch of 2).
    calib = {k: _like(v, rng, 24) for k, v in feed.items()}
    evald = {k: _like(v, rng, 24) for k, v in feed.items()}
    package_row(r, name, onnx_path, src, feed, work, {}, out_names, state, (calib, evald, None, None), args)
    r["notes"] = f"{'+'.join(files)}; {time.perf_counter() - t0:.0f} s in all"
    return r


def _like(v: np.ndarray, rng, n: int) -> np.ndarray:
    if v.dtype.kind in "iu":
        return np.ones((n, *v.shape[1:]), v.dtype) if v.max() <= 1 else rng.integers(0, int(v.max()) + 1,
                                                                                       (n, *v.shape[1:]))
    if v.shape[0] == 1 and v.ndim == 3:  # the GRU's state (1, batch, hidden): zeros, the batch on axis 1
        return np.zeros((v.shape[0], n, v.shape[2]), v.dtype)
    return rng.random((n, *v.shape[1:]), dtype=np.float32)


PRETRAINED_QUANT = {  # metric and options the quantize gate uses per model
    "ocr_det": ("iou", {"threshold": 0.3, "channel": 0}),
    "ocr_rec": ("step_agreement", None),
    "ocr_cls": ("agreement", None),
}


def pretrained_row(name: str, path: Path, work: Path, args) -> dict:
    from edgeship.demo_data.pretrained import RAPIDOCR, ocr_inputs, ocr_package_args

    r = {"model": f"{name} (PP-OCR, {path.stat().st_size / 1e6:.1f} MB)", "export": "pretrained"}
    t0 = time.perf_counter()
    feed = {"x": ocr_inputs(name, 1, seed=5)}
    metric, options = PRETRAINED_QUANT[name]
    quant = ({"x": ocr_inputs(name, 24, seed=6)}, {"x": ocr_inputs(name, 24, seed=7)}, metric, options)
    out_names = [o.name for o in _session(path).get_outputs()]
    package_row(r, name, path, None, feed, work, ocr_package_args(name), out_names, None, quant, args)
    r["notes"] = f"{RAPIDOCR[name][1]}; {time.perf_counter() - t0:.0f} s in all"
    return r


COLS = ["model", "export", "builds", "verifies", "runs", "int8", "tflite", "agent", "bench", "notes"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None,
                    help="model names, comma-separated (zoo classes, ocr_det, ocr_rec, ocr_cls)")
    ap.add_argument("--no-int8", dest="int8", action="store_false", help="skip the quantize column")
    ap.add_argument("--no-tflite", dest="tflite", action="store_false", help="skip the TFLite column")
    ap.add_argument("--no-zoo", dest="zoo", action="store_false", help="only the pretrained models")
    args = ap.parse_args(argv)
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    from edgeship.demo_data.pretrained import rapidocr_models

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeship-byo-") as tmp:
        # The pretrained models first: the real models are what this table adds.
        jobs = [(name, lambda w, a=(name, path): pretrained_row(*a, w, args))
                for name, path in rapidocr_models().items()]
        if args.zoo:
            for name, factory, feed, outs, state in zoo_models():
                for kind in ("dynamo", "legacy"):
                    jobs.append((name, lambda w, a=(name, factory, feed, outs, state, kind): zoo_row(*a, w, args)))
        for i, (name, job) in enumerate(jobs):
            if args.only and name not in args.only.split(","):
                continue
            work = Path(tmp) / f"{i}"
            work.mkdir()
            try:
                rows.append(job(work))
            except Exception as exc:  # noqa: BLE001 - one model's crash is its row, not the end of the table
                rows.append({"model": name, "notes": f"crashed: {one_line(exc)}"})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    print("| model | export | builds | verifies | runs = raw (max abs diff) | int8 (quantize gate) | "
          "ONNX -> TFLite (diff, time) | agent (HTTP API = raw) | bench | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")).replace("|", "/") for c in COLS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
