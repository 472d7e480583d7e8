"""Benchmark for issues 18/19.5: the variant the agent serves, chosen by timing each variant on this machine.

    python benchmarks/variant_choice.py --build-only      # trains/exports/quantizes into --cache (no timing)
    flock /tmp/bench.lock python benchmarks/variant_choice.py [--models mobilenet,ocr_cls,digits,deep]
                                                              [--choose-s 1.0] [--truth-s 4] [--reps 3]

Per model, one fp32 ONNX file and an int8 one made from it with plain
onnxruntime (static QDQ, u8 activations, MinMax over 32 calibration inputs;
the same for ``deep``), their top-1 agreement on held-out inputs recorded
as the int8 variant's accuracy drop, packed twice: int8 as the default (a
package quantized where int8 is fast) and fp32 as the default. Models:

* ``mobilenet``: the MobileNetV3-style 224x224 CNN of benchmarks/_real_models.py
  (issue 19: int8 served at 0.36x the fp32 throughput on an x86 without int8
  dot products);
* ``ocr_cls``: PP-OCR's pretrained MobileNet angle classifier (48x192,
  edgeship.demo_data.pretrained), on crops of scikit-learn's photos;
* ``digits``: the 8x8 digits teacher CNN (int8 was 0.38x the fp32 latency);
* ``deep``: a 16-layer, 64-wide MLP with Sigmoid, which has no int8 kernel
  (int8 about 2x slower: a control, tests/models.py).

For each package an agent with the default config starts; printed: what the
agent measured per variant (batch 1 and its batch, ms per call), its choice
and reason, the time the choice took, and start -> first result with the
choice on and with ``[adapt] choose = "default"`` (median of ``--reps``
interleaved runs). The "truth" is a longer interleaved raw-onnxruntime run
of both files (``--truth-s``) at the same batch sizes: the choice agrees
with it when it serves the variant that is faster there, or the default when
the two are within the 10 % margin. Writes benchmarks/out/variant_choice.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT = ROOT / "benchmarks" / "out"
MODELS = ("mobilenet", "ocr_cls", "digits", "deep")


# --------------------------------------------------------------------------- models

def _photo_crops(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """``n`` float32 NCHW crops of scikit-learn's photos, PP-OCR normalised ((x/255 - 0.5) / 0.5)."""
    from edgeship.demo_data import zoo

    rng = np.random.default_rng(seed)
    photos = zoo.sample_photos()
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - h), rng.integers(0, p.shape[1] - w)
        out[i] = (p[y:y + h, x:x + w].transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5
    return out


def _deep_mlp(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from models import make_deep_mlp_onnx  # the tests' builder: onnx.helper, no torch

    return make_deep_mlp_onnx(path, act="Sigmoid")


def fp32_model(name: str, cache: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(fp32 ONNX, calibration inputs, held-out inputs) of one model."""
    if name == "ocr_cls":
        from edgeship.demo_data.pretrained import rapidocr_models

        return rapidocr_models()["ocr_cls"], _photo_crops(32, 48, 192, 1), _photo_crops(128, 48, 192, 2)
    if name == "deep":
        rng = np.random.default_rng(0)
        return (_deep_mlp(cache / "deep.onnx"), rng.normal(size=(32, 64)).astype(np.float32),
                rng.normal(size=(256, 64)).astype(np.float32))
    import _real_models as rm

    p, c, e, _, _ = rm.BUILDERS[name](cache)
    calib, evald = np.load(c), np.load(e)
    return Path(p), calib["input"][:32].astype(np.float32), evald["input"].astype(np.float32)


def int8_model(name: str, fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """Plain onnxruntime int8: static QDQ, u8 activations, MinMax calibration."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if out.is_file():
        return out
    import onnxruntime as ort

    in_name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({in_name: calib[i:i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def agreement(fp32: Path, int8: Path, x: np.ndarray) -> float:
    """Top-1 agreement of the two models on ``x`` (per position for a sequence output), in %."""
    import onnxruntime as ort

    tops = []
    for p in (fp32, int8):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        out = np.concatenate([s.run(None, {name: x[i:i + 16]})[0] for i in range(0, len(x), 16)])
        tops.append(out.argmax(-1))
    return float(np.mean(tops[0] == tops[1]) * 100.0)


def packages(name: str, fp32: Path, int8: Path, example: np.ndarray, drop: float, work: Path) -> dict[str, Path]:
    """The two packages: int8 default, fp32 default (a recorded budget of 1 point, as convert quantize's)."""
    from edgeship import package

    out = {}
    for default in ("onnx-int8", "onnx-fp32"):
        variants = [{"id": "onnx-int8", "file": "model.int8.onnx", "precision": "int8",
                     "metrics": {"points": 100.0 - drop, "drop": drop}},
                    {"id": "onnx-fp32", "file": "model.onnx", "precision": "fp32",
                     "metrics": {"points": 100.0, "drop": 0.0}}]
        for v in variants:
            v["default"] = v["id"] == default
        out[default] = package.build(work / f"{name}-{default}.edgepkg", {"model.onnx": fp32, "model.int8.onnx": int8},
                                     name=name, version="1.0.0", example_input=example[:1],
                                     provenance={"quantization": {"onnx": {"max_drop": 1.0}}}, variants=variants)
    return out


# --------------------------------------------------------------------------- measuring

def run_agent(pkg: Path, choose: str, choose_s: float, state: Path, sample: np.ndarray) -> dict:
    """Start an agent, time start -> first result, wait for the choice; its figures."""
    from edgeship.agent import Agent
    from edgeship.agent.adapt_choice import VariantChooser
    from edgeship.agent.config import parse_config

    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(state),
                                  "log_level": "warning"}, "adapt": {"choose": choose, "choose_s": choose_s}})
    t0 = time.perf_counter()
    with Agent(cfg) as agent:
        agent.infer(sample, preprocess=False, timeout=60)
        first = time.perf_counter() - t0
        chooser = next((c for c in agent.components if isinstance(c, VariantChooser)), None)
        if chooser is not None:
            chooser.ready.wait(120)
        done = time.perf_counter() - t0
        return {"first_result_s": first, "chosen_after_s": done if chooser is not None else None,
                "served": agent.handle.variant, "batch": agent.batcher.policy.max_batch,
                "choice": agent.metrics.variant_choice}


def truth(fp32: Path, int8: Path, x: np.ndarray, batch: int, seconds: float) -> dict:
    """Raw onnxruntime, both files interleaved for ``seconds``: median ms per call at batch 1, then ``batch``."""
    import onnxruntime as ort

    from edgeship.agent.adapt_choice import measure_variants

    runs, feeds = {}, {}
    for vid, p in (("onnx-fp32", fp32), ("onnx-int8", int8)):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        name = s.get_inputs()[0].name
        runs[vid] = lambda f, s=s, name=name: s.run(None, {name: f[0]})
        sizes = [1, batch] if batch > 1 else [1]
        feeds[vid] = {b: [np.ascontiguousarray(np.repeat(x[:1], b, axis=0))] for b in sizes}
    ms = measure_variants(runs, feeds, seconds=seconds, min_rounds=10, max_rounds=100000)
    return {vid: {"b1_ms": m[1], "bn_ms": m.get(batch), "batch": batch} for vid, m in ms.items()}


def _score(fig: dict) -> float:
    parts = [fig["b1_ms"]] + ([fig["bn_ms"] / fig["batch"]] if fig.get("bn_ms") and fig["batch"] > 1 else [])
    return math.exp(sum(math.log(p) for p in parts) / len(parts))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--choose-s", type=float, default=1.0, help="[adapt] choose_s of the agents")
    ap.add_argument("--truth-s", type=float, default=4.0, help="raw onnxruntime timing per model")
    ap.add_argument("--reps", type=int, default=3, help="interleaved agent starts per setting")
    ap.add_argument("--cache", default=str(OUT / "real_models"), help="folder of the built models (reused)")
    ap.add_argument("--build-only", action="store_true", help="build and cache the models, time nothing (no lock)")
    args = ap.parse_args(argv)
    from edgeship.agent.adapt_choice import choice_line, machine_info

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: {machine['cpu']} ({machine['arch']}, {machine['cores']} cores, int8 dot product: "
          f"{'/'.join(machine['int8_dot']) or 'none'}); load {os.getloadavg()[0]:.2f}", flush=True)
    results = {"machine": machine, "models": {}}
    with tempfile.TemporaryDirectory(prefix="variant-choice-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            fp32, calib, evald = fp32_model(name, cache)
            int8 = int8_model(name, fp32, calib, cache / f"{name}.plain-int8.onnx")
            if args.build_only:
                print(f"{name}: {fp32} and {int8}", flush=True)
                continue
            agree = agreement(fp32, int8, evald)
            drop = round(100.0 - agree, 3)
            pkgs = packages(name, fp32, int8, evald, drop, work)
            runs: dict[str, list] = {}
            for rep in range(args.reps):  # interleaved: each setting sees the machine's load alike
                for default, pkg in pkgs.items():
                    for choose in ("fastest", "default"):
                        r = run_agent(pkg, choose, args.choose_s, work / f"s-{name}-{default}-{choose}-{rep}",
                                      evald[0])
                        runs.setdefault(f"{default}/{choose}", []).append(r)
            batch = runs["onnx-fp32/fastest"][0]["batch"]
            raw = truth(fp32, int8, evald, batch, args.truth_s)
            ratio = _score(raw["onnx-int8"]) / _score(raw["onnx-fp32"])
            row = {"int8_agreement_pct": agree, "int8_drop_pt": drop, "truth": raw, "truth_int8_over_fp32": ratio,
                   "batch": batch, "packages": {}}
            print(f"\n{name}: int8 agreement {agree:.1f} % (drop {drop:.2f} pt, budget 1 pt); raw onnxruntime "
                  f"{args.truth_s:g} s: int8 b1 {raw['onnx-int8']['b1_ms']:.3f} ms vs fp32 "
                  f"{raw['onnx-fp32']['b1_ms']:.3f} ms"
                  + (f", b{batch} {raw['onnx-int8']['bn_ms']:.3f} vs {raw['onnx-fp32']['bn_ms']:.3f} ms"
                     if batch > 1 else "") + f" -> int8 takes {ratio:.2f}x fp32", flush=True)
            for default in pkgs:
                fast, dflt = runs[f"{default}/fastest"], runs[f"{default}/default"]
                served = [r["served"] for r in fast]
                # the package's default is always eligible, fp32 always within the budget, int8 when its drop is
                other = "onnx-fp32" if default == "onnx-int8" else "onnx-int8"
                other_rel = ratio if other == "onnx-int8" else 1.0 / ratio   # other's time / the default's
                eligible = other == "onnx-fp32" or drop <= 1.0
                expect = other if eligible and other_rel < 0.9 else default
                ok = all(s == expect for s in served)
                med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
                pr = {"served": served, "expected": expect, "agrees": ok,
                      "first_result_s": med(fast, "first_result_s"), "first_result_s_choose_default":
                      med(dflt, "first_result_s"), "chosen_after_s": med(fast, "chosen_after_s"),
                      "choice": fast[-1]["choice"]}
                row["packages"][default] = pr
                print(f"  default {default}: served {', '.join(served)} ({'agrees' if ok else 'DISAGREES'} with "
                      f"the raw run: {expect}); start -> first result {pr['first_result_s']:.3f} s "
                      f"(choose = \"default\": {pr['first_result_s_choose_default']:.3f} s); choice made "
                      f"{pr['chosen_after_s']:.2f} s after start")
                if pr["choice"]:
                    print(f"    {choice_line(pr['choice'])}")
            results["models"][name] = row
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "variant_choice.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
