"""Results: one :class:`Result` per request, one :class:`ResultBatch` per run of source rows.

The API path hands every caller a :class:`Result`. The source path never
builds per-sample objects: a :class:`ResultBatch` holds the output rows of
one source block's slice of a batch, with labels and scores computed for
all rows at once (one ``argmax``/softmax per batch), prediction ids as a
prefix + consecutive integers, and ``to_json_lines()`` formats all rows
with one string template. ``results()`` materialises per-sample
:class:`Result` objects for consumers that want them (callbacks).

Prediction ids are ``<run id>-<n>``: the run id is random per agent start,
``n`` counts up, so ids are unique per device and cheap to make.
"""
from __future__ import annotations

import json
import math
from itertools import chain
from typing import Any, Sequence

import numpy as np

__all__ = ["Result", "ResultBatch", "classify", "label_name"]


def label_name(labels: Sequence[str] | None, i: int) -> str:
    """The label of class ``i``, or its index as text when the package names fewer classes."""
    return labels[i] if labels and i < len(labels) else str(i)


_UNSET = object()


def _lazy(slot: str, doc: str) -> property:
    """A Result field that classifies the output on first read when it was left unset."""
    def get(self):
        if getattr(self, slot) is _UNSET:
            self._classify()
        return getattr(self, slot)

    def put(self, value) -> None:
        setattr(self, slot, value)

    return property(get, put, doc=doc)


class Result:
    """What the agent answers for one sample.

    ``label``, ``score`` and ``top`` of a classifier output may be left to be
    computed on first read (``labels=`` given, those three not): the batch
    runner then hands over the raw output row and the caller's own thread
    does the softmax, off the path of the next model call.
    """

    __slots__ = ("prediction_id", "outputs", "model", "latency_ms", "source", "ts", "_label", "_score", "_top",
                 "ref", "cached", "inputs", "_labels", "_post_spec", "_post")

    def __init__(self, prediction_id: str, outputs: dict[str, np.ndarray], model: dict, latency_ms: float,
                 source: str, ts: float, label: Any = _UNSET, score: Any = _UNSET, top: Any = _UNSET,
                 ref: str | None = None, cached: bool = False, inputs: dict | None = None, *,
                 labels: Sequence[str] | None = None, post: dict | None = None) -> None:
        self.prediction_id = prediction_id
        self.outputs = outputs
        self.model = model
        self.latency_ms = latency_ms
        self.source = source
        self.ts = ts
        self._label = label
        self._score = score
        self._top = top
        self.ref = ref
        self.cached = cached
        self.inputs = inputs  # the preprocessed input, only when a component asks (wants_inputs)
        self._labels = labels
        self._post_spec = post  # the package's postprocess hook, run on first read (caller's thread)
        self._post = None

    @property
    def post(self) -> dict | None:
        """The package's ``postprocess`` answer for this sample (labels, detections or a mask), or None."""
        if self._post is None and self._post_spec is not None:
            from ..runtime.postprocess import apply  # noqa: PLC0415 - only models that declare a hook

            self._post = apply(self._post_spec, self.outputs, self._labels)
        return self._post

    def _classify(self) -> None:
        post = self.post
        if post is not None:
            self._label, self._score, self._top = post.get("label"), post.get("score"), post.get("top")
            return
        label = score = top = None
        if len(self.outputs) == 1:
            row = next(iter(self.outputs.values()))
            cls = classify(np.asarray(row)[None]) if np.ndim(row) == 1 else None
            if cls is not None:
                label = label_name(self._labels, int(cls[0][0]))
                score = float(cls[1][0])
                top = _top(row, self._labels)
        self._label, self._score, self._top = label, score, top

    label = _lazy("_label", "label: str | None")
    score = _lazy("_score", "score: float | None")
    top = _lazy("_top", "top: list[tuple[str, float]] | None (up to 5 (label, probability) pairs)")

    def __repr__(self) -> str:
        return (f"Result(prediction_id={self.prediction_id!r}, label={self.label!r}, score={self.score!r}, "
                f"model={self.model!r}, latency_ms={self.latency_ms!r}, source={self.source!r})")

    def to_dict(self, outputs: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"prediction_id": self.prediction_id, "source": self.source, "ts": self.ts,
                             "model": self.model, "latency_ms": self.latency_ms}
        if self.ref is not None:
            d["ref"] = self.ref
        if self.label is not None:
            d["label"] = self.label
            d["score"] = self.score
            d["top"] = [[lab, s] for lab, s in (self.top or [])]
        post = self.post
        if post is not None:
            skip = ("label", "score", "top") if self.label is not None else ()  # a CTC text keeps its score
            d.update({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in post.items()
                      if k not in skip})
        if outputs or (self.label is None and post is None):
            d["outputs"] = {k: np.asarray(v).tolist() for k, v in self.outputs.items()}
        if self.cached:
            d["cached"] = True
        return d


def classify(out: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(argmax index, score) per row of a (n, classes) output; None when it is not a classifier output.

    Scores are probabilities: the output itself when rows already sum to 1,
    else its softmax (logits).
    """
    if out.ndim != 2 or out.shape[1] < 2 or not np.issubdtype(out.dtype, np.floating):
        return None
    if out.shape[0] <= 4 and out.shape[1] <= 64:
        # A few rows (API requests at low load): plain Python beats a dozen small numpy calls.
        idx_l, sc_l = [], []
        for row in out.tolist():
            k = max(range(len(row)), key=row.__getitem__)
            top = row[k]
            if min(row) >= 0 and abs(sum(row) - 1.0) <= 1e-3:
                sc_l.append(top)
            else:
                sc_l.append(1.0 / sum(math.exp(v - top) for v in row))
            idx_l.append(k)
        return np.asarray(idx_l, dtype=np.int64), np.asarray(sc_l, dtype=np.float64)
    idx = out.argmax(axis=1)
    top = out.max(axis=1)
    if out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        score = top
    else:
        # softmax at the argmax is 1 / sum(exp(x - max)): no full softmax needed.
        score = 1.0 / np.exp(out - top[:, None]).sum(axis=1)
    return idx, score.astype(np.float64)


class ResultBatch:
    """The rows of one batch (or one group of cache hits).

    ``source``, ``ts``, ``latency_ms``, ``refs`` and ``cached`` are either
    one value for every row or a list with one entry per row.
    """

    __slots__ = ("model", "output_names", "outputs", "n", "id_prefix", "id_base", "source", "ts", "refs",
                 "latency_ms", "labels", "top_idx", "scores", "cached", "_model_json", "spans", "post", "_posts")

    def __init__(self, *, model: dict, output_names: Sequence[str], outputs: Sequence[np.ndarray], n: int,
                 id_prefix: str, id_base: int, source: str, ts, latency_ms, labels: Sequence[str] | None = None,
                 refs: Sequence[str] | None = None, cached: bool = False, model_json: str | None = None,
                 cls: tuple[np.ndarray, np.ndarray] | None = None, spans: list | None = None,
                 post: dict | None = None) -> None:
        self.model = model
        self.output_names = list(output_names)
        self.outputs = list(outputs)
        self.n = n
        self.id_prefix = id_prefix
        self.id_base = id_base
        self.source = source
        self.ts = ts
        self.latency_ms = latency_ms
        self.labels = labels
        self.refs = refs
        self.cached = cached
        self._model_json = model_json
        # Optional ((count, source, ts, latency_ms), ...) runs of rows sharing those values (one per
        # request or source block): lets to_json_lines format only the per-row fields per row.
        self.spans = spans
        # The package's postprocess hook: its answers replace the argmax labels in every result,
        # sink and JSON line, the same as the API gives (computed once per batch, on first read).
        self.post = post
        self._posts: list[dict] | None = None
        if cls is None and len(self.outputs) == 1:
            # Also with a hook: telemetry counts classes by this argmax (a topk hook's best label is the
            # same index); labels, scores and top that callers read come from the hook.
            cls = classify(self.outputs[0])
        self.top_idx, self.scores = cls if cls is not None else (None, None)

    def __len__(self) -> int:
        return self.n

    def prediction_ids(self) -> list[str]:
        p = self.id_prefix
        return [f"{p}{i}" for i in range(self.id_base, self.id_base + self.n)]

    @staticmethod
    def _col(v, n: int) -> list:
        # Columns are per row (list/array) or one value for all rows.
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, list):
            return v
        return [v] * n

    def posts(self) -> list[dict] | None:
        """Each row's ``postprocess`` answer (labels, detections or a mask), or None without a hook."""
        if self.post is None:
            return None
        if self._posts is None:
            from ..runtime.postprocess import apply  # noqa: PLC0415 - only models that declare a hook

            self._posts = [apply(self.post, {name: o[i] for name, o in zip(self.output_names, self.outputs)},
                                 self.labels) for i in range(self.n)]
        return self._posts

    def label_names(self) -> list[str] | None:
        posts = self.posts()
        if posts is not None:
            names = [p.get("label") for p in posts]
            return names if any(x is not None for x in names) else None
        if self.top_idx is None:
            return None
        labels = self.labels
        if labels:
            return [labels[i] if i < len(labels) else str(i) for i in self.top_idx.tolist()]
        return [str(i) for i in self.top_idx.tolist()]

    def results(self) -> list[Result]:
        """Per-sample :class:`Result` objects (allocates; the sink fast path does not use this)."""
        n = self.n
        ids = self.prediction_ids()
        ts = self._col(self.ts, n)
        lat = self._col(self.latency_ms, n)
        names = self.label_names()
        scores = self.scores.tolist() if self.scores is not None else None
        src = self._col(self.source, n)
        refs = self._col(self.refs, n)
        cached = self._col(self.cached, n)
        posts = self.posts()
        out = []
        for i in range(n):
            outputs = {name: o[i] for name, o in zip(self.output_names, self.outputs)}
            if posts is not None:
                r = Result(ids[i], outputs, self.model, lat[i], src[i], ts[i], ref=refs[i], cached=cached[i],
                           labels=self.labels, post=self.post)
                r._post = posts[i]  # computed once for the batch; label/score/top are read from it
                out.append(r)
                continue
            label = score = top = None
            if names is not None:
                label, score = names[i], scores[i]
                top = _top(self.outputs[0][i], self.labels)
            out.append(Result(ids[i], outputs, self.model, lat[i], src[i], ts[i], label, score, top,
                              refs[i], cached[i]))
        return out

    def to_json_lines(self, outputs: bool = False) -> str:
        """All rows as JSON lines, formatted with one template (no json.dumps per row)."""
        n = self.n
        if n == 0:
            return ""
        model_json = self._model_json or json.dumps({"name": self.model.get("name"), "version": self.model.get("version")},
                                                    separators=(",", ":"))
        if self.post is not None:
            return self._json_post_lines(outputs, model_json)
        names = self.label_names()
        if (self.spans is not None and names is not None and not outputs and self.refs is None
                and self.cached is False):
            return self._json_by_span(names, model_json)
        ts = self._col(self.ts, n)
        lat = self._col(self.latency_ms, n)
        ids = range(self.id_base, self.id_base + n)
        # Per-row parts vary; the constant parts are baked into the template once per batch.
        cols: list = [ids]
        head = '{"prediction_id":"' + self.id_prefix.replace("%", "%%") + '%d","source":'
        if isinstance(self.source, list) and len(set(self.source)) > 1:
            enc_src = {x: json.dumps(x) for x in set(self.source)}
            cols.append([enc_src[x] for x in self.source])
            head += "%s"
        else:
            src = self.source[0] if isinstance(self.source, list) else self.source
            head += json.dumps(src).replace("%", "%%")
        head += ',"ts":%.6f'
        cols.append(ts)
        if names is not None:
            enc = {lab: json.dumps(lab) for lab in set(names)}
            cols += [[enc[x] for x in names], self.scores.tolist()]
            head += ',"label":%s,"score":%.5f'
        head += ',"latency_ms":%.3f,"model":' + model_json.replace("%", "%%")
        cols.append(lat)
        extra = None
        if self.refs is not None:
            extra = [',"ref":' + json.dumps(r) if r is not None else "" for r in self._col(self.refs, n)]
        if outputs or names is None:
            outs = [",\"outputs\":{" + ",".join(f"{json.dumps(name)}:{json.dumps(o[i].tolist())}"
                                                for name, o in zip(self.output_names, self.outputs)) + "}"
                    for i in range(n)]
            extra = outs if extra is None else [a + b for a, b in zip(extra, outs)]
        if isinstance(self.cached, list):
            c = [',"cached":true' if x else "" for x in self.cached]
            extra = c if extra is None else [a + b for a, b in zip(extra, c)]
        elif self.cached:
            head += ',"cached":true'
        if extra is not None:
            cols.append(extra)
            head += "%s"
        tmpl = head + "}\n"
        return "".join([tmpl % row for row in zip(*cols)])


    def _json_post_lines(self, outputs: bool, model_json: str) -> str:
        """Rows of a model with a ``postprocess`` hook: one dict per row, keys as :meth:`Result.to_dict`.

        Not the one-template path: a hook's answer (detections, a mask) varies in shape per row, and
        the hook itself costs more than formatting its answer.
        """
        model = json.loads(model_json)
        lines = []
        for r in self.results():
            d = r.to_dict(outputs)
            d["model"] = model
            lines.append(json.dumps(d, separators=(",", ":")) + "\n")
        return "".join(lines)

    def _json_by_span(self, names: list[str], model_json: str) -> str:
        """Fast path: per row only id, label and score vary; the rest is baked in per span."""
        enc = {lab: json.dumps(lab) for lab in set(names)}
        jl = [enc[x] for x in names]
        scores = self.scores.tolist()
        prefix = self.id_prefix.replace("%", "%%")
        tail = model_json.replace("%", "%%") + "}\n"
        parts = []
        i = 0
        base = self.id_base
        for count, source, ts, lat in self.spans:
            tmpl = ('{"prediction_id":"' + prefix + '%d","source":' + json.dumps(source).replace("%", "%%") +
                    ',"ts":' + f"{ts:.6f}" + ',"label":%s,"score":%.5f,"latency_ms":' + f"{lat:.3f}" +
                    ',"model":' + tail)
            j = i + count
            # One formatting call for the whole span (the template repeated), not one per row.
            parts.append((tmpl * count) % tuple(chain.from_iterable(zip(range(base + i, base + j), jl[i:j],
                                                                        scores[i:j]))))
            i = j
        return "".join(parts)


def _top(row: np.ndarray, labels: Sequence[str] | None, k: int = 5) -> list[tuple[str, float]]:
    vals = np.asarray(row, dtype=np.float64).ravel().tolist()
    if min(vals) >= 0 and abs(sum(vals) - 1.0) < 1e-3:
        p = vals
    else:
        m = max(vals)
        e = [math.exp(v - m) for v in vals]
        total = sum(e)
        p = [v / total for v in e]
    idx = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:k]
    return [(label_name(labels, i), p[i]) for i in idx]
