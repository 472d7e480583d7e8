"""Conversion recipes: one TOML file from teacher to signed int8 package.

``run_recipe("recipe.toml")`` (and ``edgeship convert run recipe.toml``) runs
the steps in :data:`STEPS`, in order:

    distill → export_onnx → quantize → tflite → evaluate → package

* **distill** trains the student from the teacher (:mod:`.distill`);
* **export_onnx** exports it with a dynamic batch axis (:mod:`.onnx_export`);
* **quantize** is the quantize issue's accuracy/speed gate
  (:func:`edgeship.converters.quantize`, target ONNX); failing the
  budget stops the recipe with :class:`AccuracyBudgetError`, no package;
* **tflite** exports a full-integer TFLite model (litert-torch PT2E);
* **evaluate** runs every artifact (teacher, student fp32, int8 ONNX, int8
  TFLite) on the same held-out set, times it at batch 1 and 32, and holds
  the TFLite model to the same budget as the quantize gate;
* **package** builds and signs the ``.edgepkg`` with both int8 variants.

Each step's output lives in ``<out_dir>/.cache/<step>-<key>/``, where the
key hashes the step's options, the bytes of the files it reads and the keys
of the steps it depends on. A re-run reuses every step whose key is
unchanged: changing only ``[quantize] max_drop`` re-quantizes but does not
re-train. ``dry_run=True`` prints that plan and runs nothing. ``report.md``
in ``out_dir`` holds the comparison table and the plots.

Steps are a registry of small functions (:class:`Step`); a new step (e.g.
``prune`` between ``distill`` and ``export_onnx``, reading and writing the
``student`` artifact) is one more entry with its own TOML section.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .._files import json_default
from ..errors import AccuracyBudgetError, ConversionError, EdgeshipError, RecipeError

__all__ = ["run_recipe", "load_recipe", "Recipe", "RecipeResult", "StepRun", "Step", "Opt", "STEPS"]

_CACHE = ".cache"
_STEP_FILE = "step.json"


# --------------------------------------------------------------------------- schema

@dataclasses.dataclass(frozen=True)
class Opt:
    """One recipe key: accepted types, default, required; ``kind`` "file" must exist, "factory" is file.py:Name."""

    types: tuple
    default: object = None
    required: bool = False
    kind: str = "value"   # "value" | "file" | "path" | "factory"
    choices: tuple = ()


_NUM = (int, float)
_TOP: dict[str, Opt] = {
    "name": Opt((str,), required=True),
    "version": Opt((str,), "1.0.0"),
    "description": Opt((str,), ""),
    "out_dir": Opt((str,), "build", kind="path"),
    "labels": Opt((list,), None),
    "preprocess": Opt((dict,), None),
}
_SECTIONS: dict[str, dict[str, Opt]] = {
    "data": {"train": Opt((str,), required=True, kind="file"), "val": Opt((str,), None, kind="file"),
             "calib": Opt((str,), required=True, kind="file"), "eval": Opt((str,), required=True, kind="file")},
    "teacher": {"onnx": Opt((str,), None, kind="file"), "factory": Opt((str,), None, kind="factory"),
                "weights": Opt((str,), None, kind="file")},
    "student": {"factory": Opt((str,), required=True, kind="factory")},
    "distill": {"alpha": Opt(_NUM, 0.7), "temperature": Opt(_NUM, 4.0), "epochs": Opt((int,), 30),
                "lr": Opt(_NUM, 2e-3), "batch_size": Opt((int,), 64), "seed": Opt((int,), 0),
                "early_stopping": Opt((int, bool), 10), "hint_layer": Opt((str, list), None),
                "hint_weight": Opt(_NUM, 1.0), "weight_decay": Opt(_NUM, 0.0)},
    "export": {"opset": Opt((int,), 18), "exporter": Opt((str,), "auto", choices=("auto", "dynamo", "torchscript"))},
    "quantize": {"max_drop": Opt(_NUM, 1.0),
                 "metric": Opt((str,), None, choices=("top1", "agreement", "mse", "cosine", "iou", "seq_exact",
                                                      "step_agreement")),
                 "metric_options": Opt((dict,), None),   # e.g. iou: {threshold = 0.0, channel = 0}
                 "method": Opt((str,), "static", choices=("auto", "static", "dynamic")),
                 "calibrations": Opt((list,), ["minmax", "percentile", "entropy"]), "batch": Opt((int,), 32),
                 "recovery_steps": Opt((int,), 3)},
    "tflite": {"enabled": Opt((bool,), True), "int8_io": Opt((bool,), False)},
    # prune (edgeship.converters.pruning) runs between distill and export when ratio or a target is set
    "prune": {"ratio": Opt(_NUM, None), "target_params": Opt(_NUM, None), "target_latency": Opt(_NUM, None),
              "finetune_epochs": Opt((int,), 10), "lr": Opt(_NUM, 1e-3), "distill": Opt((bool,), True),
              "max_drop": Opt(_NUM, 1.0), "seed": Opt((int,), 0)},
    "evaluate": {"repeats": Opt((int,), 30), "threads": Opt((int,), 0)},
    "package": {"signing_key": Opt((str,), required=True, kind="file"), "out": Opt((str,), None, kind="path")},
    # field data from the fleet (#22, edgeship.converters.field): mixed into training, gated against serving
    "field": {"data": Opt((str,), None, kind="file"), "serving": Opt((str,), None, kind="file"),
              "mix": Opt(_NUM, 0.3), "dedup": Opt((bool,), True), "max_samples": Opt((int,), 0),
              "val_share": Opt(_NUM, 0.2),
              "min_gain": Opt(_NUM, 0.0), "max_regress": Opt(_NUM, 1.0), "seed": Opt((int,), 0)},
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: ``options[section][key]`` with defaults filled and paths resolved."""

    path: Path
    base: Path
    options: Mapping[str, Mapping[str, object]]
    text: str

    def __getitem__(self, section: str) -> Mapping[str, object]:
        return self.options[section]

    @property
    def out_dir(self) -> Path:
        return Path(self.options[""]["out_dir"])

    @property
    def name(self) -> str:
        return str(self.options[""]["name"])

    @property
    def version(self) -> str:
        return str(self.options[""]["version"])

    @property
    def package_path(self) -> Path:
        out = self.options["package"]["out"]
        return Path(out) if out else self.out_dir / f"{self.name}-{self.version}.edgepkg"


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Line (1-based) of ``key`` inside ``[section]`` ('' = top level), or of the section header."""
    current = ""
    header_line = None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\s*([^\]\s]+)\s*\]", s)
        if m:
            current = m.group(1)
            if current == section:
                header_line = i
            continue
        if current == section and key is not None and re.match(rf"^\"?{re.escape(key)}\"?\s*=", s):
            return i
    return header_line


def _err(recipe_path: Path, text: str, section: str, key: str | None, msg: str) -> RecipeError:
    line = _line_of(text, section, key)
    where = f"{recipe_path}" + (f":{line}" if line else "")
    name = f"[{section}] {key}" if section and key else (f"[{section}]" if section else str(key))
    return RecipeError(f"{where}: {name}: {msg}")


def load_recipe(path) -> Recipe:
    """Parse and validate a recipe; every problem is a :class:`RecipeError` naming the key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    base = path.resolve().parent
    options: dict[str, dict] = {}
    top = {k: v for k, v in raw.items() if not (isinstance(v, dict) and k in _SECTIONS)}
    sections = {k: v for k, v in raw.items() if isinstance(v, dict) and k in _SECTIONS}
    for sec, schema, values in [("", _TOP, top)] + [(s, _SECTIONS[s], sections.get(s, {})) for s in _SECTIONS]:
        opts = {}
        for key in values:
            if key not in schema:
                if sec == "" and isinstance(values[key], dict):
                    raise _err(path, text, key, None, f"unknown section; known sections: {', '.join(_SECTIONS)}")
                raise _err(path, text, sec, key, f"unknown key; known keys here: {', '.join(schema)}")
        for key, opt in schema.items():
            if key not in values:
                if opt.required:
                    raise _err(path, text, sec, None,
                               f"missing required key {key!r}" if sec else f"missing required key {key!r}")
                opts[key] = opt.default
                continue
            v = values[key]
            if not isinstance(v, opt.types) or (isinstance(v, bool) and bool not in opt.types):
                want = " or ".join(t.__name__ for t in opt.types)
                raise _err(path, text, sec, key, f"must be {want}, got {type(v).__name__} {v!r}")
            if opt.choices and v not in opt.choices:
                raise _err(path, text, sec, key, f"must be one of {', '.join(opt.choices)}, got {v!r}")
            if opt.kind in ("file", "path"):
                v = str((base / v) if not Path(v).is_absolute() else Path(v))
                if opt.kind == "file" and not Path(v).exists():
                    raise _err(path, text, sec, key, f"file not found: {v}")
            elif opt.kind == "factory":
                file_part, sep, attr = v.rpartition(":")
                if not sep or not file_part or not attr:
                    raise _err(path, text, sec, key, f"give path/to/file.py:Factory, got {v!r}")
                f = base / file_part if not Path(file_part).is_absolute() else Path(file_part)
                if not f.is_file():
                    raise _err(path, text, sec, key, f"file not found: {f}")
                v = f"{f}:{attr}"
            opts[key] = v
        options[sec] = opts
    t = options["teacher"]
    if (t["onnx"] is None) == (t["factory"] is None):
        raise _err(path, text, "teacher", None, "give either onnx = \"teacher.onnx\" or factory = \"file.py:Name\" "
                                                "(with weights = \"teacher.pt\")")
    if t["factory"] is not None and t["weights"] is None:
        raise _err(path, text, "teacher", "factory", "a torch teacher needs weights = \"teacher.pt\" (a state dict)")
    d = options["distill"]
    if not 0 <= d["alpha"] <= 1:
        raise _err(path, text, "distill", "alpha", f"must be in [0, 1], got {d['alpha']}")
    if d["early_stopping"] is True:
        raise _err(path, text, "distill", "early_stopping", "give a patience in epochs, or false")
    if options["quantize"]["max_drop"] < 0:
        raise _err(path, text, "quantize", "max_drop", "must be >= 0 points")
    f = options["field"]
    if f["data"] is not None and f["serving"] is None:
        raise _err(path, text, "field", "data", "field data needs serving = \"<the package serving now>.edgepkg\": "
                                                "the new model must beat it on the held-out field set")
    if not 0 <= f["mix"] < 1:
        raise _err(path, text, "field", "mix", f"must be in [0, 1) (the share of field samples), got {f['mix']}")
    if f["max_samples"] < 0 or f["max_regress"] < 0:
        raise _err(path, text, "field", None, "max_samples and max_regress must be >= 0")
    if not 0 <= f["val_share"] < 1:
        raise _err(path, text, "field", "val_share", f"must be in [0, 1) (a share of the field training samples), "
                                                     f"got {f['val_share']}")
    return Recipe(path=path, base=base, options=options, text=text)


# --------------------------------------------------------------------------- steps

@dataclasses.dataclass
class Ctx:
    """What a step sees: the recipe, artifacts made so far, earlier steps' info, its own work folder."""

    recipe: Recipe
    artifacts: dict[str, Path]
    infos: dict[str, dict]
    work: Path
    quiet: bool


@dataclasses.dataclass(frozen=True)
class Step:
    """One recipe step.

    ``options(recipe)`` and ``files(recipe)`` are everything the step reads
    besides the artifacts in ``needs`` — together with the keys of the steps
    that made those artifacts they form the cache key. ``run(ctx)`` returns
    ``(artifacts, info)``: files inside ``ctx.work`` named by ``makes``, and a
    JSON-able dict kept with them.
    """

    name: str
    needs: tuple[str, ...]
    makes: tuple[str, ...]
    options: Callable[[Recipe], dict]
    files: Callable[[Recipe], list]
    run: Callable[[Ctx], tuple[dict, dict]]
    enabled: Callable[[Recipe], bool] = lambda r: True
    optional_needs: tuple[str, ...] = ()
    #: reads earlier steps' ``info`` (not just their artifacts): keyed on every earlier step then
    uses_info: bool = False
    version: int = 1


def _factory_file(spec: str) -> str:
    return spec.rpartition(":")[0]


def _teacher_files(r: Recipe) -> list:
    t = r["teacher"]
    return [t["onnx"]] if t["onnx"] else [_factory_file(t["factory"]), t["weights"]]


def _teacher_model(r: Recipe):
    from .checkpoints import load_student

    t = r["teacher"]
    return t["onnx"] if t["onnx"] else load_student(t["factory"], t["weights"])


# -- distill

def _distill_run(ctx: Ctx) -> tuple[dict, dict]:
    from .checkpoints import load_factory
    from .distillation import distill

    r = ctx.recipe
    d = r["distill"]
    student = load_factory(r["student"]["factory"])()
    hint = d["hint_layer"]
    train = ctx.artifacts.get("train_data") or r["data"]["train"]  # mixed with field data by field_data
    val = ctx.artifacts.get("val_data") or r["data"]["val"]  # with field samples too (field_data, val_share)
    res = distill(_teacher_model(r), student, train, val=val, alpha=float(d["alpha"]),
                  temperature=float(d["temperature"]), epochs=d["epochs"], lr=float(d["lr"]),
                  batch_size=d["batch_size"], seed=d["seed"],
                  early_stopping=None if d["early_stopping"] is False else d["early_stopping"],
                  hint_layer=tuple(hint) if isinstance(hint, list) else hint, hint_weight=float(d["hint_weight"]),
                  weight_decay=float(d["weight_decay"]), cache_dir=r.out_dir / _CACHE / "teacher-logits",
                  out_dir=ctx.work, quiet=ctx.quiet)
    info = {"history": res.history, "metric": res.metric, "best_epoch": res.best_epoch, "best_val": res.best_val,
            "stopped": res.stopped, "teacher_val": res.teacher_val, "seconds": res.seconds,
            "teacher_cache_hit": res.teacher_cache_hit, "params": res.params,
            "student_params": int(sum(p.numel() for p in student.parameters()))}
    return {"student": res.checkpoint, "learning_curve": res.curve_png}, info


# -- prune

def _prune_enabled(r: Recipe) -> bool:
    p = r["prune"]
    return any(p[k] is not None for k in ("ratio", "target_params", "target_latency"))


def _prune_run(ctx: Ctx) -> tuple[dict, dict]:
    from .checkpoints import save_pruned
    from .pruning import prune

    r = ctx.recipe
    p = r["prune"]
    res = prune(_student_module(ctx), r["data"]["train"], eval=r["data"]["val"] or r["data"]["eval"],
                ratio=p["ratio"], target_params=p["target_params"], target_latency=p["target_latency"],
                teacher=True if p["distill"] else None, finetune_epochs=p["finetune_epochs"], lr=float(p["lr"]),
                max_drop=float(p["max_drop"]), metric=r["quantize"]["metric"], seed=p["seed"], out=ctx.work / "report",
                quiet=ctx.quiet)
    ckpt = save_pruned(res.model, ctx.work / "student.pruned.pt", ratio=res.ratio, params=res.params_after)
    info = {k: v for k, v in res.to_dict().items() if k not in ("checkpoint", "onnx", "plot", "report_md")}
    return {"student": ckpt, "prune_tradeoff": res.plot}, {**info, "student_params": res.params_after}


# -- export

def _student_module(ctx: Ctx):
    from .checkpoints import load_student

    return load_student(ctx.recipe["student"]["factory"], ctx.artifacts["student"])


def _sample(r: Recipe, n: int = 2) -> np.ndarray:
    from .data import load_data

    ds = load_data(r["data"]["calib"])
    return np.ascontiguousarray(next(iter(ds.inputs.values()))[:n], dtype=np.float32)


def _export_run(ctx: Ctx) -> tuple[dict, dict]:
    from .onnx_export import export_onnx

    e = ctx.recipe["export"]
    out = ctx.work / "student.onnx"
    info = export_onnx(_student_module(ctx), _sample(ctx.recipe), out, opset=e["opset"], exporter=e["exporter"])
    return {"onnx_fp32": out}, {k: v for k, v in info.items() if k != "path"}


# -- quantize (the gate)

def _quantize_run(ctx: Ctx) -> tuple[dict, dict]:
    from .quantization import quantize

    q = ctx.recipe["quantize"]
    res = quantize(ctx.artifacts["onnx_fp32"], ctx.recipe["data"]["calib"], ctx.recipe["data"]["eval"],
                   max_drop=float(q["max_drop"]), metric=q["metric"], method=q["method"], target="onnx", out=None,
                   metric_options=q["metric_options"],
                   batch=q["batch"], work_dir=ctx.work / "work", quiet=ctx.quiet,
                   calibrations=tuple(q["calibrations"]), recovery_steps=q["recovery_steps"],
                   name=ctx.recipe.name, version=ctx.recipe.version)
    chosen = res.artifacts["onnx"]
    out = ctx.work / "student.int8.onnx"
    shutil.copyfile(chosen, out)
    shutil.rmtree(ctx.work / "work", ignore_errors=True)  # the candidates are large and never reused
    target = res.report["targets"]["onnx"]
    precision = "fp32" if target["int8"] is None else "int8"
    return {"onnx_int8": out}, {"chosen": res.chosen["onnx"], "reason": res.decisions["onnx"].reason,
                                "precision": precision, "report": res.report}


# -- tflite

def _tflite_run(ctx: Ctx) -> tuple[dict, dict]:
    from .data import load_data
    from .tflite_export import export_tflite_int8

    r = ctx.recipe
    out = ctx.work / "student.int8.tflite"
    # Gated on accuracy in the evaluate step, so a new budget re-checks it without re-exporting.
    export_tflite_int8(_student_module(ctx), _sample(r, 1), load_data(r["data"]["calib"]), out,
                       int8_io=r["tflite"]["int8_io"], quiet=ctx.quiet)
    return {"tflite_int8": out}, {"int8_io": r["tflite"]["int8_io"]}


# -- evaluate

def _onnx_params(path: Path) -> int:
    import onnx

    m = onnx.load(str(path))
    return int(sum(int(np.prod(i.dims)) for i in m.graph.initializer
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)))


def _evaluate_run(ctx: Ctx) -> tuple[dict, dict]:
    from . import evaluate as ev
    from . import report as rp
    from .data import load_data

    r = ctx.recipe
    evald = load_data(r["data"]["eval"])
    teacher_path = r["teacher"]["onnx"]
    teacher_params = None
    if teacher_path is None:
        from .onnx_export import export_onnx

        tm = _teacher_model(r)
        teacher_params = int(sum(p.numel() for p in tm.parameters()))
        teacher_path = export_onnx(tm, _sample(r), ctx.work / "teacher.onnx")["path"]
    else:
        teacher_path = Path(teacher_path)
    student_params = (ctx.infos.get("prune") or ctx.infos["distill"])["student_params"]
    rows = [("teacher", "teacher (fp32 ONNX)", teacher_path, teacher_params or _onnx_params(teacher_path)),
            ("student_fp32", "student fp32 (ONNX)", ctx.artifacts["onnx_fp32"], student_params),
            ("student_int8_onnx", f"student {ctx.infos['quantize']['precision']} ONNX", ctx.artifacts["onnx_int8"],
             student_params)]
    if "tflite_int8" in ctx.artifacts:
        rows.append(("student_int8_tflite", "student int8 TFLite", ctx.artifacts["tflite_int8"], student_params))
    teacher_out = ev.predict(teacher_path, evald)
    metric = ev.choose_metric(teacher_out.shape, evald.labels is not None, r["quantize"]["metric"])
    threads = r["evaluate"]["threads"] or max(1, min(4, os.cpu_count() or 1))
    repeats = r["evaluate"]["repeats"]
    table = []
    for key, label, path, params in rows:
        out = teacher_out if key == "teacher" else ev.predict(path, evald)
        value = ev.metric_value(metric, out, labels=evald.labels, reference=teacher_out,
                                options=r["quantize"]["metric_options"])
        table.append({
            "id": key, "model": label, "file": Path(path).name, "params": params, "size": Path(path).stat().st_size,
            "latency_ms_b1": ev.measure_latency(path, evald.inputs, threads=1, batch=1, repeats=repeats),
            "latency_ms_b32": ev.measure_latency(path, evald.inputs, threads=threads, batch=32,
                                                 repeats=max(5, repeats // 3)),
            "metric": metric, "value": value, "points": ev.to_points(metric, value, reference=teacher_out)})
    t_points = table[0]["points"]
    for row in table:
        row["drop_vs_teacher"] = round(t_points - row["points"], 4)
        row["drop_vs_fp32"] = round(table[1]["points"] - row["points"], 4)
    budget = float(r["quantize"]["max_drop"])
    tfl = next((t for t in table if t["id"] == "student_int8_tflite"), None)
    if tfl is not None and tfl["drop_vs_fp32"] > budget:
        # The ONNX model went through the quantize gate; the TFLite one is held to the same budget here.
        raise AccuracyBudgetError(f"TFLite int8 loses {tfl['drop_vs_fp32']:.2f} {metric} points against the fp32 "
                                  f"student ({tfl['points']:.2f} vs {table[1]['points']:.2f}), over the budget of "
                                  f"{budget:g}; no package written — raise [quantize] max_drop or set "
                                  "[tflite] enabled = false")
    plots = {}
    short = {"teacher": "teacher", "student_fp32": "fp32", "student_int8_onnx": "int8 ONNX",
             "student_int8_tflite": "int8 TFLite"}
    plots["accuracy_latency"] = rp.plot_scatter(
        ctx.work / "accuracy_latency.png",
        [{"name": short.get(t["id"], t["id"]), "latency": t["latency_ms_b1"], "points": t["points"]} for t in table],
        x="latency", y="points", title=f"{r.name}: {metric} vs batch-1 latency (1 thread)",
        xlabel="median latency, batch 1 (ms)", ylabel=f"{metric} (points)",
        highlight=short.get(table[-1]["id"], table[-1]["id"]))
    plots["size"] = rp.plot_bars(ctx.work / "size.png", [t["model"] for t in table],
                                 [t["size"] / 1024 for t in table], title="file size", ylabel="KiB",
                                 highlight=[table[-1]["model"]])
    cands = [c for c in ctx.infos["quantize"]["report"]["targets"]["onnx"]["candidates"]
             if c.get("error") is None and c.get("duplicate_of") is None and c.get("points") is not None]
    if cands:
        plots["quantize_candidates"] = rp.plot_scatter(
            ctx.work / "quantize_candidates.png",
            [{"name": c["name"], "latency": c["latency_b1_ms"], "points": c["points"]} for c in cands],
            x="latency", y="points", highlight=ctx.infos["quantize"]["chosen"],
            title="ONNX int8 candidates (the quantize gate)", xlabel="median latency, batch 1 (ms)",
            ylabel=f"{metric} (points)")
    from .report import machine_info

    info = {"metric": metric, "eval_samples": len(evald), "threads_b32": threads, "table": table,
            "machine": machine_info()}
    return {**plots}, info


# -- package

def _spec(s, quant=None) -> dict:
    shape = ["batch" if i == 0 else (d if isinstance(d, int) and d >= 0 else -1) for i, d in enumerate(s.shape)]
    d = {"name": s.name, "dtype": s.dtype, "shape": shape}
    if quant:
        d["quantization"] = {"scale": quant["scale"], "zero_point": quant["zero_point"]}
    return d


def _package_run(ctx: Ctx) -> tuple[dict, dict]:
    from .. import package as pkgmod
    from . import evaluate as ev
    from .data import load_data
    from .distillation import teacher_hash

    r = ctx.recipe
    table = {row["id"]: row for row in ctx.infos["evaluate"]["table"]}
    fp32 = ev.OnnxModel(ctx.artifacts["onnx_fp32"])
    files = {"model.onnx": str(ctx.artifacts["onnx_int8"])}
    q = ctx.infos["quantize"]
    variants = [{"id": f"onnx-{q['precision']}", "file": "model.onnx", "runtime": "onnxruntime",
                 "precision": q["precision"], "default": True,
                 "metrics": _variant_metrics(table["student_int8_onnx"]),
                 "inputs": [_spec(s) for s in fp32.inputs], "outputs": [_spec(s) for s in fp32.outputs]}]
    if "tflite_int8" in ctx.artifacts:
        files["model.tflite"] = str(ctx.artifacts["tflite_int8"])
        tm = ev.TfliteModel(ctx.artifacts["tflite_int8"])
        variants.append({"id": "tflite-int8", "file": "model.tflite", "runtime": "tflite", "precision": "int8",
                         "default": False, "metrics": _variant_metrics(table["student_int8_tflite"]),
                         "inputs": [_spec(s, qq) for s, qq in zip(tm.inputs, tm.quantization("inputs"))],
                         "outputs": [_spec(s, qq) for s, qq in zip(tm.outputs, tm.quantization("outputs"))]})
    evald = load_data(r["data"]["eval"])
    labels = r[""]["labels"] or (list(evald.label_names) if evald.label_names else None)
    example = np.ascontiguousarray(next(iter(evald.inputs.values()))[:1], dtype=np.float32)
    d = ctx.infos["distill"]
    teacher_file = r["teacher"]["onnx"] or r["teacher"]["weights"]
    provenance = {
        "recipe": r.path.name,
        "teacher": {"file": Path(teacher_file).name,
                    "sha256": teacher_hash(teacher_file) if r["teacher"]["onnx"] else teacher_hash(_teacher_model(r)),
                    "params": table["teacher"]["params"]},
        "distillation": {**d["params"], "best_epoch": d["best_epoch"], "stopped": d["stopped"]},
        "quantization": {"onnx": {"method": q["report"]["method"], "candidate": q["chosen"], "reason": q["reason"],
                                  "calibration_samples": q["report"]["targets"]["onnx"]["calibration_samples"],
                                  "max_drop": q["report"]["max_drop"]}},
    }
    if "tflite" in ctx.infos:
        provenance["quantization"]["tflite"] = {"method": "static", "tool": "litert-torch PT2E",
                                                "calibration_samples": len(load_data(r["data"]["calib"])),
                                                "drop": table["student_int8_tflite"]["drop_vs_fp32"],
                                                "int8_io": ctx.infos["tflite"]["int8_io"]}
    report = {"kind": "recipe", "model": r.name, "version": r.version, "metric": ctx.infos["evaluate"]["metric"],
              "table": ctx.infos["evaluate"]["table"], "machine": ctx.infos["evaluate"]["machine"],
              "distill": {k: v for k, v in d.items() if k != "history"}, "quantize": q["report"]}
    from .refstats import compute_reference_stats

    # What the model was built for, for on-device drift monitoring (fp32 student on calib + eval).
    # With field data the model is built for the mixed set too: its share of field inputs is in the reference.
    ref_data = [r["data"]["calib"], r["data"]["eval"]]
    if "train_data" in ctx.artifacts:
        ref_data.append(ctx.artifacts["train_data"])
        report["field"] = {"data": ctx.infos.get("field_data"), "gate": ctx.infos.get("field_gate")}
        fi = ctx.infos.get("field_data") or {}
        provenance["field"] = {k: fi.get(k) for k in ("field_train", "field_holdout", "mix", "devices", "versions",
                                                      "period")}
    stats = compute_reference_stats(ctx.artifacts["onnx_fp32"], ref_data, labels=labels,
                                    preprocess=r[""]["preprocess"])
    out = ctx.work / f"{r.name}-{r.version}.edgepkg"
    pkgmod.build(out, files, name=r.name, version=r.version, inputs=[_spec(s) for s in fp32.inputs],
                 outputs=[_spec(s) for s in fp32.outputs], preprocess=r[""]["preprocess"],
                 labels=labels, example_input=example, report=report, provenance=provenance, variants=variants,
                 reference_stats=stats, signing_key=r["package"]["signing_key"])
    return {"package": out}, {"variants": [v["id"] for v in variants]}


def _variant_metrics(row: Mapping) -> dict:
    return {row["metric"]: row["value"], "points": row["points"], "latency_ms_b1": row["latency_ms_b1"],
            "latency_ms_b32": row["latency_ms_b32"], "size": row["size"]}


# -- field data (#22): the fleet's labelled samples, mixed in before distill and gated on after evaluate

def _field_enabled(r: Recipe) -> bool:
    return r["field"]["data"] is not None


def _field_options(r: Recipe) -> dict:
    return {k: v for k, v in r["field"].items() if k not in ("data", "serving")}


def _field_files(r: Recipe) -> list:
    from ..fielddata import sidecar_paths

    f = r["field"]
    if f["data"] is None:
        return []
    prov = sidecar_paths(f["data"])["provenance"]
    return [f["data"], f["serving"], *([prov] if prov.is_file() else [])]


def _load_field(r: Recipe, names: list[str]) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """The field export: its arrays (renamed to the original data's input names), labels, split, provenance."""
    from ..errors import DataError
    from ..fielddata import load_field_provenance
    from .data import load_data

    path = r["field"]["data"]
    ds = load_data(path)
    if ds.labels is None:
        raise DataError(f"{path}: field data has no labels; export it with edgeship fleet export-feedback")
    prov = load_field_provenance(path)
    rows = prov["samples"]
    if len(rows) != len(ds.labels):
        raise DataError(f"{path}: {len(ds.labels)} samples but its provenance lists {len(rows)}; export again")
    if len(ds.inputs) != len(names):
        raise DataError(f"{path}: {len(ds.inputs)} input arrays, the original data has {len(names)}")
    arrays = {n: np.asarray(a) for n, a in zip(names, ds.inputs.values())}
    split = np.asarray([row.get("split") == "holdout" for row in rows])
    return arrays, np.asarray(ds.labels, dtype=np.int64), split, prov


def _field_data_run(ctx: Ctx) -> tuple[dict, dict]:
    from ..errors import DataError
    from . import field as fd
    from .data import load_data

    r = ctx.recipe
    f = r["field"]
    orig = load_data(r["data"]["train"])
    if orig.labels is None:
        raise DataError(f"{r['data']['train']}: mixing field data needs labels in the original training data")
    names = list(orig.inputs)
    arrays, labels, held, prov = _load_field(r, names)
    for n in names:
        if arrays[n].shape[1:] != orig.inputs[n].shape[1:]:
            raise DataError(f"{f['data']}: field input {n!r} has samples of shape {arrays[n].shape[1:]}, the original "
                            f"data {orig.inputs[n].shape[1:]}; was it exported from another model?")
        arrays[n] = arrays[n].astype(orig.inputs[n].dtype, copy=False)
    keys = fd.row_keys(arrays)
    train_idx = np.flatnonzero(~held)
    hold_idx = np.flatnonzero(held)
    dropped = 0
    if f["dedup"]:
        # An input already in the original training set adds nothing, and a held-out one must not be learnt from:
        # neither a held-out device's nor one of the original test set, which the field gate judges on (a device
        # that meets the data the model was built from sends test-set inputs back, as the demo's devices do).
        test = load_data(r["data"]["eval"])
        exclude = set(fd.row_keys(orig.inputs)) | {keys[i] for i in hold_idx}
        if set(test.inputs) == set(names):
            exclude |= set(fd.row_keys({n: test.inputs[n].astype(orig.inputs[n].dtype, copy=False) for n in names}))
        keep, dropped = fd.dedup([keys[i] for i in train_idx], exclude=exclude)
        train_idx = train_idx[keep]
    # The epoch distill keeps is the best on its validation data: the original val set alone would pick it for
    # the original data only (and 200 samples of it tie at 98-99 % from about the fifth epoch, so the pick is
    # noise for the field). A share of the distinct field training samples validates instead of training; fixed
    # before max_samples, so every point of a samples curve is chosen on the same samples.
    val_idx = np.zeros(0, dtype=np.int64)
    if f["val_share"] and float(f["mix"]) > 0 and len(train_idx) >= 10:
        cut = np.random.default_rng([f["seed"], 1]).permutation(len(train_idx))
        k = int(round(f["val_share"] * len(train_idx)))
        val_idx, train_idx = np.sort(train_idx[cut[:k]]), np.sort(train_idx[cut[k:]])
    if f["max_samples"]:
        rng = np.random.default_rng(f["seed"])
        if len(train_idx) > f["max_samples"]:
            train_idx = np.sort(rng.choice(train_idx, size=f["max_samples"], replace=False))
    pick = train_idx[fd.mix(len(orig), len(train_idx), float(f["mix"]), seed=f["seed"])]
    mixed = {n: np.concatenate([orig.inputs[n], arrays[n][pick]]) for n in names}
    mixed["labels"] = np.concatenate([np.asarray(orig.labels, dtype=np.int64), labels[pick]])
    train_out = ctx.work / "train_mixed.npz"
    np.savez(train_out, **mixed)
    hold_out = ctx.work / "field_holdout.npz"
    np.savez(hold_out, **{n: arrays[n][hold_idx] for n in names}, labels=labels[hold_idx])
    made = {"train_data": train_out, "field_holdout": hold_out}
    if len(val_idx):
        made["val_data"] = _field_val(r, names, arrays, labels, val_idx, ctx.work / "val_mixed.npz")
    rows = prov["samples"]
    info = {"original": len(orig), "field_samples": len(labels), "field_train": int(len(train_idx)),
            "field_train_rows": int(len(pick)), "field_holdout": int(len(hold_idx)), "duplicates_dropped": dropped,
            "field_val": int(len(val_idx)),
            "mix": float(f["mix"]), "train_total": int(len(mixed["labels"])),
            "devices": sorted({row["device"] for row in rows}), "holdout_devices": prov.get("holdout_devices", []),
            "versions": sorted({str(row.get("model_version")) for row in rows}),
            "period": [min(row["ts"] for row in rows), max(row["ts"] for row in rows)] if rows else None}
    return made, info


def _field_val(r: Recipe, names: list[str], arrays: dict, labels: np.ndarray, idx: np.ndarray, out: Path) -> Path:
    """The original validation data (when it has labels and the same inputs) plus the field validation samples."""
    from .data import load_data

    parts = {n: [arrays[n][idx]] for n in names}
    ys = [labels[idx]]
    if r["data"]["val"]:
        v = load_data(r["data"]["val"])
        if v.labels is not None and set(v.inputs) == set(names):
            for n in names:
                parts[n].insert(0, np.asarray(v.inputs[n]).astype(arrays[n].dtype, copy=False))
            ys.insert(0, np.asarray(v.labels, dtype=np.int64))
    np.savez(out, **{n: np.concatenate(p) for n, p in parts.items()}, labels=np.concatenate(ys))
    return out


def _serving_model(path: str, work: Path) -> Path:
    """The serving package's default ONNX model as a file (a plain .onnx path is used as is)."""
    from .. import package as pkgmod

    if str(path).endswith(".onnx"):
        return Path(path)
    pkg = pkgmod.open_package(path)
    variants = pkg.manifest.get("variants") or []
    member = next((v["file"] for v in variants if v.get("default") and str(v.get("file", "")).endswith(".onnx")),
                  "model.onnx")
    out = work / "serving.onnx"
    out.write_bytes(pkgmod.read_verified(pkg, member))
    return out


def _field_gate_run(ctx: Ctx) -> tuple[dict, dict]:
    from . import evaluate as ev
    from . import field as fd
    from .data import load_data

    r = ctx.recipe
    f = r["field"]
    serving = _serving_model(f["serving"], ctx.work)
    new = ctx.artifacts["onnx_int8"]
    orig = load_data(r["data"]["eval"])
    held = load_data(ctx.artifacts["field_holdout"])

    def points(model, data) -> float:
        return 100.0 * ev.top1(ev.predict(model, data), data.labels)

    verdict = fd.field_verdict(original_new=points(new, orig), original_serving=points(serving, orig),
                               field_new=points(new, held) if len(held) else 0.0,  # the verdict refuses 0 samples
                               field_serving=points(serving, held) if len(held) else 0.0,
                               min_gain=float(f["min_gain"]), max_regress=float(f["max_regress"]),
                               field_samples=len(held), original_samples=len(orig))
    info = {**verdict.to_dict(), "serving": Path(f["serving"]).name, "min_gain": f["min_gain"],
            "max_regress": f["max_regress"]}
    if not verdict.ok:
        # No package: and an earlier run's package at the same path would now look like this run's result.
        r.package_path.unlink(missing_ok=True)
        r.out_dir.mkdir(parents=True, exist_ok=True)
        (r.out_dir / "field_gate.json").write_text(json.dumps(info, indent=1))
        raise AccuracyBudgetError(f"field gate: {verdict.reason}; no package written")
    return {}, info


def _sec(name: str) -> Callable[[Recipe], dict]:
    return lambda r: dict(r[name])


STEPS: tuple[Step, ...] = (
    Step("distill", needs=(), optional_needs=("train_data", "val_data"), makes=("student", "learning_curve"),
         options=lambda r: {"distill": dict(r["distill"]), "student": r["student"]["factory"].rpartition(":")[2],
                            "teacher": r["teacher"]["factory"] and r["teacher"]["factory"].rpartition(":")[2]},
         files=lambda r: [*_teacher_files(r), _factory_file(r["student"]["factory"]), r["data"]["train"],
                          r["data"]["val"]],
         run=_distill_run),
    Step("export_onnx", needs=("student",), makes=("onnx_fp32",),
         options=lambda r: {"export": dict(r["export"]), "student": r["student"]["factory"].rpartition(":")[2]},
         files=lambda r: [_factory_file(r["student"]["factory"]), r["data"]["calib"]], run=_export_run),
    Step("quantize", needs=("onnx_fp32",), makes=("onnx_int8",), options=_sec("quantize"),
         files=lambda r: [r["data"]["calib"], r["data"]["eval"]], run=_quantize_run),
    Step("tflite", needs=("student",), makes=("tflite_int8",),
         options=lambda r: {"tflite": dict(r["tflite"]), "student": r["student"]["factory"].rpartition(":")[2]},
         files=lambda r: [_factory_file(r["student"]["factory"]), r["data"]["calib"]],
         run=_tflite_run, enabled=lambda r: bool(r["tflite"]["enabled"])),
    Step("evaluate", needs=("onnx_fp32", "onnx_int8"), optional_needs=("tflite_int8",),
         makes=("accuracy_latency", "size", "quantize_candidates"),
         options=lambda r: {"evaluate": dict(r["evaluate"]), "metric": r["quantize"]["metric"],
                            "max_drop": r["quantize"]["max_drop"],
                            "name": r.name, "teacher": r["teacher"]["factory"]
                            and r["teacher"]["factory"].rpartition(":")[2]},
         files=lambda r: [*_teacher_files(r), r["data"]["eval"], r["data"]["calib"]], run=_evaluate_run,
         uses_info=True),
    Step("package", needs=("onnx_fp32", "onnx_int8"), optional_needs=("tflite_int8", "train_data"),
         makes=("package",),
         options=lambda r: {"top": {k: v for k, v in r[""].items() if k != "out_dir"},
                            "teacher": r["teacher"]["factory"] and r["teacher"]["factory"].rpartition(":")[2]},
         files=lambda r: [r["package"]["signing_key"], *_teacher_files(r), r["data"]["eval"], r["data"]["calib"]],
         run=_package_run, uses_info=True, version=2),
)

#: Inserted after ``distill`` only when the recipe's ``[prune]`` asks for it (see :func:`_with_optional`),
#: so a recipe without pruning plans exactly :data:`STEPS`.
PRUNE_STEP = Step("prune", needs=("student",), makes=("student", "prune_tradeoff"),
                  options=lambda r: {"prune": dict(r["prune"]), "metric": r["quantize"]["metric"],
                                     "student": r["student"]["factory"].rpartition(":")[2]},
                  files=lambda r: [_factory_file(r["student"]["factory"]), r["data"]["train"], r["data"]["val"],
                                   r["data"]["eval"]],
                  run=_prune_run, enabled=_prune_enabled)


#: Inserted only when the recipe has a ``[field]`` section (#22): the field export mixed into training before
#: ``distill``, and the gate against the serving model between ``evaluate`` and ``package``.
FIELD_DATA_STEP = Step("field_data", needs=(), makes=("train_data", "field_holdout", "val_data"),
                       options=_field_options,
                       files=lambda r: [r["data"]["train"], r["data"]["eval"], r["data"]["val"], *_field_files(r)],
                       run=_field_data_run, enabled=_field_enabled)
FIELD_GATE_STEP = Step("field_gate", needs=("onnx_int8", "field_holdout"), makes=(),
                       options=_field_options, files=lambda r: [r["data"]["eval"], *_field_files(r)],
                       run=_field_gate_run, enabled=_field_enabled)


def _insert(steps: tuple[Step, ...], step: Step, *, after: str | None = None, before: str | None = None
            ) -> tuple[Step, ...]:
    names = [s.name for s in steps]
    i = names.index(after) + 1 if after in names else names.index(before) if before in names else len(steps)
    return (*steps[:i], step, *steps[i:])


def _with_optional(steps: tuple[Step, ...], recipe: Recipe) -> tuple[Step, ...]:
    """:data:`STEPS` plus the optional steps this recipe asks for; a plain recipe plans exactly STEPS."""
    if _prune_enabled(recipe):
        steps = _insert(steps, PRUNE_STEP, after="distill")
    if _field_enabled(recipe):
        steps = _insert(_insert(steps, FIELD_DATA_STEP, before="distill"), FIELD_GATE_STEP, before="package")
    return steps

# --------------------------------------------------------------------------- the engine

@dataclasses.dataclass
class StepRun:
    """One step in a run or a plan: ``status`` is ran / reused / skipped, or would run / would reuse (dry run)."""

    name: str
    key: str
    status: str
    seconds: float | None = None
    folder: Path | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RecipeResult:
    """What :func:`run_recipe` did (or, with ``dry_run``, would do)."""

    recipe: Path
    out_dir: Path
    steps: list[StepRun]
    dry_run: bool
    package: Path | None = None
    report_md: Path | None = None
    table: list[dict] = dataclasses.field(default_factory=list)
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def step(self, name: str) -> StepRun:
        return next(s for s in self.steps if s.name == name)

    def plan_text(self) -> str:
        width = max(len(s.name) for s in self.steps)
        lines = [f"plan for {self.recipe} (outputs in {self.out_dir}):"]
        for s in self.steps:
            extra = f"  {s.seconds:.1f} s" if s.seconds is not None else ""
            lines.append(f"  {s.name:<{width}}  {s.status:<11}  key {s.key[:12]}{extra}")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.dry_run:
            return self.plan_text()
        from .report import fmt

        lines = [self.plan_text(), ""]
        for row in self.table:
            lines.append(f"  {row['model']:<24} {row['metric']} {fmt(row['value'], 4):<7} "
                         f"b1 {fmt(row['latency_ms_b1'])} ms  b32 {fmt(row['latency_ms_b32'])} ms  "
                         f"{row['size'] / 1024:.1f} KiB  {row['params']:,} params")
        gate = next((s.info for s in self.steps if s.name == "field_gate" and s.info), None)
        if gate:
            lines += ["", f"field gate: {gate['reason']}"]
        lines += ["", f"package: {self.package}", f"report:  {self.report_md}", f"took {self.seconds:.1f} s"]
        return "\n".join(lines)


class _Hasher:
    """sha256 of files, memoised by (path, size, mtime) for one run."""

    def __init__(self) -> None:
        self._memo: dict[tuple, str] = {}

    def file(self, path) -> str:
        p = Path(path)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(str(f.relative_to(p)).encode())
                h.update(self.file(f).encode())
            return h.hexdigest()
        st = p.stat()
        k = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if k not in self._memo:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            self._memo[k] = h.hexdigest()
        return self._memo[k]


def _step_key(step: Step, recipe: Recipe, upstream: Mapping[str, str], hasher: _Hasher) -> str:
    files = sorted({str(f) for f in step.files(recipe) if f})
    payload = {"step": step.name, "version": step.version, "options": step.options(recipe),
               "files": [hasher.file(f) for f in files], "upstream": dict(sorted(upstream.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _load_done(folder: Path) -> dict | None:
    f = folder / _STEP_FILE
    if not f.is_file():
        return None
    try:
        done = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not all((folder / rel).exists() for rel in done.get("artifacts", {}).values()):
        return None
    return done


def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="recipe", unit="step", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def run_recipe(path, *, dry_run: bool = False, quiet: bool = False, steps: tuple[Step, ...] | None = None
               ) -> RecipeResult:
    """Run (or plan, with ``dry_run``) the recipe at ``path``; returns a :class:`RecipeResult`.

    Raises :class:`RecipeError` for an invalid recipe (naming the key and
    line), and whatever a step raises (:class:`AccuracyBudgetError` when the
    int8 models miss the budget — no package is written then).
    """
    t0 = time.monotonic()
    recipe = load_recipe(path)
    steps = _with_optional(STEPS, recipe) if steps is None else steps
    out_dir = recipe.out_dir
    cache = out_dir / _CACHE
    hasher = _Hasher()
    producer: dict[str, str] = {}        # artifact -> key of the step that makes it
    artifacts: dict[str, Path] = {}
    infos: dict[str, dict] = {}
    runs: list[StepRun] = []
    active = [s for s in steps if s.enabled(recipe)]
    bar = None if dry_run else _progress(len(active), quiet)
    try:
        for step in steps:
            if not step.enabled(recipe):
                runs.append(StepRun(step.name, "-", "skipped"))
                continue
            missing = [a for a in step.needs if a not in producer]
            if missing:
                raise ConversionError(f"step {step.name} needs {', '.join(missing)}, which no earlier step makes")
            upstream = {a: producer[a] for a in (*step.needs, *step.optional_needs) if a in producer}
            if step.uses_info:  # e.g. evaluate, package: their output depends on every earlier step
                upstream.update({f"step:{r.name}": r.key for r in runs if r.status != "skipped"})
            key = _step_key(step, recipe, upstream, hasher)
            folder = cache / f"{step.name}-{key[:16]}"
            done = _load_done(folder)
            for a in step.makes:
                producer[a] = key
            if dry_run:
                runs.append(StepRun(step.name, key, "would reuse" if done else "would run", folder=folder))
                continue
            if done is None:
                if bar is not None:
                    bar.set_description(f"recipe: {step.name}")
                t = time.monotonic()
                tmp = folder.with_name(folder.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                ctx = Ctx(recipe=recipe, artifacts=artifacts, infos=infos, work=tmp, quiet=quiet)
                try:
                    made, info = step.run(ctx)
                except EdgeshipError:
                    raise
                except Exception as exc:  # a step's third-party failure: name the step, keep the cause
                    raise ConversionError(f"recipe step {step.name} failed: {type(exc).__name__}: "
                                          f"{' '.join(str(exc).split())[:300]}") from exc
                rel = {a: str(Path(p).resolve().relative_to(tmp.resolve())) for a, p in made.items() if p}
                done = {"step": step.name, "key": key, "artifacts": rel, "info": info,
                        "seconds": round(time.monotonic() - t, 2)}
                (tmp / _STEP_FILE).write_text(json.dumps(done, indent=1, default=json_default), encoding="utf-8")
                shutil.rmtree(folder, ignore_errors=True)
                # Renamed only when complete: an interrupted step is never mistaken for a cached one.
                os.replace(tmp, folder)
                status = "ran"
            else:
                status = "reused"
            for a, rel_path in done["artifacts"].items():
                artifacts[a] = folder / rel_path
            infos[step.name] = done["info"]
            runs.append(StepRun(step.name, key, status, seconds=done.get("seconds") if status == "ran" else None,
                                folder=folder, info=done["info"]))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result = RecipeResult(recipe=recipe.path, out_dir=out_dir, steps=runs, dry_run=dry_run)
    if dry_run:
        return result
    result.artifacts = dict(artifacts)
    result.package = _publish(recipe, artifacts)
    result.table = infos.get("evaluate", {}).get("table", [])
    result.seconds = round(time.monotonic() - t0, 2)
    result.report_md = _write_report(recipe, result, infos)
    return result


_PUBLISHED = {"student": "student.pt", "onnx_fp32": "student.onnx", "onnx_int8": "student.int8.onnx",
              "tflite_int8": "student.int8.tflite"}


def _publish(recipe: Recipe, artifacts: Mapping[str, Path]) -> Path | None:
    """Copy the user-facing artifacts out of the cache into ``out_dir`` (the package last, atomically)."""
    out = recipe.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for a, name in _PUBLISHED.items():
        if a in artifacts:
            shutil.copyfile(artifacts[a], out / name)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for a in ("learning_curve", "accuracy_latency", "size", "quantize_candidates", "prune_tradeoff"):
        if a in artifacts:
            shutil.copyfile(artifacts[a], plots / f"{a}.png")
    if "package" not in artifacts:
        return None
    dst = recipe.package_path
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    shutil.copyfile(artifacts["package"], tmp)
    os.replace(tmp, dst)
    return dst


def _write_report(recipe: Recipe, result: RecipeResult, infos: Mapping[str, dict]) -> Path:
    from . import report as rp

    out = recipe.out_dir
    sections = []
    ev = infos.get("evaluate", {})
    if ev:
        rows = [{**t, "params": f"{t['params']:,}", "size_kib": f"{t['size'] / 1024:.1f}",
                 "latency_ms_b1": f"{t['latency_ms_b1']:.4g}", "latency_ms_b32": f"{t['latency_ms_b32']:.4g}",
                 "value": f"{t['value']:.4f}", "drop_vs_teacher": f"{t['drop_vs_teacher']:+.2f}"}
                for t in ev["table"]]
        metric = ev["metric"]
        sections.append(("Models", "\n".join([
            f"All models on the same {ev['eval_samples']} held-out samples. Latency: median ms on this machine, "
            f"batch 1 on 1 thread, batch 32 on {ev['threads_b32']} threads.", "",
            rp.markdown_table(rows, ["model", "params", "size_kib", "latency_ms_b1", "latency_ms_b32", "value",
                                     "drop_vs_teacher"],
                              ["model", "parameters", "file size (KiB)", "latency b1 (ms)", "latency b32 (ms)",
                               metric, "drop vs teacher (pt)"])])))
    d = infos.get("distill")
    if d:
        p = d["params"]
        sections.append(("Distillation", "\n".join([
            f"alpha {p['alpha']}, temperature {p['temperature']}, {len(d['history'])} of {p['epochs']} epochs "
            f"({d['stopped']}), best epoch {d['best_epoch']}; held-out {d['metric']} {rp.fmt(d['best_val'], 4)} "
            f"(teacher {rp.fmt(d['teacher_val'], 4)}); {p['train_samples']} training samples; teacher logits "
            f"{'reused from the cache' if d['teacher_cache_hit'] else 'computed and cached'}.", "",
            "![learning curve](plots/learning_curve.png)"])))
    q = infos.get("quantize")
    if q:
        body = [f"**{q['chosen']}** ({q['precision']}): {q['reason']}"]
        if (out / "plots" / "quantize_candidates.png").is_file():
            body += ["", "![quantize candidates](plots/quantize_candidates.png)"]
        sections.append(("Quantization gate", "\n".join(body)))
    tfl = next((t for t in ev.get("table", []) if t["id"] == "student_int8_tflite"), None)
    if tfl is not None:
        io = "int8" if infos["tflite"]["int8_io"] else "float"
        sections.append(("TFLite int8", f"litert-torch PT2E full-integer export ({io} input/output): "
                                        f"{tfl['points']:.2f} {tfl['metric']} points, "
                                        f"{tfl['drop_vs_fp32']:.2f} pt below the fp32 student (budget "
                                        f"{recipe['quantize']['max_drop']:g} pt)."))
    fi, fg = infos.get("field_data"), infos.get("field_gate")
    if fi:
        sections.append(("Field data", (
            f"{fi['field_samples']} labelled field samples from {len(fi['devices'])} devices (versions "
            f"{', '.join(fi['versions'])}); {fi['field_holdout']} held out from devices "
            f"{', '.join(fi['holdout_devices']) or '-'}; {fi['field_train']} distinct training samples "
            f"({fi['duplicates_dropped']} duplicates dropped) make up {100 * fi['mix']:.0f}% of "
            f"{fi['train_total']} training rows next to {fi['original']} original ones; "
            f"{fi.get('field_val', 0)} more validate, with the original validation data, the epoch distill keeps.")))
    if fg:
        rows = [{"set": f"original test set ({fg['original_samples']})", "new": f"{fg['original_new']:.2f}",
                 "serving": f"{fg['original_serving']:.2f}",
                 "diff": f"{fg['original_new'] - fg['original_serving']:+.2f}",
                 "rule": f"may lose at most {fg['max_regress']:g} pt"},
                {"set": f"held-out field set ({fg['field_samples']})", "new": f"{fg['field_new']:.2f}",
                 "serving": f"{fg['field_serving']:.2f}", "diff": f"{fg['field_new'] - fg['field_serving']:+.2f}",
                 "rule": f"must gain more than {fg['min_gain']:g} pt"}]
        sections.append(("Field gate", "\n".join([
            f"New int8 model vs the serving one ({fg['serving']}), top-1 points: "
            f"{'passed' if fg['ok'] else 'FAILED'} — {fg['reason']}", "",
            rp.markdown_table(rows, ["set", "new", "serving", "diff", "rule"],
                              ["data", "new", "serving", "difference (pt)", "rule"])])))
    if ev:
        sections.append(("Plots", "![accuracy vs latency](plots/accuracy_latency.png)\n\n![file size](plots/size.png)"))
    sections.append(("Steps", "\n".join(f"- {s.name}: {s.status}" + (f" ({s.seconds:.1f} s)" if s.seconds else "")
                                        + (f", cache `{s.folder.name}`" if s.folder else "") for s in result.steps)))
    if result.package:
        sections.append(("Package", f"`{result.package}` (signed; variants: "
                                    f"{', '.join(infos.get('package', {}).get('variants', []))})"))
    if ev:
        sections.append(("Machine", "\n".join(f"- {k}: {rp.fmt(v)}" for k, v in ev["machine"].items())))
    return rp.write_markdown(out / "report.md", f"Conversion report: {recipe.name} {recipe.version}", sections)
