"""Knowledge distillation: train a small student on a teacher's softened outputs.

``distill(teacher, student, data)`` minimises, per batch,

    alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, y) [+ hint_weight · MSE(proj(f_s), f_t)]

(Hinton et al.: the KL of the student's softened distribution from the
teacher's, scaled by T² so its gradients keep the size of the hard-label
term). With ``alpha=1`` no labels are needed: pure soft-target distillation.

* The teacher is a torch module or an ``.onnx`` file (run by onnxruntime —
  users often only have the exported teacher). Its logits (and hint
  features) are computed once and cached on disk under
  ``cache_dir/teacher-<teacher hash>-<data hash>.npz``, so re-runs and
  sweeps never recompute them.
* ``hint_layer`` adds a feature loss on a named intermediate module
  (FitNets); a learned projection maps the student's features to the
  teacher's width when they differ.
* Per epoch: a tqdm bar with loss and the held-out metric (top-1 against
  labels, else agreement with the teacher), early stopping on that metric,
  the best weights restored at the end; a learning-curve PNG.
* A non-finite loss stops training at once: the student keeps the last good
  weights (written to ``out_dir/student.pt``) and :class:`ConversionError`
  says where it diverged.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConversionError, DataError, ModelError
from .checkpoints import load_factory, load_student, save_checkpoint
from .data import Dataset, load_data

__all__ = ["distill", "distill_files", "DistillResult", "teacher_hash", "data_hash", "kd_loss", "TeacherOutputs"]


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` produced.

    ``student`` holds the best weights (by held-out metric, or training loss
    without held-out data); ``history`` one dict per finished epoch
    (``epoch, loss, kd, ce, hint, val_metric``); ``stopped`` is
    ``"epochs"`` or ``"early_stopping"``.
    """

    student: object
    history: list[dict]
    metric: str | None
    best_epoch: int
    best_val: float | None
    stopped: str
    teacher_cache: Path | None
    teacher_cache_hit: bool
    checkpoint: Path | None
    curve_png: Path | None
    seconds: float
    teacher_val: float | None = None
    params: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        val = "" if self.best_val is None else f", held-out {self.metric} {self.best_val:.4f}"
        teach = "" if self.teacher_val is None else f" (teacher {self.teacher_val:.4f})"
        return (f"distilled {len(self.history)} epochs ({self.stopped}); best epoch {self.best_epoch}{val}{teach}; "
                f"teacher logits {'reused from' if self.teacher_cache_hit else 'cached in'} {self.teacher_cache}")


# --------------------------------------------------------------------------- pure pieces

def kd_loss(student_logits, teacher_logits, labels, *, alpha: float, temperature: float):
    """(total, kd, ce) for one batch; ``labels`` may be None only when ``alpha == 1``."""
    import torch.nn.functional as F

    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    if alpha >= 1.0 or labels is None:
        return alpha * kd, kd, None
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def _sha_arrays(h, arrays: Mapping[str, np.ndarray]) -> None:
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())


def data_hash(data: Dataset) -> str:
    """sha256 of the input arrays (names, dtypes, shapes, bytes); labels do not change teacher outputs."""
    h = hashlib.sha256()
    _sha_arrays(h, dict(data.inputs))
    return h.hexdigest()


def teacher_hash(teacher) -> str:
    """sha256 of an ONNX file's bytes, or of a torch module's structure and weights."""
    h = hashlib.sha256()
    if isinstance(teacher, (str, os.PathLike)):
        with open(teacher, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h.update(repr(teacher).encode())
    _sha_arrays(h, {k: v.detach().cpu().numpy() for k, v in teacher.state_dict().items()})
    return h.hexdigest()


# --------------------------------------------------------------------------- the teacher

@dataclasses.dataclass
class TeacherOutputs:
    logits: np.ndarray
    features: np.ndarray | None = None


def _as_dataset(data, what: str) -> Dataset:
    """Anything load_data takes, or a torch Dataset yielding ``x`` or ``(x, y)``."""
    if data is None:
        raise DataError(f"no {what} given")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(
            data, (str, os.PathLike, np.ndarray, Mapping, Dataset)):
        xs, ys = [], []
        for i in range(len(data)):
            item = data[i]
            if isinstance(item, (tuple, list)):
                xs.append(np.asarray(item[0], dtype=np.float32))
                if len(item) > 1:
                    ys.append(int(item[1]))
            else:
                xs.append(np.asarray(item, dtype=np.float32))
        if not xs:
            raise DataError(f"{what}: the torch Dataset is empty")
        if ys and len(ys) != len(xs):
            raise DataError(f"{what}: some samples have labels and some do not")
        return Dataset(inputs={"input": np.stack(xs)}, labels=np.asarray(ys, dtype=np.int64) if ys else None,
                       source=f"<{type(data).__name__}>")
    ds = load_data(data)
    for name, arr in ds.inputs.items():
        if np.asarray(arr).dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{what} {ds.source}: input {name!r} holds NaN/inf values; clean those samples")
    return ds


class _TeacherRunner:
    """Runs a torch or ONNX teacher in batches, optionally capturing a hint layer's output."""

    def __init__(self, teacher, hint_layer: str | None) -> None:
        self.teacher = teacher
        self.hint_layer = hint_layer
        self.is_onnx = isinstance(teacher, (str, os.PathLike))
        if self.is_onnx:
            if not Path(teacher).is_file():
                raise ModelError(f"{teacher}: no such teacher model file")
            if hint_layer is not None:
                raise ConversionError("hint_layer needs a torch teacher (an ONNX teacher's intermediate layers "
                                      "are not exposed); pass the torch module or drop hint_layer")
            from .evaluate import OnnxModel

            self.model = OnnxModel(teacher)
        elif hasattr(teacher, "forward") and hasattr(teacher, "parameters"):
            self.model = teacher.eval()
        else:
            raise ConversionError(f"the teacher is a {type(teacher).__name__}; give a torch module or an .onnx file")

    def run(self, data: Dataset, batch: int = 256) -> TeacherOutputs:
        logits, feats = [], []
        names = list(data.inputs)
        for i in range(0, len(data), batch):
            chunk = [np.ascontiguousarray(data.inputs[n][i:i + batch], dtype=np.float32) for n in names]
            if self.is_onnx:
                specs = self.model.inputs
                if len(specs) != len(chunk):
                    raise DataError(f"the ONNX teacher has {len(specs)} inputs but the data has {len(chunk)} arrays")
                out = self.model.run({s.name: c for s, c in zip(specs, chunk)})[0]
                logits.append(np.asarray(out, dtype=np.float32))
            else:
                out, f = _forward_with_hint(self.model, chunk, self.hint_layer, grad=False)
                logits.append(out.detach().cpu().numpy())
                if f is not None:
                    feats.append(f.detach().cpu().numpy())
        return TeacherOutputs(np.concatenate(logits), np.concatenate(feats) if feats else None)


def _named_module(model, name: str):
    mods = dict(model.named_modules())
    if name not in mods:
        sample = ", ".join(n for n in list(mods)[1:12])
        raise ConversionError(f"hint layer {name!r} is not a module of {type(model).__name__} "
                              f"(its modules: {sample}, ...)")
    return mods[name]


def _forward_with_hint(model, arrays, hint_layer: str | None, *, grad: bool):
    """``model(*inputs)`` plus the output of module ``hint_layer`` (None when no hint)."""
    import torch

    tensors = [a if isinstance(a, torch.Tensor) else torch.from_numpy(a) for a in arrays]
    captured = {}
    handle = None
    if hint_layer is not None:
        def hook(_mod, _inp, out):
            captured["f"] = out
        handle = _named_module(model, hint_layer).register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            out = model(*tensors)
    finally:
        if handle is not None:
            handle.remove()
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out, captured.get("f")


def _teacher_outputs(runner: _TeacherRunner, data: Dataset, cache_dir: Path, thash: str,
                     hint: str | None) -> tuple[TeacherOutputs, Path, bool]:
    key = f"teacher-{thash[:16]}-{data_hash(data)[:16]}" + (f"-hint-{hashlib.sha1(hint.encode()).hexdigest()[:8]}"
                                                           if hint else "")
    path = cache_dir / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                out = TeacherOutputs(z["logits"], z["features"] if "features" in z.files else None)
            if len(out.logits) == len(data):
                return out, path, True
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache entry is recomputed and overwritten below
    out = runner.run(data)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {"logits": out.logits}
    if out.features is not None:
        arrays["features"] = out.features
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return out, path, False


# --------------------------------------------------------------------------- hint projection

def _make_projection(student_feat, teacher_feat):
    """Identity when shapes match; 1x1 conv when only channels differ; else a linear map of the flattened features."""
    import torch

    s, t = tuple(student_feat.shape[1:]), tuple(teacher_feat.shape[1:])
    if s == t:
        return None
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return torch.nn.Conv2d(s[0], t[0], kernel_size=1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(s)), int(np.prod(t))))


# --------------------------------------------------------------------------- plotting

def _plot_curve(path: Path, history: list[dict], metric: str | None) -> Path:
    from .report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if metric and any(h.get("val_metric") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("val_metric") for h in history], color="tab:red", label=f"held-out {metric}")
        ax2.set_ylabel(f"held-out {metric}")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax.set_title("distillation learning curve")
    return _save(fig, path)


# --------------------------------------------------------------------------- the loop

def _progress(total: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="distill", unit="epoch", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def distill(teacher, student, data, *, val=None, alpha: float = 0.7, temperature: float = 4.0, epochs: int = 30,
            lr: float = 2e-3, batch_size: int = 64, seed: int = 0, early_stopping: int | None = 10,
            hint_layer: str | Sequence[str] | None = None, hint_weight: float = 1.0, weight_decay: float = 0.0,
            cache_dir=None, out_dir=None, quiet: bool = False) -> DistillResult:
    """Train ``student`` (torch module, modified in place) to imitate ``teacher``.

    ``teacher``: torch module or ``.onnx`` path. ``data``/``val``: a ``.npz``
    (``labels`` optional) / ``.npy`` / image folder / arrays / a torch
    Dataset; inputs are what the models take (already preprocessed).
    ``early_stopping``: patience in epochs without a better held-out metric
    (None = off). ``hint_layer``: a module name in both models, or
    ``(teacher_layer, student_layer)``. ``cache_dir``: where teacher outputs
    are cached (default ``out_dir/cache`` or a temporary folder).
    ``out_dir``: where ``student.pt`` and ``learning_curve.png`` go.

    Raises :class:`DataError` (no labels while ``alpha < 1``, NaN inputs),
    :class:`ConversionError` (teacher/student output shapes differ, a
    non-finite loss).
    """
    import torch

    t0 = time.monotonic()
    if not 0.0 <= alpha <= 1.0:
        raise ConversionError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ConversionError(f"temperature must be > 0, got {temperature}")
    if epochs < 1 or batch_size < 1:
        raise ConversionError(f"epochs and batch_size must be >= 1 (got {epochs}, {batch_size})")
    if not (hasattr(student, "parameters") and hasattr(student, "forward")):
        raise ConversionError(f"the student is a {type(student).__name__}; give a torch.nn.Module")
    train = _as_dataset(data, "training data")
    if alpha < 1.0 and train.labels is None:
        raise DataError(f"training data {train.source} has no labels but alpha={alpha:g} asks for cross-entropy "
                        f"on them; add labels (an array named 'labels' or class folders) or set alpha=1.0 for "
                        "pure soft-target distillation")
    valset = _as_dataset(val, "validation data") if val is not None else None
    if isinstance(hint_layer, str):
        t_hint = s_hint = hint_layer
    elif hint_layer is not None:
        t_hint, s_hint = hint_layer
    else:
        t_hint = s_hint = None

    out_dir = Path(out_dir) if out_dir is not None else None
    own_tmp = None
    if cache_dir is None:
        if out_dir is not None:
            cache_dir = out_dir / "cache"
        else:
            own_tmp = tempfile.TemporaryDirectory(prefix="edgeship-distill-")
            cache_dir = Path(own_tmp.name)
    cache_dir = Path(cache_dir)
    try:
        return _distill(teacher, student, train, valset, alpha=alpha, temperature=temperature, epochs=epochs,
                        lr=lr, batch_size=batch_size, seed=seed, early_stopping=early_stopping, t_hint=t_hint,
                        s_hint=s_hint, hint_weight=hint_weight, weight_decay=weight_decay, cache_dir=cache_dir,
                        out_dir=out_dir, quiet=quiet, t0=t0, torch=torch)
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


def _distill(teacher, student, train: Dataset, valset: Dataset | None, *, alpha, temperature, epochs, lr,
             batch_size, seed, early_stopping, t_hint, s_hint, hint_weight, weight_decay, cache_dir: Path,
             out_dir: Path | None, quiet, t0, torch) -> DistillResult:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    runner = _TeacherRunner(teacher, t_hint)
    thash = teacher_hash(teacher)
    t_train, cache_path, hit = _teacher_outputs(runner, train, cache_dir, thash, t_hint)
    t_val = _teacher_outputs(runner, valset, cache_dir, thash, None)[0] if valset is not None else None

    names = list(train.inputs)
    x_train = [torch.from_numpy(np.ascontiguousarray(train.inputs[n], dtype=np.float32)) for n in names]
    y_train = torch.from_numpy(train.labels.astype(np.int64)) if train.labels is not None else None
    tl_train = torch.from_numpy(t_train.logits.astype(np.float32))
    tf_train = torch.from_numpy(t_train.features.astype(np.float32)) if t_train.features is not None else None

    # Shapes must agree before any training: a student with the wrong head is a config error, not a NaN later.
    student.train()
    probe, probe_feat = _forward_with_hint(student, [x[:2] for x in x_train], s_hint, grad=False)
    if tuple(probe.shape[1:]) != tuple(t_train.logits.shape[1:]):
        raise ConversionError(f"teacher outputs {tuple(t_train.logits.shape[1:])} per sample but the student outputs "
                              f"{tuple(probe.shape[1:])}; give the student the teacher's output size "
                              f"(e.g. {t_train.logits.shape[-1]} classes)")
    if valset is not None and list(valset.inputs) != names and len(valset.inputs) != len(names):
        raise DataError(f"validation data has inputs {list(valset.inputs)} but the training data has {names}")
    projection = None
    if s_hint is not None:
        if probe_feat is None or tf_train is None:
            raise ConversionError(f"hint layer {s_hint!r} produced no output in the student; pick a module that "
                                  "runs in forward()")
        projection = _make_projection(probe_feat, tf_train[:2])
    params = list(student.parameters()) + (list(projection.parameters()) if projection is not None else [])
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    metric = None
    x_val = y_val = None
    if valset is not None:
        x_val = [np.ascontiguousarray(valset.inputs[n], dtype=np.float32) for n in valset.inputs]
        y_val = valset.labels
        metric = "top1" if y_val is not None else "agreement"
    teacher_val = None
    if t_val is not None:
        ref = y_val if y_val is not None else t_val.logits.argmax(1)
        teacher_val = float(np.mean(t_val.logits.argmax(1) == ref))

    def evaluate_val() -> float | None:
        if x_val is None:
            return None
        student.eval()
        preds = []
        with torch.no_grad():
            for i in range(0, len(x_val[0]), 512):
                preds.append(student(*[torch.from_numpy(x[i:i + 512]) for x in x_val]).argmax(1).numpy())
        student.train()
        pred = np.concatenate(preds)
        ref = y_val if y_val is not None else t_val.logits.argmax(1)
        return float(np.mean(pred == ref))

    ckpt = (out_dir / "student.pt") if out_dir is not None else None
    history: list[dict] = []
    best_state = copy.deepcopy(student.state_dict())
    best_score, best_epoch, since_best = -math.inf, 0, 0
    stopped = "epochs"
    n = len(train)
    bar = _progress(epochs, quiet)
    try:
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n, generator=gen)
            sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "hint": 0.0}
            for b, i in enumerate(range(0, n, batch_size)):
                idx = perm[i:i + batch_size]
                out, feat = _forward_with_hint(student, [x[idx] for x in x_train], s_hint, grad=True)
                loss, kd, ce = kd_loss(out, tl_train[idx], None if y_train is None else y_train[idx],
                                       alpha=alpha, temperature=temperature)
                hint = None
                if s_hint is not None:
                    f = projection(feat) if projection is not None else feat
                    hint = torch.nn.functional.mse_loss(f.reshape(len(idx), -1), tf_train[idx].reshape(len(idx), -1))
                    loss = loss + hint_weight * hint
                if not torch.isfinite(loss):
                    student.load_state_dict(best_state)
                    good = f"epoch {best_epoch}" if best_epoch else "the initial weights"
                    where = "in the student"
                    if ckpt is not None:
                        save_checkpoint(ckpt, student, epoch=best_epoch, metric=metric,
                                         value=None if best_score == -math.inf else best_score)
                        where = f"in {ckpt}"
                    raise ConversionError(f"training diverged: the loss became {loss.item()} at epoch {epoch}, "
                                          f"batch {b + 1}; stopped and kept the last good weights ({good}) {where}"
                                          f" — lower the learning rate (lr={lr:g}) or check the data")
                opt.zero_grad()
                loss.backward()
                opt.step()
                k = len(idx)
                sums["loss"] += loss.item() * k
                sums["kd"] += kd.item() * k
                sums["ce"] += (ce.item() if ce is not None else 0.0) * k
                sums["hint"] += (hint.item() if hint is not None else 0.0) * k
            row = {"epoch": epoch, **{key: v / n for key, v in sums.items()}, "val_metric": evaluate_val()}
            history.append(row)
            # Without held-out data the best epoch is the one with the lowest training loss.
            score = row["val_metric"] if row["val_metric"] is not None else -row["loss"]
            if score > best_score:
                best_score, best_epoch, since_best = score, epoch, 0
                best_state = copy.deepcopy(student.state_dict())
                if ckpt is not None:
                    save_checkpoint(ckpt, student, epoch=epoch, metric=metric, value=row["val_metric"])
            else:
                since_best += 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", **({metric: f"{row['val_metric']:.4f}"} if metric else {}))
            bar.update(1)
            if early_stopping is not None and since_best >= early_stopping:
                stopped = "early_stopping"
                break
    finally:
        bar.close()
    student.load_state_dict(best_state)
    student.eval()
    curve = _plot_curve(out_dir / "learning_curve.png", history, metric) if out_dir is not None else None
    return DistillResult(student=student, history=history, metric=metric, best_epoch=best_epoch,
                         best_val=history[best_epoch - 1]["val_metric"] if best_epoch else None, stopped=stopped,
                         teacher_cache=cache_path, teacher_cache_hit=hit,
                         checkpoint=ckpt, curve_png=curve,
                         seconds=round(time.monotonic() - t0, 2), teacher_val=teacher_val,
                         params={"alpha": alpha, "temperature": temperature, "epochs": epochs, "lr": lr,
                                 "batch_size": batch_size, "seed": seed, "early_stopping": early_stopping,
                                 "hint_layer": [t_hint, s_hint] if s_hint else None, "teacher_sha256": thash,
                                 "train_samples": n, "val_samples": len(valset) if valset is not None else 0})


def distill_files(teacher: str, student: str, data, *, teacher_weights=None, out_dir, hint_layer: str | None = None,
                  **kwargs) -> DistillResult:
    """:func:`distill` from file specs (what ``edgeship convert distill`` takes).

    ``teacher``: an ``.onnx`` path, or ``file.py:Factory`` with
    ``teacher_weights`` (a state dict); ``student``: ``file.py:Factory``;
    ``hint_layer``: ``"name"`` or ``"teacher_name,student_name"``.
    """
    if str(teacher).lower().endswith(".onnx"):
        if teacher_weights is not None:
            raise ConversionError("--teacher-weights is for a torch teacher (file.py:Factory), not an .onnx file")
        teacher_model = teacher
    else:
        if teacher_weights is None:
            raise ConversionError(f"the torch teacher {teacher} needs its weights (a state dict .pt file); "
                                  "or give the exported teacher .onnx")
        teacher_model = load_student(teacher, teacher_weights)
    student_model = load_factory(student)()
    hint = tuple(h.strip() for h in hint_layer.split(",")) if hint_layer and "," in hint_layer else hint_layer
    return distill(teacher_model, student_model, data, out_dir=out_dir, hint_layer=hint, **kwargs)
