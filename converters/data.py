"""Loading calibration / training / evaluation data for the converters.

One entry point, :func:`load_data`, turns what a user has into a
:class:`Dataset` — named input arrays with an optional label vector:

* a ``.npy`` file: one array, the model's single input (first axis = samples);
* a ``.npz`` file: one array per input name, labels optional under ``labels``;
* a folder of images or audio files (``.wav``): class sub-folders give the
  labels (sorted names), loose files give none; each image goes through the
  package's ``preprocess``; each WAV becomes a float32 ``(channels, frames)``
  array in [-1, 1] (then the ``preprocess`` scale/mean/std/dtype);
* a ``.jsonl`` file: one sample per line, ``{"<input>": nested list or a path
  to an image/WAV file (relative to the .jsonl), ..., "label": int or str}``
  (a bare list stands for a one-input model's sample);
* arrays already in memory (``np.ndarray`` or ``{name: array}``).

Decoding files shows a progress bar on a terminal (``progress``).

:func:`check_against` then validates a dataset for one model (names, per-sample
shape, dtype, NaN/inf, minimum count) and casts it to the model's dtypes. Every
problem is a :class:`~edgeship.errors.DataError` whose one-line message names
the input, what was expected and what to do.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["Dataset", "InputSpec", "load_data", "check_against", "IMAGE_SUFFIXES", "AUDIO_SUFFIXES", "LABELS_KEY",
           "decode_wav"]

LABELS_KEY = "labels"
JSONL_LABEL_KEYS = ("label", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav",)
_MAX_JSONL_LINE = 64 * 1024 * 1024  # one sample; a longer line is not a sample but a broken file


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects for one input: ``shape`` uses ``None``/str/-1 for free axes (axis 0 = batch)."""

    name: str
    dtype: str
    shape: tuple

    def sample_shape(self) -> tuple:
        return tuple(self.shape[1:])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Named input arrays sharing their first (sample) axis, plus optional integer labels."""

    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] | None = None
    source: str = "<array>"

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataError(f"{self.source}: no input arrays; give one array per model input")
        counts = {name: (len(a) if np.ndim(a) else 0) for name, a in self.inputs.items()}
        if len(set(counts.values())) != 1:
            raise DataError(f"{self.source}: inputs have different sample counts {counts}; "
                            "every input needs one row per sample")
        if self.labels is not None and len(self.labels) != next(iter(counts.values())):
            raise DataError(f"{self.source}: {len(self.labels)} labels for {next(iter(counts.values()))} samples; "
                            "give exactly one label per sample")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def names(self) -> list[str]:
        return list(self.inputs)

    def take(self, n: int | None = None, start: int = 0) -> "Dataset":
        """Samples ``start .. start+n`` (all when ``n`` is None)."""
        stop = len(self) if n is None else min(len(self), start + n)
        return dataclasses.replace(
            self, inputs={k: v[start:stop] for k, v in self.inputs.items()},
            labels=None if self.labels is None else self.labels[start:stop])

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """``{name: array}`` feeds of at most ``batch_size`` samples, in order."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        for i in range(0, len(self), batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.inputs.items()}

    def feed(self, batch_size: int) -> dict[str, np.ndarray]:
        """One feed of exactly ``batch_size`` samples (repeating the data when it is shorter)."""
        idx = np.arange(batch_size) % len(self)
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.inputs.items()}


def _name_for_single(input_names: Sequence[str] | None, source: str) -> str:
    if not input_names:
        return "input"
    if len(input_names) != 1:
        raise DataError(f"{source}: one array given but the model has {len(input_names)} inputs "
                        f"({', '.join(input_names)}); use an .npz with one array per input name")
    return input_names[0]


def _from_mapping(arrays: Mapping[str, np.ndarray], input_names: Sequence[str] | None, source: str) -> Dataset:
    arrays = dict(arrays)
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError(f"{source}: holds no input arrays (only {LABELS_KEY!r}); add one array per model input")
    if input_names:
        missing = [n for n in input_names if n not in arrays]
        if missing and len(arrays) == 1 and len(input_names) == 1:
            # One unnamed-looking array for a one-input model: the name carries no information.
            arrays = {input_names[0]: next(iter(arrays.values()))}
        elif missing:
            raise DataError(f"{source}: no array for model input(s) {', '.join(map(repr, missing))} "
                            f"(found {', '.join(map(repr, arrays))}); name the arrays after the model inputs")
        else:
            arrays = {n: arrays[n] for n in input_names}
    out = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim == 0:
            raise DataError(f"{source}: input {name!r} is a scalar; the first axis must count samples")
        out[name] = arr
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise DataError(f"{source}: {LABELS_KEY!r} has shape {labels.shape}; give one integer class per sample")
    return Dataset(inputs=out, labels=labels, source=source)


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES)


def _progress(items, desc: str, progress: bool | None):
    """tqdm over ``items`` on stderr; ``progress=None`` shows it only on a terminal."""
    if progress is False:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the convert extra; without it, no bar
        return items
    return tqdm(items, desc=desc, unit="file", disable=None if progress is None else False, leave=False)


def decode_wav(path: str | os.PathLike) -> np.ndarray:
    """A PCM (8/16/24/32-bit) WAV file → float32 ``(channels, frames)`` in [-1, 1] (standard library only)."""
    import wave

    with wave.open(str(path), "rb") as w:
        width, channels, frames = w.getsampwidth(), w.getnchannels(), w.getnframes()
        raw = w.readframes(frames)
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{width * 8}-bit samples are not PCM this reader knows")
    return np.ascontiguousarray(x.reshape(-1, channels).T)


def _decode_file(path: Path, preprocess: Mapping | None) -> np.ndarray:
    """One image or WAV file -> one sample array with the package's ``preprocess`` — for images the same
    code the device runs (:class:`edgeship.preprocess.Preprocessor`), so calibration sees what the model will."""
    import wave

    from ..errors import EdgeshipError
    from ..preprocess import Preprocessor

    try:
        if path.suffix.lower() in AUDIO_SUFFIXES:
            x = decode_wav(path)
            return Preprocessor(preprocess).one(x) if preprocess else x
        return Preprocessor(preprocess).one(path)
    except (EdgeshipError, OSError, ValueError, EOFError, wave.Error) as exc:
        raise DataError(f"{path}: cannot use this file ({' '.join(str(exc).split())}); "
                        "fix the file or the preprocess settings") from exc


def _stack(samples: list[np.ndarray], source: str, what: str) -> np.ndarray:
    shapes = {s.shape for s in samples}
    if len(shapes) != 1:
        hint = ("set preprocess.resize so every image has the same size" if what == "images"
                else "cut every clip to the model's window length")
        raise DataError(f"{source}: {what} decode to different shapes {sorted(shapes)[:4]}; {hint}")
    return np.stack(samples)


def _from_folder(folder: Path, input_names: Sequence[str] | None, preprocess: Mapping | None,
                 progress: bool | None = None) -> Dataset:
    source = str(folder)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        for idx, cls in enumerate(classes):
            found = _list_files(folder / cls)
            files += found
            labels += [idx] * len(found)
    else:
        files = _list_files(folder)
    if not files:
        raise DataError(f"{source}: no images or audio found ({', '.join(IMAGE_SUFFIXES[:4])}, .wav, ...); "
                        "put files in the folder or in one sub-folder per class")
    kinds = {p.suffix.lower() in AUDIO_SUFFIXES for p in files}
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes images and audio files; give one kind per folder")
    samples = [_decode_file(p, preprocess) for p in _progress(files, f"decoding {folder.name}", progress)]
    name = _name_for_single(input_names, source)
    return Dataset(inputs={name: _stack(samples, source, "audio files" if True in kinds else "images")},
                   labels=np.asarray(labels, dtype=np.int64) if classes else None,
                   label_names=tuple(classes) if classes else None, source=source)


def _jsonl_value(value, base: Path, preprocess: Mapping | None, where: str) -> np.ndarray:
    if isinstance(value, str):
        p = Path(value) if Path(value).is_absolute() else base / value
        if not p.is_file():
            raise DataError(f"{where}: {value!r} is not a file (paths are relative to the .jsonl)")
        return _decode_file(p, preprocess)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: not a rectangular array ({' '.join(str(exc).split())[:120]})") from exc
    if arr.dtype == object or arr.dtype.kind not in "fiub":
        raise DataError(f"{where}: holds {arr.dtype} values; give numbers (nested lists) or a file path")
    return arr


def _from_jsonl(path: Path, input_names: Sequence[str] | None, preprocess: Mapping | None,
                progress: bool | None = None) -> Dataset:
    import json

    source = str(path)
    try:
        with open(path, "rb") as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    if not lines:
        raise DataError(f"{path}: no samples; write one JSON object per line")
    columns: dict[str, list[np.ndarray]] = {}
    labels: list = []
    for no, raw in enumerate(_progress(lines, f"reading {path.name}", progress), 1):
        where = f"{path}:{no}"
        if len(raw) > _MAX_JSONL_LINE:
            raise DataError(f"{where}: line longer than {_MAX_JSONL_LINE} bytes; one sample per line")
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{where}: not valid JSON ({str(exc)[:120]})") from exc
        if isinstance(rec, list):
            rec = {_name_for_single(input_names, source): rec}
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object {{input name: values}} or a list, got {type(rec).__name__}")
        label_key = next((k for k in JSONL_LABEL_KEYS if k in rec), None)
        label = rec.pop(label_key) if label_key else None
        if no == 1:
            columns = {k: [] for k in rec}
            has_labels = label is not None
        if set(rec) != set(columns):
            raise DataError(f"{where}: keys {sorted(rec)} differ from line 1's {sorted(columns)}; "
                            "every line needs the same inputs")
        if (label is not None) != has_labels:
            raise DataError(f"{where}: {'no' if has_labels else 'a'} label where line 1 has "
                            f"{'one' if has_labels else 'none'}; label every line or none")
        for k, v in rec.items():
            columns[k].append(_jsonl_value(v, path.parent, preprocess, f"{where} {k!r}"))
        if has_labels:
            labels.append(label)
    arrays = {k: _stack(v, f"{source} input {k!r}", "samples") for k, v in columns.items()}
    label_arr, label_names = None, None
    if labels:
        if all(isinstance(x, str) for x in labels):
            label_names = tuple(sorted(set(labels)))
            label_arr = np.asarray([label_names.index(x) for x in labels], dtype=np.int64)
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
            label_arr = np.asarray(labels, dtype=np.int64)
        else:
            raise DataError(f"{path}: labels mix types; give integer class indices or class names")
    ds = _from_mapping(arrays, input_names, source)
    return dataclasses.replace(ds, labels=label_arr, label_names=label_names)


def load_data(path_or_array, *, input_names: Sequence[str] | None = None,
              preprocess: Mapping | None = None, progress: bool | None = None) -> Dataset:
    """Load ``.npy`` / ``.npz`` / ``.jsonl`` / an image or audio folder / in-memory arrays as a :class:`Dataset`.

    ``input_names`` are the model's inputs (an ``.npz`` must hold one array per
    name); ``preprocess`` is the package's manifest ``preprocess`` used to
    decode images. ``progress``: a bar while decoding files (None: only on a
    terminal). Raises :class:`DataError` naming the cause.
    """
    if isinstance(path_or_array, Dataset):
        return path_or_array
    if isinstance(path_or_array, np.ndarray):
        return Dataset(inputs={_name_for_single(input_names, "<array>"): path_or_array})
    if isinstance(path_or_array, Mapping):
        return _from_mapping(path_or_array, input_names, "<arrays>")
    if not isinstance(path_or_array, (str, os.PathLike)):
        raise DataError(f"cannot load data from a {type(path_or_array).__name__}; "
                        "give a .npy/.npz file, an image folder or numpy arrays")
    path = Path(path_or_array)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _from_folder(path, input_names, preprocess, progress)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _from_jsonl(path, input_names, preprocess, progress)
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            return Dataset(inputs={_name_for_single(input_names, str(path)): arr}, source=str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return _from_mapping(arrays, input_names, str(path))
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable numpy file ({' '.join(str(exc).split())}); "
                        "save it with numpy.save / numpy.savez") from exc
    raise DataError(f"{path}: unsupported data file {suffix or '(no suffix)'}; use .npy, .npz, .jsonl or a folder "
                    "of images or .wav files")


_INT_KINDS = "iub"


def _dims_match(expected: Sequence, got: Sequence) -> bool:
    if len(expected) != len(got):
        return False
    return all(not isinstance(e, int) or e < 0 or e == g for e, g in zip(expected, got))


def check_against(data: Dataset, specs: Sequence[InputSpec], *, min_samples: int = 1,
                  what: str = "data") -> Dataset:
    """Validate ``data`` for a model with inputs ``specs``; return it cast to the model's dtypes.

    Checks, in order: every input present, enough samples, per-sample shape,
    dtype compatibility (integers for integer inputs, numbers for float
    inputs), and no NaN/inf. ``what`` names the role in messages
    (``"calibration data"``, ``"eval data"``).
    """
    src = data.source
    missing = [s.name for s in specs if s.name not in data.inputs]
    if missing:
        if len(specs) == 1 and len(data.inputs) == 1:
            data = dataclasses.replace(data, inputs={specs[0].name: next(iter(data.inputs.values()))})
        else:
            raise DataError(f"{what} {src}: no array for model input(s) {', '.join(map(repr, missing))} "
                            f"(found {', '.join(map(repr, data.inputs))}); name one array per model input")
    if len(data) < min_samples:
        raise DataError(f"{what} {src}: {len(data)} samples, at least {min_samples} needed; give more samples")
    out = {}
    for spec in specs:
        arr = np.asarray(data.inputs[spec.name])
        exp = spec.sample_shape()
        if not _dims_match(exp, arr.shape[1:]):
            shown = tuple(d if isinstance(d, int) and d >= 0 else "?" for d in exp)
            raise DataError(f"{what} {src}: input {spec.name!r} has per-sample shape {tuple(arr.shape[1:])}, "
                            f"the model expects {shown}; reshape the data (first axis = samples)")
        want = np.dtype(spec.dtype)
        if arr.dtype.kind not in "fiub":
            raise DataError(f"{what} {src}: input {spec.name!r} has dtype {arr.dtype}, the model expects {want}; "
                            "give numeric arrays")
        if want.kind in _INT_KINDS and arr.dtype.kind == "f":
            raise DataError(f"{what} {src}: input {spec.name!r} is {arr.dtype} but the model expects {want} "
                            "(e.g. token ids); save integer arrays for it")
        if arr.dtype.kind == "f":
            bad = ~np.isfinite(arr)
            if bad.any():
                first = int(np.argwhere(bad.reshape(len(arr), -1).any(axis=1))[0, 0])
                raise DataError(f"{what} {src}: input {spec.name!r} has {int(bad.sum())} NaN/inf values "
                                f"(first in sample {first}); clean or drop those samples")
        out[spec.name] = np.ascontiguousarray(arr.astype(want, copy=False))
    labels = data.labels
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in _INT_KINDS:
            raise DataError(f"{what} {src}: labels have dtype {labels.dtype}; give integer class indices")
        labels = labels.astype(np.int64)
    return dataclasses.replace(data, inputs=out, labels=labels)
