"""The backend-independent half of a runner: input validation, int8 IO
(de)quantization, preprocessing, warm-up, lifecycle. Backends implement
``_invoke(arrays) -> list[np.ndarray]`` on the model's own tensors.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError
from ..tensorspec import TensorSpec

__all__ = ["Runner", "quantize", "dequantize"]


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """float -> the integer tensor ``spec`` describes (round half to even, saturate)."""
    scale, zp = spec.quantization  # type: ignore[misc]
    info = np.iinfo(spec.dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale)) + zp
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    scale, zp = spec.quantization  # type: ignore[misc]
    return (q.astype(np.float32) - np.float32(zp)) * np.float32(scale)


class Runner:
    """One loaded model with a backend-independent interface (see docs/architecture.md).

    ``inputs``/``outputs`` are the float interface callers use (int8 IO shows
    as float32); ``model_inputs``/``model_outputs`` are the file's own
    tensors. ``run()`` validates, (de)quantizes and runs; ``run_unchecked()``
    is the hot path for callers that already validated (the agent validates
    each sample at submit time, then runs whole batches).
    """

    kind = "base"
    thread_safe = True

    def __init__(self, model_inputs: list[TensorSpec], model_outputs: list[TensorSpec], *, backend: str,
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 manifest: Mapping[str, Any] | None = None, variant: Mapping[str, Any] | None = None,
                 package=None, source: str = "") -> None:
        self.model_inputs = list(model_inputs)
        self.model_outputs = list(model_outputs)
        self.backend = backend
        self.manifest = dict(manifest or {})
        self.variant = dict(variant or {})
        self.package = package
        self.source = source
        # Size steps of variable axes come from the manifest (an ONNX file cannot say "multiples of 32").
        self._multiples = {d.get("name"): d.get("multiple_of") for d in self.manifest.get("inputs") or ()
                           if isinstance(d, Mapping) and d.get("multiple_of")}
        # Likewise sizes: a graph that leaves H and W open may be trained for one size (a text line of
        # 48 pixels); the manifest's fixed axes then narrow the file's open ones (#20, PP-OCR's models).
        self._declared = {d.get("name"): d.get("shape") for d in self.manifest.get("inputs") or ()
                          if isinstance(d, Mapping) and isinstance(d.get("shape"), list)}
        self.state: list = []  # StatePair per declared state tensor (see edgeship.runtime.state)
        self.postprocess_spec: dict | None = None
        # Callers use the package's logical names; a TFLite file may call the
        # same tensor "serving_default_input:0". Names map by position.
        self._set_names(input_names, output_names)
        self._closed = False
        self._preprocessor = None
        self._pre_lock = threading.Lock()

    def _set_names(self, input_names: Sequence[str] | None, output_names: Sequence[str] | None) -> None:
        in_names = list(input_names) if input_names else [s.name for s in self.model_inputs]
        out_names = list(output_names) if output_names else [s.name for s in self.model_outputs]
        self.inputs = [TensorSpec(n, s.logical_dtype, _narrow(s.shape, self._declared.get(n)), None,
                                  self._multiples.get(n) or s.multiple_of)
                       for n, s in zip(in_names, self.model_inputs)]
        self.outputs = [TensorSpec(n, s.logical_dtype, s.shape, None) for n, s in zip(out_names, self.model_outputs)]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self._in_index = {n: i for i, n in enumerate(self.input_names)}

    def _check_shapes(self) -> None:
        """Read the manifest's ``state`` and ``postprocess`` against the loaded IO (load calls it).

        A model that looks stateful but declares no state is refused here
        with one line (see :mod:`edgeship.runtime.state`).
        """
        from .postprocess import check_postprocess
        from .state import check_declared

        where = self.source or "model"
        self.state = check_declared(self.manifest, self.inputs, self.outputs, where)
        self.postprocess_spec = check_postprocess(self.manifest.get("postprocess"), self.outputs, where)

    @property
    def state_inputs(self) -> list[str]:
        return [p.input for p in self.state]

    @property
    def data_inputs(self) -> list[TensorSpec]:
        """The inputs a caller sends: all but the declared state."""
        st = set(self.state_inputs)
        return [s for s in self.inputs if s.name not in st]

    @property
    def data_outputs(self) -> list[TensorSpec]:
        """The outputs a caller reads: all but the state handed to the next call."""
        st = {p.output for p in self.state}
        return [s for s in self.outputs if s.name not in st]

    # ------------------------------------------------------------ metadata
    @property
    def batch_size(self) -> int | None:
        """None when every input takes any batch; the fixed batch otherwise (1 for inputs without a batch axis).

        Declared state inputs (their batch axis is their own) and scalar
        inputs next to batched ones (a sample rate: one value per call) do
        not decide it.
        """
        st = set(self.state_inputs)
        specs = [m for m, s in zip(self.model_inputs, self.inputs) if s.name not in st]
        if any(s.shape for s in specs):
            specs = [s for s in specs if s.shape]
        fixed = {s.shape[0] if s.shape else 1 for s in specs if not s.dynamic_batch}
        if not fixed:
            return None
        return max(fixed)

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.get("labels")

    @property
    def preprocess(self) -> dict | None:
        return self.manifest.get("preprocess")

    @property
    def name(self) -> str | None:
        return self.manifest.get("name")

    @property
    def version(self) -> str | None:
        return self.manifest.get("version")

    @property
    def sha256(self) -> str | None:
        return getattr(self.package, "sha256", None) if self.package is not None else None

    @property
    def model_info(self) -> dict:
        """``{"name", "version", "sha256", "variant"}`` (what results and telemetry carry)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "variant": self.variant.get("id")}

    @property
    def quantized_io(self) -> bool:
        return any(s.quantization for s in [*self.model_inputs, *self.model_outputs])

    # ---------------------------------------------------------- validation
    def _as_data_feed(self, feed) -> dict[str, Any]:
        data = self.data_inputs
        if isinstance(feed, Mapping):
            return dict(feed)
        if len(data) != 1:
            raise InputError(f"the model takes {len(data)} data inputs ({', '.join(s.name for s in data)}); "
                             "pass a dict {name: array}", input_name=None)
        return {data[0].name: feed}

    def _as_feed(self, feed) -> dict[str, Any]:
        if isinstance(feed, Mapping):
            return dict(feed)
        if len(self.inputs) != 1:
            raise InputError(f"the model has {len(self.inputs)} inputs ({', '.join(self.input_names)}); "
                             "pass a dict {name: array}", input_name=None,
                             expected=self.input_names, got=type(feed).__name__)
        return {self.input_names[0]: feed}

    def validate(self, feed, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Check names, dtype, rank, shape (incl. batch) and finiteness; return the arrays to run.

        Float inputs accept any float dtype (cast to the model's); integer or
        bool arrays for a float input are refused (usually a forgotten
        preprocessing step). With ``raw`` a quantized input takes its integer
        dtype exactly.
        """
        feed = self._as_feed(feed)
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise InputError(f"missing input {missing[0]!r}; the model takes {', '.join(self.input_names)}",
                             input_name=missing[0], expected=self.input_names, got=sorted(map(str, feed)))
        extra = [n for n in feed if n not in self._in_index]
        if extra:
            raise InputError(f"unknown input {extra[0]!r}; the model takes {', '.join(self.input_names)}",
                             input_name=str(extra[0]), expected=self.input_names, got=sorted(map(str, feed)))
        out: dict[str, np.ndarray] = {}
        batch: tuple[str, int] | None = None
        for i, name in enumerate(self.input_names):
            spec = self.model_inputs[i] if raw else self.inputs[i]
            arr = self._check_dtype(name, feed[name], spec)
            self._check_shape(name, arr, spec)
            if spec.dynamic_batch and arr.ndim:
                if batch is not None and arr.shape[0] != batch[1]:
                    raise InputError(f"input {name!r} has batch {arr.shape[0]} but {batch[0]!r} has {batch[1]}; "
                                     "all inputs must share the batch size", input_name=name,
                                     expected=batch[1], got=arr.shape[0])
                batch = (name, arr.shape[0])
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                bad = "NaN" if np.isnan(arr).any() else "Inf"
                raise InputError(f"input {name!r} contains {bad}; clean the sample before inference",
                                 input_name=name, expected="finite values", got=bad)
            out[name] = arr
        return out

    @staticmethod
    def _check_dtype(name: str, value: Any, spec: TensorSpec) -> np.ndarray:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {name!r} is not an array ({exc})", input_name=name,
                             expected=spec.dtype, got=type(value).__name__) from exc
        want = np.dtype(spec.dtype) if spec.dtype != "str" else np.dtype(object)
        if arr.dtype == want:
            return arr
        if np.issubdtype(want, np.floating) and np.issubdtype(arr.dtype, np.floating):
            return arr.astype(want)
        if (np.issubdtype(want, np.integer) and np.issubdtype(arr.dtype, np.integer)
                and np.can_cast(arr.dtype, want, casting="safe")):
            return arr.astype(want)
        hint = "; apply the package's preprocessing (runner.predict) or cast it" if np.issubdtype(
            want, np.floating) else ""
        raise InputError(f"input {name!r} has dtype {arr.dtype}, expected {want}{hint}", input_name=name,
                         expected=str(want), got=str(arr.dtype))

    @staticmethod
    def _check_shape(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
        if arr.ndim != spec.rank:
            raise InputError(f"input {name!r} has shape {list(arr.shape)} (rank {arr.ndim}), expected "
                             f"{spec.shape_str()} (rank {spec.rank})", input_name=name,
                             expected=spec.shape, got=arr.shape)
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
            if want != -1 and want != got:
                what = "batch" if axis == 0 else f"axis {axis}"
                raise InputError(f"input {name!r} has shape {list(arr.shape)}, expected {spec.shape_str()} "
                                 f"({what} must be {want})", input_name=name, expected=spec.shape, got=arr.shape)
        if spec.dynamic_batch and arr.shape[0] == 0:
            raise InputError(f"input {name!r} has an empty batch", input_name=name, expected=">= 1", got=0)
        check_multiple(name, arr.shape, spec)

    # ------------------------------------------------------------- running
    def run(self, feed, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Validate ``feed`` (an array or ``{name: array}``), run, return ``{output name: array}``.

        Float in, float out: int8 model IO is (de)quantized unless ``raw``.
        """
        arrays = self.validate(feed, raw=raw)
        outs = self.run_unchecked(arrays, raw=raw)
        return dict(zip(self.output_names, outs))

    def run_unchecked(self, feed: Mapping[str, np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Hot path: ``feed`` already validated (names, dtypes, shapes); outputs in ``output_names`` order."""
        self._check_open()
        arrays = [feed[n] for n in self.input_names]
        if not raw:
            arrays = [quantize(a, s) if s.quantization else a for a, s in zip(arrays, self.model_inputs)]
        outs = self._invoke(arrays)
        if not raw:
            outs = [dequantize(o, s) if s.quantization else o for o, s in zip(outs, self.model_outputs)]
        return outs

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------- streams and post-processing
    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The declared state of ``batch`` fresh streams, by state input name."""
        from .state import initial_state

        specs = {s.name: s for s in self.inputs}
        return {p.input: initial_state(p, specs[p.input], batch) for p in self.state}

    def stream(self) -> "Stream":
        """A :class:`Stream`: calls on consecutive windows of one stream, the state carried between them."""
        if not self.state:
            raise InputError(f"{self.source or 'this model'} declares no state; run() it directly")
        return Stream(self)

    def postprocess(self, outputs: Mapping[str, np.ndarray]) -> list[dict]:
        """The package's ``postprocess`` hook on a batch of outputs: one answer per row (see
        :mod:`edgeship.runtime.postprocess`); ``[]`` when the package declares none."""
        if self.postprocess_spec is None:
            return []
        from .postprocess import apply

        n = len(next(iter(outputs.values())))
        return [apply(self.postprocess_spec, {k: v[i] for k, v in outputs.items()}, self.labels) for i in range(n)]

    # ------------------------------------------------------- preprocessing
    @property
    def preprocessor(self):
        """The package's preprocessing for the (single) input, built on first use."""
        with self._pre_lock:
            if self._preprocessor is None:
                from ..errors import PackageFormatError
                from ..preprocess import Preprocessor, check_preprocess

                if len(self.inputs) != 1:
                    raise InputError(f"predict() preprocesses single-input models; this one takes "
                                     f"{', '.join(self.input_names)}: pass a dict of arrays to run()")
                spec = check_preprocess(self.preprocess, error=PackageFormatError)
                self._preprocessor = Preprocessor(spec, self.inputs[0].shape, self.inputs[0].dtype)
            return self._preprocessor

    def predict(self, sample) -> dict[str, np.ndarray]:
        """Apply the manifest's preprocessing to one raw sample (array, image path/bytes) or a
        list/batch of them, then run. For one sample the outputs lose their batch axis."""
        if isinstance(sample, Mapping):
            return self.run(sample)
        batch, was_batch = self.preprocessor(sample)
        bs = self.batch_size
        if bs is not None and batch.shape[0] != bs:
            return self._run_fixed_batches(batch, bs, was_batch)
        out = self.run(batch)
        return out if was_batch else {k: v[0] for k, v in out.items()}

    def _run_fixed_batches(self, batch: np.ndarray, bs: int, was_batch: bool) -> dict[str, np.ndarray]:
        # A fixed-batch model: pad the last chunk with copies of its first row, drop the padding after.
        chunks: list[list[np.ndarray]] = []
        for start in range(0, batch.shape[0], bs):
            part = batch[start:start + bs]
            n = part.shape[0]
            if n < bs:
                part = np.concatenate([part, np.repeat(part[:1], bs - n, axis=0)])
            outs = self.run(part)
            chunks.append([outs[k][:n] for k in self.output_names])
        merged = {k: np.concatenate([c[i] for c in chunks]) for i, k in enumerate(self.output_names)}
        return merged if was_batch else {k: v[0] for k, v in merged.items()}

    def example_input(self) -> dict[str, np.ndarray]:
        """The package's example input (float interface), or zeros of a valid shape."""
        ex = None
        if self.package is not None:
            ex = self.package.example_input()
        if ex is not None:
            feed = self._as_feed(ex)
            return {n: np.asarray(feed[n]) for n in self.input_names if n in feed} if all(
                n in feed for n in self.input_names) else self._zeros()
        return self._zeros()

    def _zeros(self) -> dict[str, np.ndarray]:
        b = self.batch_size or 1
        st = {p.input: p for p in self.state}
        return {s.name: np.zeros([b if (i == (st[s.name].batch_axis if s.name in st else 0) and d == -1)
                                  else (d if d != -1 else (s.multiple_of or 1))
                                  for i, d in enumerate(s.shape)], dtype=s.dtype if s.dtype != "str" else object)
                for s in self.inputs}

    def warmup(self, n: int = 3) -> None:
        """Run the example input ``n`` times (first-inference costs — allocation, JIT of kernels — happen now)."""
        feed = self.example_input()
        try:
            arrays = self.validate(feed)
        except InputError:
            arrays = self.validate(self._zeros())
        for _ in range(max(0, n)):
            self.run_unchecked(arrays)

    # ----------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise ModelError(f"the {self.kind} runner for {self.source or 'this model'} is closed; load it again")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._release()

    def _release(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"<{type(self).__name__} {self.source} [{self.backend}] ({ins}) -> ({outs})>"


def check_multiple(name: str, shape, spec: TensorSpec) -> None:
    """Refuse a size on a variable axis that is not a multiple of the declared step."""
    k = spec.multiple_of
    if not k:
        return
    for axis in spec.variable_dims:
        if axis < len(shape) and shape[axis] % k:
            raise InputError(f"input {name!r} has shape {list(shape)}: axis {axis} must be a multiple of {k} "
                             f"(got {shape[axis]}); pad or resize the sample", input_name=name,
                             expected=f"multiple of {k}", got=tuple(shape))


class Stream:
    """One stream through a stateful model: each ``run`` feeds the state the last one returned.

    ``run(feed)`` takes the data inputs of one window (batch 1 or the
    stream's own batch), returns the data outputs; ``reset()`` starts over
    from the initial state. Not shared between threads (one per stream).
    """

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.state: dict[str, np.ndarray] | None = None
        self.calls = 0

    def reset(self) -> None:
        self.state = None
        self.calls = 0

    def run(self, feed) -> dict[str, np.ndarray]:
        r = self.runner
        feed = r._as_data_feed(feed)
        given = set(feed) & set(r.state_inputs)
        if given:
            raise InputError(f"the stream carries {sorted(given)[0]!r} itself; send only "
                             f"{', '.join(s.name for s in r.data_inputs)}")
        if self.state is None:
            first = next(iter(feed.values()))
            self.state = r.initial_state(int(np.shape(first)[0]) if np.ndim(first) else 1)
        out = r.run({**feed, **self.state})
        self.state = {p.input: out[p.output] for p in r.state}
        self.calls += 1
        st = {p.output for p in r.state}
        return {k: v for k, v in out.items() if k not in st}


def _narrow(shape: tuple[int, ...], declared: Sequence[Any] | None) -> tuple[int, ...]:
    """``shape`` with its open axes (past the batch) fixed where the manifest declares a size."""
    if not declared or len(declared) != len(shape):
        return shape
    return tuple(int(w) if i > 0 and d == -1 and isinstance(w, int) and not isinstance(w, bool) and w > 0 else d
                 for i, (d, w) in enumerate(zip(shape, declared)))
