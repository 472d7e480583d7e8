"""Structured (channel) pruning by magnitude, fine-tuning, and the accuracy gate.

``prune(model, data, ratio=0.5, eval=...)`` removes whole output channels of
convolutions and rows of linear layers — the ones with the smallest L1 norm
— and the matching input channels of the next layer, so the result is a
smaller *dense* model that every runtime runs faster (no sparse kernels
needed). It then fine-tunes the pruned model (with knowledge distillation
from the unpruned model when ``teacher`` is given) and holds it to the same
accuracy gate as quantization: the drop against the unpruned model, in
points of the metric, must stay within ``max_drop`` or
:class:`~edgeship.errors.AccuracyBudgetError` is raised.

Scope: ``torch.nn.Sequential`` models (nested Sequentials are flattened) —
the CNN/MLP chains a student usually is. Between a pruned layer and the
next Conv/Linear only per-channel layers may sit (activations, BatchNorm —
pruned along —, pooling, dropout, ``Flatten``); a layer whose channels
feed anything else (the last layer, a depthwise conv, an unknown module)
is left whole. Residual models need a dependency graph and are refused
with a clear error rather than pruned wrongly.

How much to prune: ``ratio`` (fraction of channels removed in each pruned
layer), ``target_params`` (fraction of parameters to remove; the ratio is
found by bisection on the exact count) or ``target_latency`` (fraction of
batch-1 latency to remove, measured with onnxruntime on candidate
structures). ``sweep`` adds pruning ratios to the trade-off plot
(accuracy, size, latency over the ratio), each fine-tuned the same way.

A pruned checkpoint (``checkpoints.save_pruned``) records its layer shapes, so
``checkpoints.load_pruned`` and ``checkpoints.load_student`` can rebuild the
smaller model from the original factory.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import AccuracyBudgetError, ConversionError, DataError
from ._layers import PASSTHROUGH
from ._layers import layer_kind as _kind
from ._layers import torch_module as _torch
from .checkpoints import save_pruned

__all__ = ["prune", "PruneResult", "plan", "prune_structure", "channel_scores", "ratio_for_params", "count_params",
           "PASSTHROUGH"]

def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- structure

def _leaves(model) -> list[tuple[object, str, object]]:
    """(parent, attribute name, module) of every layer of a (nested) Sequential, in forward order."""
    nn = _torch().nn
    if not isinstance(model, nn.Sequential):
        raise ConversionError(f"prune supports torch.nn.Sequential models (a chain of layers); got "
                              f"{type(model).__name__} — wrap the layers in nn.Sequential or prune by hand")
    out = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            out.extend(_leaves(m))
        else:
            out.append((model, name, m))
    return out


@dataclasses.dataclass(frozen=True)
class Group:
    """One prunable layer: ``producer`` (leaf index) loses output channels; ``bns`` follow it; ``consumer`` loses inputs."""

    producer: int
    bns: tuple[int, ...]
    consumer: int
    flattened: bool          # a Flatten sits between: the consumer sees channels x spatial positions
    channels: int


def plan(model) -> list[Group]:
    """Which layers can lose output channels, and which layers follow them (pure: looks, never changes)."""
    leaves = _leaves(model)
    groups = []
    for i, (_, _, m) in enumerate(leaves):
        if _kind(m) not in ("conv", "linear"):
            continue
        channels = m.out_channels if _kind(m) == "conv" else m.out_features
        bns, flattened, consumer = [], False, None
        for j in range(i + 1, len(leaves)):
            k = _kind(leaves[j][2])
            if k == "pass":
                continue
            if k == "bn" and leaves[j][2].num_features == channels:
                bns.append(j)
                continue
            if k == "flatten" and _kind(m) == "conv":
                flattened = True
                continue
            if k in ("conv", "linear"):
                c = leaves[j][2]
                fan_in = c.in_channels if k == "conv" else c.in_features
                if (not flattened and fan_in == channels) or (flattened and k == "linear" and fan_in % channels == 0):
                    consumer = j
            break
        if consumer is not None and channels > 1:
            groups.append(Group(i, tuple(bns), consumer, flattened, channels))
    return groups


def channel_scores(layer) -> np.ndarray:
    """L1 norm of each output channel's weights (conv filter / linear row): the magnitude criterion."""
    w = layer.weight.detach().cpu().numpy()
    return np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)


def _keep_count(channels: int, ratio: float) -> int:
    return max(1, int(round(channels * (1.0 - ratio))))


def prune_structure(model, ratio: float, *, groups: Sequence[Group] | None = None):
    """A pruned copy of ``model`` (no training): ``ratio`` of the channels of every prunable layer removed."""
    torch = _torch()
    nn = torch.nn
    if not 0.0 <= ratio < 1.0:
        raise ConversionError(f"pruning ratio must be in [0, 1), got {ratio}")
    new = copy.deepcopy(model).eval()
    groups = plan(new) if groups is None else groups
    leaves = _leaves(new)
    out_keep: dict[int, np.ndarray] = {}
    in_keep: dict[int, np.ndarray] = {}
    for g in groups:
        layer = leaves[g.producer][2]
        k = _keep_count(g.channels, ratio)
        keep = np.sort(np.argsort(-channel_scores(layer), kind="stable")[:k])
        out_keep[g.producer] = keep
        for b in g.bns:
            out_keep[b] = keep
        if g.flattened:
            c = leaves[g.consumer][2]
            per = c.in_features // g.channels
            in_keep[g.consumer] = (keep[:, None] * per + np.arange(per)[None, :]).ravel()
        else:
            in_keep[g.consumer] = keep
    with torch.no_grad():
        for i, (parent, name, m) in enumerate(leaves):
            if i not in out_keep and i not in in_keep:
                continue
            o = torch.as_tensor(out_keep[i]) if i in out_keep else None
            n = torch.as_tensor(in_keep[i]) if i in in_keep else None
            m2 = copy.deepcopy(m)
            kind = _kind(m)
            if kind == "bn":
                m2.num_features = len(o)
                for attr in ("weight", "bias"):
                    if getattr(m, attr) is not None:
                        setattr(m2, attr, nn.Parameter(getattr(m, attr)[o].clone()))
                for attr in ("running_mean", "running_var"):
                    if getattr(m, attr) is not None:
                        setattr(m2, attr, getattr(m, attr)[o].clone())
            else:
                w = m.weight
                if o is not None:
                    w = w[o]
                if n is not None:
                    w = w[:, n]
                m2.weight = nn.Parameter(w.clone())
                if m.bias is not None:
                    m2.bias = nn.Parameter((m.bias[o] if o is not None else m.bias).clone())
                if kind == "conv":
                    m2.out_channels, m2.in_channels = w.shape[0], w.shape[1]
                else:
                    m2.out_features, m2.in_features = w.shape[0], w.shape[1]
            setattr(parent, name, m2)
    return new


def ratio_for_params(model, target: float, *, tol: float = 0.005) -> float:
    """The smallest channel ratio that removes at least ``target`` of the parameters (bisection on exact counts)."""
    if not 0.0 < target < 1.0:
        raise ConversionError(f"target_params must be a fraction in (0, 1), got {target}")
    groups = plan(model)
    if not groups:
        raise ConversionError("this model has no layer that can be pruned (see the edgeship.converters.pruning docs)")
    base = count_params(model)
    hi_model = prune_structure(model, 0.99, groups=groups)
    if 1 - count_params(hi_model) / base < target:
        raise ConversionError(f"pruning cannot remove {target:.0%} of the parameters of this model (at most "
                              f"{1 - count_params(hi_model) / base:.0%}: the unprunable layers hold the rest)")
    lo, hi = 0.0, 0.99
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if 1 - count_params(prune_structure(model, mid, groups=groups)) / base >= target:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


# --------------------------------------------------------------------------- training and measuring

def _outputs(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    torch = _torch()
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy())
    return np.concatenate(outs)


def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def finetune(model, x: np.ndarray, y: np.ndarray | None, *, teacher=None, epochs: int = 10, lr: float = 1e-3,
             batch_size: int = 64, alpha: float = 0.7, temperature: float = 4.0, seed: int = 0,
             quiet: bool = True, desc: str = "fine-tune") -> list[float]:
    """Train ``model`` in place: cross-entropy, or distillation from ``teacher`` (a torch module); returns epoch losses."""
    torch = _torch()
    from .distillation import kd_loss

    if epochs <= 0:
        return []
    torch.manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    tlog = torch.from_numpy(_outputs(teacher, x)) if teacher is not None else None
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = _progress(epochs, quiet, desc)
    try:
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            total, nb = 0.0, 0
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                out = model(xt[idx])
                if tlog is not None:
                    loss, _, _ = kd_loss(out, tlog[idx], yt[idx] if yt is not None else None,
                                         alpha=alpha if yt is not None else 1.0, temperature=temperature)
                else:
                    loss = torch.nn.functional.cross_entropy(out, yt[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach())
                nb += 1
            losses.append(total / max(nb, 1))
            bar.update(1)
    finally:
        bar.close()
    model.eval()
    return losses


def _export(model, sample: np.ndarray, path: Path, exporter: str = "auto") -> Path:
    from .onnx_export import export_onnx

    export_onnx(model, sample, path, exporter=exporter)
    return path


def _latency(path: Path, sample: np.ndarray, repeats: int) -> dict:
    from . import evaluate as ev

    feed = {"input": sample}
    return {"b1": ev.measure_latency(path, feed, threads=1, batch=1, repeats=repeats, max_seconds=2.0),
            "b32": ev.measure_latency(path, feed, threads=1, batch=32, repeats=max(5, repeats // 3), max_seconds=2.0)}


def _ratio_for_latency(model, target: float, sample: np.ndarray, work: Path, base_b1: float, repeats: int,
                       exporter: str) -> tuple[float, list[dict]]:
    if not 0.0 < target < 1.0:
        raise ConversionError(f"target_latency must be a fraction of latency to remove in (0, 1), got {target}")
    goal = base_b1 * (1.0 - target)
    tried = []
    for r in np.round(np.arange(0.1, 0.95, 0.1), 2):
        cand = prune_structure(model, float(r))
        p = _export(cand, sample, work / f"latency-{r:.2f}.onnx", exporter)
        lat = _latency(p, sample, repeats)["b1"]
        tried.append({"ratio": float(r), "latency_ms_b1": lat})
        if lat <= goal:
            return float(r), tried
    raise ConversionError(f"no pruning ratio up to 0.9 removes {target:.0%} of the batch-1 latency "
                          f"({base_b1:.3f} ms -> best {min(t['latency_ms_b1'] for t in tried):.3f} ms); "
                          "the fixed costs dominate — try a ratio or target_params instead")


# --------------------------------------------------------------------------- the entry point

@dataclasses.dataclass
class PruneResult:
    """A pruned, fine-tuned model and what it cost/gained against the unpruned one."""

    model: object
    ratio: float
    metric: str
    points_before: float
    points_after: float
    drop: float
    params_before: int
    params_after: int
    latency_ms: dict            # {"before": {"b1", "b32"}, "after": {...}}
    size_before: int | None
    size_after: int | None
    sweep: list[dict]
    history: list[float]
    checkpoint: Path | None = None
    onnx: Path | None = None
    plot: Path | None = None
    report_md: Path | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lb, la = self.latency_ms["before"]["b1"], self.latency_ms["after"]["b1"]
        lines = [f"pruned {self.ratio:.0%} of the channels: params {self.params_before:,} -> {self.params_after:,} "
                 f"({1 - self.params_after / self.params_before:.0%} fewer)",
                 f"{self.metric}: {self.points_before:.2f} -> {self.points_after:.2f} points (drop {self.drop:.2f})",
                 f"latency b1 (1 thread): {lb:.3f} -> {la:.3f} ms (x{lb / la:.2f})"]
        if self.size_before and self.size_after:
            lines.append(f"ONNX size: {self.size_before / 1024:.1f} -> {self.size_after / 1024:.1f} KiB")
        for k in ("checkpoint", "onnx", "plot", "report_md"):
            if getattr(self, k):
                lines.append(f"{k}: {getattr(self, k)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("ratio", "metric", "points_before", "points_after", "drop",
                                           "params_before", "params_after", "latency_ms", "size_before",
                                           "size_after", "sweep", "history", "seconds")}
        for k in ("checkpoint", "onnx", "plot", "report_md"):
            d[k] = str(getattr(self, k)) if getattr(self, k) else None
        return d


def _single_input(ds, what: str) -> np.ndarray:
    if len(ds.inputs) != 1:
        raise DataError(f"{what}: prune works on one-input models; got inputs {list(ds.inputs)}")
    return np.ascontiguousarray(next(iter(ds.inputs.values())), dtype=np.float32)


def _plot(path: Path, rows: list[dict], chosen: float, metric: str, title: str) -> Path:
    from .report import _plt, _save

    plt = _plt()
    rows = sorted(rows, key=lambda r: r["ratio"])
    xs = [r["ratio"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = [("points", f"{metric} (points)"), ("size_kib", "ONNX size (KiB)"), ("latency_ms_b1", "latency b1 (ms)")]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(xs, [r.get(key) for r in rows], marker="o")
        for r in rows:
            if abs(r["ratio"] - chosen) < 1e-9:
                ax.scatter([r["ratio"]], [r.get(key)], color="tab:red", marker="*", s=120, zorder=3)
        ax.set_xlabel("channels pruned per layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if rows and rows[0].get("points") is not None:
        axes[0].axhline(rows[0]["points"], color="tab:gray", linestyle="--", linewidth=1)
    fig.suptitle(title)
    fig.subplots_adjust(wspace=0.35)
    return _save(fig, path)


def prune(model, data, *, ratio: float | None = None, target_params: float | None = None,
          target_latency: float | None = None, teacher=None, eval=None, finetune_epochs: int = 10,  # noqa: A002
          lr: float = 1e-3, batch_size: int = 64, alpha: float = 0.7, temperature: float = 4.0,
          max_drop: float = 1.0, metric: str | None = None, sweep: Sequence[float] = (), out=None, seed: int = 0,
          repeats: int = 20, exporter: str = "auto", quiet: bool = False) -> PruneResult:
    """Prune ``model`` (an ``nn.Sequential``) by channel magnitude, fine-tune it, and gate on accuracy.

    ``data``: training data for fine-tuning (anything ``load_data`` takes;
    labels under ``labels``). ``eval``: held-out data for the gate (default:
    ``data``). Exactly one of ``ratio`` / ``target_params`` /
    ``target_latency``. ``teacher``: None (cross-entropy on labels), ``True``
    or ``"unpruned"`` (distil from the unpruned model), or a torch module.
    ``out``: a folder for ``pruned.pt``, ``pruned.onnx``, the trade-off plot
    and ``prune.report.md``. ``exporter``: passed to ``export_onnx``. Raises :class:`AccuracyBudgetError` when the
    pruned model loses more than ``max_drop`` points (the report is still
    written; the checkpoint and ONNX file are not).
    """
    from . import evaluate as ev
    from .data import load_data

    t0 = time.monotonic()
    given = [k for k, v in (("ratio", ratio), ("target_params", target_params), ("target_latency", target_latency))
             if v is not None]
    if len(given) != 1:
        raise ConversionError("give exactly one of ratio, target_params or target_latency "
                              f"(got {', '.join(given) or 'none'})")
    if max_drop < 0:
        raise ConversionError(f"max_drop must be >= 0 points, got {max_drop}")
    if finetune_epochs < 0:
        raise ConversionError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    train = load_data(data)
    x = _single_input(train, "training data")
    y = train.labels
    evald = load_data(eval) if eval is not None else train
    xe = _single_input(evald, "eval data")
    base = copy.deepcopy(model).eval()
    if not plan(base):
        raise ConversionError("this model has no layer that can be pruned: every Conv/Linear feeds the output or an "
                              "unsupported layer (see edgeship.converters.pruning)")
    if teacher is True or teacher == "unpruned":
        teacher_m = base
    elif teacher is None or teacher is False:
        teacher_m = None if y is not None else base  # no labels: the unpruned model is the only signal
    elif hasattr(teacher, "forward"):
        teacher_m = teacher.eval()
    else:
        raise ConversionError(f"teacher must be None, True/'unpruned' or a torch module, got {teacher!r}")
    if y is None and teacher_m is None:
        raise DataError("training data has no labels; give labels or a teacher")
    ref_out = _outputs(base, xe)
    metric = ev.choose_metric(ref_out.shape, evald.labels is not None, metric)

    def points(m) -> float:
        out_ = _outputs(m, xe)
        return ev.to_points(metric, ev.metric_value(metric, out_, labels=evald.labels, reference=ref_out),
                            reference=ref_out)

    import tempfile

    out_dir = Path(out) if out is not None else None
    work = Path(tempfile.mkdtemp(prefix="edgeship-prune-"))
    sample = np.ascontiguousarray(xe[:2])
    try:
        base_onnx = _export(base, sample, work / "unpruned.onnx", exporter)
        lat_before = _latency(base_onnx, sample, repeats)
        searched: list[dict] = []
        if target_params is not None:
            ratio = ratio_for_params(base, target_params)
        elif target_latency is not None:
            ratio, searched = _ratio_for_latency(base, target_latency, sample, work, lat_before["b1"], repeats,
                                                  exporter)
        p_before = points(base)

        def one(r: float) -> tuple[object, dict, list[float]]:
            m = prune_structure(base, r)
            hist = finetune(m, x, y, teacher=teacher_m, epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                            alpha=alpha, temperature=temperature, seed=seed, quiet=quiet, desc=f"fine-tune {r:.2f}")
            p = _export(m, sample, work / f"pruned-{r:.4f}.onnx", exporter)
            row = {"ratio": r, "params": count_params(m), "points": points(m), "size_kib": p.stat().st_size / 1024,
                   **{f"latency_ms_{k}": v for k, v in _latency(p, sample, repeats).items()}}
            return m, row, hist

        pruned, row, history = one(float(ratio))
        rows = [{"ratio": 0.0, "params": count_params(base), "points": p_before,
                 "size_kib": base_onnx.stat().st_size / 1024,
                 **{f"latency_ms_{k}": v for k, v in lat_before.items()}}, row]
        for r in sweep:
            if any(abs(r - q["ratio"]) < 1e-9 for q in rows):
                continue
            rows.append(one(float(r))[1])
        rows.sort(key=lambda r: r["ratio"])
        drop = round(p_before - row["points"], 4)
        result = PruneResult(model=pruned, ratio=float(ratio), metric=metric, points_before=p_before,
                             points_after=row["points"], drop=drop, params_before=count_params(base),
                             params_after=count_params(pruned),
                             latency_ms={"before": lat_before, "after": {"b1": row["latency_ms_b1"],
                                                                         "b32": row["latency_ms_b32"]}},
                             size_before=base_onnx.stat().st_size, size_after=int(row["size_kib"] * 1024),
                             sweep=rows, history=history)
        ok = drop <= max_drop
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            result.plot = _plot(out_dir / "prune_tradeoff.png", rows, float(ratio), metric,
                                f"pruning: {metric}, size and latency over the ratio ({finetune_epochs} "
                                f"fine-tune epochs{', distilled' if teacher_m is not None else ''})")
            if ok:
                result.checkpoint = save_pruned(pruned, out_dir / "pruned.pt", ratio=float(ratio),
                                                params=result.params_after, metric=metric, drop=drop)
                dst = out_dir / "pruned.onnx"
                os_tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                os_tmp.write_bytes((work / f"pruned-{float(ratio):.4f}.onnx").read_bytes())
                os.replace(os_tmp, dst)
                result.onnx = dst
            result.seconds = round(time.monotonic() - t0, 2)
            result.report_md = _write_report(out_dir, result, searched, max_drop=max_drop, ok=ok,
                                             eval_samples=len(evald), held_out=eval is not None)
        result.seconds = round(time.monotonic() - t0, 2)
        if not ok:
            raise AccuracyBudgetError(
                f"pruning {ratio:.0%} of the channels loses {drop:.2f} {metric} points (budget {max_drop:g}); "
                "prune less, fine-tune longer or distil from the unpruned model"
                + (f" (see {result.report_md})" if result.report_md else ""), results=result.to_dict())
        return result
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _write_report(out_dir: Path, res: PruneResult, searched: list[dict], *, max_drop: float, ok: bool,
                  eval_samples: int, held_out: bool) -> Path:
    from . import report as rp

    rows = [{**r, "chosen": "*" if abs(r["ratio"] - res.ratio) < 1e-9 else ""} for r in res.sweep]
    sections = [
        ("Result", "\n".join([
            f"- verdict: {'within' if ok else 'OVER'} the budget ({res.drop:.2f} of {max_drop:g} {res.metric} points)",
            f"- ratio: {res.ratio:.2%} of the channels of each prunable layer",
            f"- parameters: {res.params_before:,} -> {res.params_after:,}",
            f"- eval samples: {eval_samples} ({'held out' if held_out else 'the training data: no eval set given'})",
        ])),
        ("Trade-off", rp.markdown_table(rows, ["chosen", "ratio", "params", "points", "size_kib", "latency_ms_b1",
                                               "latency_ms_b32"],
                                        ["", "ratio", "params", f"{res.metric} (pt)", "ONNX KiB", "b1 ms", "b32 ms"])
         + "\n\n![trade-off](prune_tradeoff.png)"),
    ]
    if searched:
        sections.append(("Latency search", rp.markdown_table(searched, ["ratio", "latency_ms_b1"])))
    rp.write_json(out_dir / "prune.report.json", {**res.to_dict(), "ok": ok, "max_drop": max_drop,
                                                   "latency_search": searched})
    return rp.write_markdown(out_dir / "prune.report.md", "Pruning report", sections)
