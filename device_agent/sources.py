"""Input sources: where samples come from.

One small interface (:class:`Source`), pluggable through the entry point
group ``edgeship.sources`` (setup.cfg declares the built-in ones). A source
hands out :class:`RawBlock` objects of up to ``max_n`` samples:

* numeric sources (``jsonl``, ``csv``, ``stream``, ``synthetic``) return
  ``data``, an ``(n, ...)`` array parsed a whole block at a time (NumPy's C
  text parser over many lines at once, not one ``json.loads`` per line);
* decoding sources (``folder``, ``camera``) return ``items`` (file paths,
  frames) that the prefetch workers turn into arrays with ``decode(item)``,
  in parallel with inference.

Every block carries a wall-clock timestamp (per block or per row), the
source id, optional per-row references (file names, line numbers) and rows
the source itself could not parse (``errors``: ``(ref, reason)``) so they are
rejected and counted instead of stopping the stream. ``read(max_n,
timeout)`` never blocks longer than ``timeout``; it returns None when no data
arrived in time; ``exhausted`` turns True at the end of a finite stream.

A plug-in is a class taking ``(source_id, **options)`` with ``open()``,
``read(max_n, timeout)``, ``close()``, ``exhausted`` and, for decoding
sources, ``decode(item) -> np.ndarray``.
"""
from __future__ import annotations

import glob as _glob
import io
import json
import logging
import os
import select
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

__all__ = ["RawBlock", "Source", "JsonLinesSource", "CsvSource", "StreamSource", "SyntheticSource",
           "FolderSource", "CameraSource", "FakeCapture", "source_class", "make_source", "decode_file",
           "preload_image_decoder",
           "IMAGE_SUFFIXES"]

log = logging.getLogger("edgeship.agent.sources")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class RawBlock:
    data: np.ndarray | None = None          # (n, ...) numeric rows
    items: list | None = None               # to decode one by one
    ts: float | np.ndarray = 0.0            # wall time (per block or per row)
    refs: list[str] | None = None           # per-row reference (file, line)
    errors: list[tuple[str, str]] = field(default_factory=list)  # rows the source could not parse

    def __len__(self) -> int:
        if self.data is not None:
            return len(self.data)
        return len(self.items or ())


class Source:
    """Base class: subclasses set ``kind`` and implement ``read``."""

    kind = "base"
    decodes = False  # True when read() returns items for decode()

    def __init__(self, source_id: str, **options: Any) -> None:
        if options:
            raise ConfigError(f"[[sources]] {sorted(options)[0]}: unknown option for a {self.kind} source")
        self.id = source_id
        self.exhausted = False

    def open(self) -> None:
        self.exhausted = False

    def read(self, max_n: int, timeout: float) -> RawBlock | None:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, item) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- text streams -----------------------------------------------------------

class _LineSource(Source):
    """Reads lines from a file, a FIFO or stdin (``path = "-"``) in chunks, with a timeout.

    Uses ``os.read`` on the raw descriptor after ``select`` so a quiet FIFO
    never blocks the thread past ``timeout``; a partial last line is kept
    until its newline arrives. ``follow`` keeps reading a regular file as it
    grows (tail -f); FIFOs and stdin end when the writer closes.
    """

    # Large reads: each os.read gives up the GIL and must win it back from the
    # batcher thread, so fewer, bigger reads keep a fast stream moving (a FIFO
    # returns what it has, at most the pipe's 64 KiB, whatever we ask).
    chunk = 1 << 20

    def __init__(self, source_id: str, path: str = "-", follow: bool = False, dtype: str = "float32",
                 skip_bad: bool = True, **options: Any) -> None:
        super().__init__(source_id, **options)
        if not path:
            raise ConfigError(f"[[sources]] path: the {self.kind} source {source_id!r} needs a path (or \"-\" for stdin)")
        self.path = path
        self.follow = follow
        self.dtype = np.dtype(dtype)
        self.skip_bad = skip_bad
        self._fd: int | None = None
        self._own_fd = False
        self._is_file = False
        # Complete lines stay in one bytes buffer (``_text[_off:]``, ``_n`` lines),
        # never split into per-line objects on the fast path: at sensor rates the
        # split/join passes and allocations cost as much as the parse.
        self._text = b""
        self._off = 0
        self._n = 0
        self._partial = b""  # an incomplete last line, waiting for its newline
        self._lineno = 0
        self._got_data = False
        self._closing = threading.Event()

    def open(self) -> None:
        super().open()
        if self.path == "-":
            self._fd, self._own_fd, self._is_file = sys.stdin.fileno(), False, False
        else:
            try:
                # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError as exc:
                raise ConfigError(f"source {self.id!r}: {self.path} does not exist") from exc
            except OSError as exc:
                raise ConfigError(f"source {self.id!r}: cannot open {self.path}: {exc.strerror}") from exc
            self._fd, self._own_fd = fd, True
            self._is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        self._text, self._off, self._n, self._partial, self._got_data = b"", 0, 0, b"", False
        self._closing.clear()

    def close(self) -> None:
        self._closing.set()
        if self._fd is not None and self._own_fd:
            os.close(self._fd)
        self._fd = None

    def _add(self, data: bytes) -> None:
        """Append complete lines to the buffer (keeping a partial last line aside)."""
        cut = data.rfind(b"\n")
        if cut < 0:
            self._partial = data
            return
        new = data[:cut + 1]
        self._partial = data[cut + 1:]
        if self._n == 0:
            self._text, self._off = new, 0
        else:
            self._text = self._text[self._off:] + new
            self._off = 0
        self._n += new.count(b"\n")

    def _fill(self, want: int, timeout: float) -> None:
        """Read until ``want`` complete lines are buffered, the end of the stream, or the timeout.

        A pipe returns as soon as it has some lines and nothing more is ready:
        a slow sensor's samples must not wait for a full block.
        """
        fd = self._fd
        if fd is None:
            raise ConfigError(f"source {self.id!r} is not open")
        deadline = time.monotonic() + timeout
        while self._n < want:
            left = deadline - time.monotonic()
            if not self._is_file:
                r, _, _ = select.select([fd], [], [], 0.0 if self._n else max(0.0, left))
                if not r:
                    return
            try:
                data = os.read(fd, self.chunk)
            except BlockingIOError:
                data = None
            if data:
                self._got_data = True
                self._add(self._partial + data if self._partial else data)
                continue
            # No bytes: a regular file at its end, or a FIFO with no writer
            # (yet, or any more). Only a file read to its end without
            # ``follow``, or a pipe that delivered data and closed, ends the stream.
            if data == b"" and not self.follow and (self._is_file or self._got_data):
                if self._partial.strip():
                    self._add(self._partial + b"\n")
                self._partial = b""
                self.exhausted = True
                return
            if left <= 0 or self._closing.wait(min(0.01, left)):
                return

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        if self._n == 0 and not self.exhausted:
            self._fill(max_n, timeout)
        if self._n == 0:
            return None
        text, off = self._text, self._off
        if self._n <= max_n:
            n = self._n
            block = text[off:-1]
            self._text, self._off, self._n = b"", 0, 0
        else:
            n = max_n
            pos = off
            find = text.find
            for _ in range(n):
                pos = find(b"\n", pos) + 1
            block = text[off:pos - 1]
            self._off = pos
            self._n -= n
        first = self._lineno
        self._lineno += n
        return self.parse(block, n, first)

    def parse(self, text: bytes, n: int, first_line: int) -> RawBlock:  # pragma: no cover - interface
        """``text``: ``n`` lines joined by newlines (no trailing one); blank lines may be among them."""
        raise NotImplementedError

    def _ref(self, i: int) -> str:
        return f"{os.path.basename(self.path) if self.path != '-' else 'stdin'}:{i + 1}"

    def _block_from_rows(self, rows: list, refs_bad: list[tuple[str, str]], now: float) -> RawBlock:
        if not rows:
            return RawBlock(data=np.zeros((0,), self.dtype), ts=now, errors=refs_bad)
        shapes = {np.shape(r) for r in rows}
        if len(shapes) > 1:
            # Mixed widths: keep the most common width; the others are bad rows.
            counts: dict = {}
            for r in rows:
                counts[np.shape(r)] = counts.get(np.shape(r), 0) + 1
            best = max(counts, key=counts.get)
            keep = [r for r in rows if np.shape(r) == best]
            refs_bad = refs_bad + [("?", f"row has shape {np.shape(r)}, others have {best}") for r in rows if np.shape(r) != best]
            rows = keep
        return RawBlock(data=np.asarray(rows, dtype=self.dtype), ts=now, errors=refs_bad)


class CsvSource(_LineSource):
    """Comma-separated numbers, one sample per line; a non-numeric first line is a header."""

    kind = "csv"

    def __init__(self, source_id: str, path: str = "-", delimiter: str = ",", columns: list[int] | None = None,
                 **options: Any) -> None:
        super().__init__(source_id, path=path, **options)
        self.delimiter = delimiter
        self.columns = columns
        self._header_checked = False

    def parse(self, text: bytes, n: int, first_line: int) -> RawBlock:
        now = time.time()
        lines = text.split(b"\n")
        if not self._header_checked:
            self._header_checked = True
            head = lines[0].split(self.delimiter.encode())[0].strip()
            try:
                float(head)
            except ValueError:
                lines = lines[1:]
                first_line += 1
        if not lines:
            return RawBlock(data=np.zeros((0,), self.dtype), ts=now)
        try:
            # One C-level parse for the whole block: the sensor fast path.
            data = np.loadtxt(lines, dtype=self.dtype, delimiter=self.delimiter, ndmin=2,
                              usecols=self.columns, encoding="latin-1")
            return RawBlock(data=data, ts=now)
        except ValueError:
            pass
        rows, bad = [], []
        for i, line in enumerate(lines):
            if not line.strip():
                continue  # blank lines separate nothing; not an error
            try:
                row = np.loadtxt([line], dtype=self.dtype, delimiter=self.delimiter, ndmin=1,
                                 usecols=self.columns, encoding="latin-1")
                rows.append(row)
            except ValueError as exc:
                bad.append((self._ref(first_line + i), f"not a row of numbers: {str(exc).splitlines()[0][:120]}"))
        return self._block_from_rows(rows, bad, now)


class JsonLinesSource(_LineSource):
    """One JSON value per line: an array of numbers, or an object with the sample under ``field``.

    Arrays (the common sensor case) are parsed a block at a time by NumPy;
    objects fall back to ``json.loads`` per line and may carry ``ts``.
    """

    kind = "jsonl"

    def __init__(self, source_id: str, path: str = "-", field: str = "x", **options: Any) -> None:
        super().__init__(source_id, path=path, **options)
        self.field = field

    def parse(self, text: bytes, n: int, first_line: int) -> RawBlock:
        now = time.time()
        # Fast path, checked on the whole block (no Python step per line) with as
        # few passes over the bytes as will do (at sensor rates each pass costs a
        # tenth of the parse): one "[" and one "]" a line on average. Objects,
        # text and nested or ragged rows then fail in loadtxt (a non-number, or
        # uneven columns) and go to the per-line path below, which names the bad
        # lines. Only a bracket-less line of numbers paired with a nested line of
        # the same flat width would pass; neither is a JSON array of numbers.
        if text[:1] == b"[" and text.count(b"[") == n:
            flat = text.translate(None, b"[]")
            if len(text) - len(flat) == 2 * n:
                try:
                    # A file object, not a list of lines: no split pass, and NumPy's
                    # reader runs ~7 % faster over it (measured, 64-float rows).
                    data = np.loadtxt(io.BytesIO(flat), dtype=self.dtype, delimiter=",", ndmin=2,
                                      encoding="latin-1")
                    if len(data) == n:
                        return RawBlock(data=data, ts=now)
                except ValueError:
                    pass
        lines = text.split(b"\n")
        rows, bad, tss = [], [], []
        for i, line in enumerate(lines):
            if not line.strip():
                continue  # blank lines separate nothing; not an error
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    if self.field not in obj:
                        raise ValueError(f"object has no {self.field!r} key")
                    tss.append(float(obj.get("ts", now)))
                    obj = obj[self.field]
                else:
                    tss.append(now)
                row = np.asarray(obj, dtype=self.dtype)
                if row.dtype == object:
                    raise ValueError("ragged array")
                rows.append(row)
            except (ValueError, TypeError) as exc:
                if tss and len(tss) > len(rows):
                    tss.pop()
                bad.append((self._ref(first_line + i), f"not a JSON array of numbers: {str(exc)[:120]}"))
        if rows:
            shapes = [np.shape(r) for r in rows]
            best = max(set(shapes), key=shapes.count)
            keep = [i for i, sh in enumerate(shapes) if sh == best]
            bad += [("?", f"row has shape {sh}, the others {best}") for sh in shapes if sh != best]
            rows, tss = [rows[i] for i in keep], [tss[i] for i in keep]
        block = self._block_from_rows(rows, bad, now)
        if block.data is not None and len(block.data) == len(tss) and any(t != now for t in tss):
            block.ts = np.asarray(tss)
        return block


class StreamSource(Source):
    """A FIFO or stdin carrying JSON lines (default) or CSV: how serial sensors usually arrive."""

    kind = "stream"

    def __init__(self, source_id: str, path: str = "-", format: str = "jsonl", **options: Any) -> None:  # noqa: A002
        if format not in ("jsonl", "csv"):
            raise ConfigError(f"[[sources]] format: must be 'jsonl' or 'csv' (got {format!r})")
        super().__init__(source_id)
        cls = JsonLinesSource if format == "jsonl" else CsvSource
        self._inner = cls(source_id, path=path, **options)

    def open(self) -> None:
        super().open()
        self._inner.open()

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        block = self._inner.read(max_n, timeout)
        self.exhausted = self._inner.exhausted
        return block

    def close(self) -> None:
        self._inner.close()


class SyntheticSource(Source):
    """Random samples of ``shape`` (for tests and benchmarks), optionally rate-limited.

    ``rate_hz`` paces the stream (0 = as fast as it is consumed); ``count``
    ends it; ``distinct`` > 0 cycles through that many distinct samples (to
    exercise the result cache); ``nan_every`` > 0 puts a NaN into every n-th
    sample (to exercise rejection).
    """

    kind = "synthetic"

    def __init__(self, source_id: str, shape: list[int] | None = None, rate_hz: float = 0.0,
                 count: int | None = None, seed: int = 0, distinct: int = 0, nan_every: int = 0,
                 dtype: str = "float32", **options: Any) -> None:
        super().__init__(source_id, **options)
        if not shape:
            raise ConfigError(f"[[sources]] shape: the synthetic source {source_id!r} needs shape = [..] of one sample")
        self.shape = tuple(int(s) for s in shape)
        self.rate_hz = float(rate_hz)
        self.count = count
        self.seed = seed
        self.distinct = int(distinct)
        self.nan_every = int(nan_every)
        self.dtype = np.dtype(dtype)
        self._rng = np.random.default_rng(seed)
        self._made = 0
        self._t0 = 0.0
        self._pool = None
        self._stop = threading.Event()

    def open(self) -> None:
        super().open()
        self._made = 0
        self._t0 = time.monotonic()
        if self.distinct:
            self._pool = self._rng.standard_normal((self.distinct, *self.shape)).astype(self.dtype)

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        n = max_n
        if self.count is not None:
            n = min(n, self.count - self._made)
            if n <= 0:
                self.exhausted = True
                return None
        if self.rate_hz > 0:
            n = paced(n, made=self._made, t0=self._t0, rate_hz=self.rate_hz, stop=self._stop, timeout=timeout)
            if n is None:
                return None
        if self._pool is not None:
            idx = (np.arange(self._made, self._made + n)) % self.distinct
            data = self._pool[idx]
        else:
            data = self._rng.standard_normal((n, *self.shape)).astype(self.dtype)
        if self.nan_every:
            rows = np.arange(self._made, self._made + n)
            hit = (rows + 1) % self.nan_every == 0
            if hit.any():
                data = data.copy()
                data[hit, ...] = np.nan
        self._made += n
        return RawBlock(data=data, ts=time.time())

    def close(self) -> None:
        self._stop.set()


# -- files and cameras -------------------------------------------------------

def decode_file(path: str, color: str | None = None) -> np.ndarray:
    """Decode one image (Pillow) or ``.npy`` file into an array; InputError when unreadable."""
    p = str(path)
    if p.endswith(".npy"):
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{os.path.basename(p)}: not a readable .npy file ({exc})") from exc
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - pillow is in the agent extra
        raise ConfigError("decoding images needs Pillow: pip install 'edgeship[agent]'") from exc
    try:
        with Image.open(p) as img:
            if color:
                img = img.convert(color)
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise InputError(f"{os.path.basename(p)}: unreadable image ({' '.join(str(exc).split())[:160]})") from exc


def preload_image_decoder() -> threading.Thread:
    """Import Pillow and its JPEG/PNG decoders in a daemon thread (start-up: meanwhile the model loads).

    The first image a folder source decodes would otherwise pay these
    imports on the way to the first result, after the model is loaded.
    """
    def load() -> None:
        try:
            from PIL import Image  # noqa: PLC0415

            Image.preinit()  # the common decoders (BMP, GIF, JPEG, PPM, PNG)
        except Exception:  # a missing Pillow is reported by the first decode, in one line
            pass

    t = threading.Thread(target=load, name="edgeship-preload-pil", daemon=True)
    t.start()
    return t


class FolderSource(Source):
    """Image or ``.npy`` files from a folder or a glob, in name order; ``watch`` picks up new files.

    Files are only listed here; decoding happens in the prefetch workers
    (``decode``), in parallel with inference. ``color`` converts images
    ("L", "RGB") before the manifest preprocess. A watched folder is polled
    every ``poll_s``; files are taken once their size stopped changing
    between two polls (so a half-copied file is not read).
    """

    kind = "folder"
    decodes = True

    def __init__(self, source_id: str, path: str = "", pattern: str = "*", watch: bool = False,
                 poll_s: float = 0.5, color: str | None = None, recursive: bool = False, **options: Any) -> None:
        super().__init__(source_id, **options)
        if not path:
            raise ConfigError(f"[[sources]] path: the folder source {source_id!r} needs a folder or a glob")
        self.path = path
        self.pattern = pattern
        self.watch = watch
        self.poll_s = poll_s
        self.color = color
        self.recursive = recursive
        self._queue: list[str] = []
        self._seen: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._last_poll = 0.0
        self._stop = threading.Event()

    def _glob(self) -> list[str]:
        if any(c in self.path for c in "*?["):
            pat = self.path
        else:
            if not os.path.isdir(self.path):
                raise ConfigError(f"source {self.id!r}: {self.path} is not a folder")
            pat = os.path.join(self.path, "**" if self.recursive else "", self.pattern)
        names = _glob.glob(pat, recursive=self.recursive)
        return sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES + (".npy",)) and os.path.isfile(n))

    def _poll(self) -> None:
        self._last_poll = time.monotonic()
        fresh = []
        for name in self._glob():
            if name in self._seen:
                continue
            if self.watch:
                try:
                    size = os.path.getsize(name)
                except OSError:
                    continue
                if self._sizes.get(name) != size:  # still being written, or first sight
                    self._sizes[name] = size
                    if not self._initial:
                        continue
                self._sizes.pop(name, None)
            self._seen.add(name)
            fresh.append(name)
        self._queue.extend(fresh)

    def open(self) -> None:
        super().open()
        self._queue, self._seen, self._sizes = [], set(), {}
        self._initial = True
        self._poll()  # files already there are taken at once
        self._initial = False

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        if not self._queue:
            if not self.watch:
                self.exhausted = True
                return None
            wait = self._last_poll + self.poll_s - time.monotonic()
            if wait > 0 and self._stop.wait(min(wait, timeout)):
                return None
            if time.monotonic() - self._last_poll >= self.poll_s:
                self._poll()
            if not self._queue:
                return None
        items, self._queue = self._queue[:max_n], self._queue[max_n:]
        return RawBlock(items=items, ts=time.time(), refs=[os.path.basename(i) for i in items])

    def decode(self, item) -> np.ndarray:
        return decode_file(item, self.color)

    def close(self) -> None:
        self._stop.set()


class FakeCapture:
    """A camera without hardware, behind OpenCV's ``VideoCapture`` interface (``read``, ``release``).

    Frames are a moving gradient (``height x width x 3`` uint8, BGR like
    OpenCV) at ``fps``; ``fail_after`` > 0 makes ``read`` return
    ``(False, None)`` after that many frames (an unplugged camera).
    """

    def __init__(self, width: int = 64, height: int = 48, fps: float = 0.0, fail_after: int = 0) -> None:
        self.width, self.height, self.fps, self.fail_after = width, height, fps, fail_after
        self._n = 0
        self._t0 = time.monotonic()
        self._base = (np.arange(width)[None, :, None] + np.arange(height)[:, None, None]).astype(np.uint8)
        self._closed = threading.Event()

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return not self._closed.is_set()

    def read(self):
        if self._closed.is_set() or (self.fail_after and self._n >= self.fail_after):
            return False, None
        if self.fps > 0:
            due = self._t0 + self._n / self.fps
            if self._closed.wait(max(0.0, due - time.monotonic())):
                return False, None
        frame = np.repeat(self._base + np.uint8(self._n % 256), 3, axis=2)
        self._n += 1
        return True, frame

    def release(self) -> None:
        self._closed.set()


class CameraSource(Source):
    """Frames from a camera through OpenCV (``device`` index or URL); ``device = "fake"`` needs no hardware.

    Frames are grabbed here (one per sample, BGR as OpenCV gives them) and
    converted to RGB/L and preprocessed by the prefetch workers.
    """

    kind = "camera"
    decodes = True

    def __init__(self, source_id: str, device: int | str = 0, width: int | None = None, height: int | None = None,
                 fps: float | None = None, color: str = "RGB", capture: Any = None, **options: Any) -> None:
        super().__init__(source_id, **options)
        self.device = device
        self.width, self.height, self.fps = width, height, fps
        self.color = color
        self._capture_given = capture
        self._cap = None

    def open(self) -> None:
        super().open()
        if self._capture_given is not None:
            self._cap = self._capture_given
            return
        if self.device == "fake":
            self._cap = FakeCapture(self.width or 64, self.height or 48, self.fps or 0.0)
            return
        try:
            import cv2  # noqa: PLC0415 - optional, heavy
        except ImportError as exc:
            raise ConfigError("the camera source needs OpenCV: pip install opencv-python-headless "
                              "(or use device = \"fake\" to test without a camera)") from exc
        cap = cv2.VideoCapture(self.device)
        if self.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        if self.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        if self.fps:
            cap.set(cv2.CAP_PROP_FPS, self.fps)
        if not cap.isOpened():
            raise ConfigError(f"source {self.id!r}: camera {self.device!r} cannot be opened (check the cable and /dev/video*)")
        self._cap = cap

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        if self._cap is None:
            raise ConfigError(f"source {self.id!r} is not open")
        ok, frame = self._cap.read()
        if not ok:
            # An unplugged camera: raise so the prefetch stage restarts us with backoff.
            raise OSError(f"camera {self.device!r} returned no frame")
        return RawBlock(items=[frame], ts=time.time())

    def decode(self, item) -> np.ndarray:
        frame = item[..., ::-1] if item.ndim == 3 else item  # BGR -> RGB
        if self.color == "L" and frame.ndim == 3:
            frame = (frame @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        return np.ascontiguousarray(frame)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
        self._cap = None


_BUILTIN = {"folder": FolderSource, "jsonl": JsonLinesSource, "csv": CsvSource, "stream": StreamSource,
            "synthetic": SyntheticSource, "camera": CameraSource}


def source_class(kind: str) -> type:
    """The class registered for ``kind``: the built-ins, then plug-ins (entry points).

    Built-ins first: listing entry points reads every installed
    distribution's metadata (~175 ms on a 2-core machine, a quarter of the
    agent's start-up), and a plug-in named like a built-in must not silently
    replace it (setup.cfg declares the built-ins under the same names).
    """
    if kind in _BUILTIN:
        return _BUILTIN[kind]
    from importlib import metadata  # noqa: PLC0415 - plug-ins only: importing it costs ~8 MB and ~30 ms at start-up

    try:
        eps = metadata.entry_points(group="edgeship.sources")
    except Exception:  # a broken distribution's metadata must not stop the agent
        eps = ()
    for ep in eps:
        if ep.name == kind:
            try:
                return ep.load()
            except Exception as exc:
                raise ConfigError(f"[[sources]] type: plug-in {kind!r} ({ep.value}) cannot be loaded: {exc}") from exc
    if kind in _BUILTIN:
        return _BUILTIN[kind]
    known = sorted({*(_BUILTIN), *(ep.name for ep in eps)})
    raise ConfigError(f"[[sources]] type: unknown source type {kind!r} (known: {', '.join(known)})")


def make_source(kind: str, source_id: str, **options: Any) -> Source:
    try:
        return source_class(kind)(source_id, **options)
    except TypeError as exc:
        raise ConfigError(f"[[sources]] {source_id}: bad options for a {kind} source: {exc}") from exc


def paced(n: int, *, made: int, t0: float, rate_hz: float, stop: threading.Event, timeout: float) -> int | None:
    """How many of ``n`` samples a source running at ``rate_hz`` since ``t0`` may emit now.

    Waits (at most ``timeout``, or until ``stop``) for the next one when none
    is due yet; returns None when still none is due or the source is stopping.
    """
    due = int((time.monotonic() - t0) * rate_hz) - made
    if due <= 0:
        wait = (made + 1) / rate_hz - (time.monotonic() - t0)
        if stop.wait(min(max(wait, 0.0), timeout)):
            return None
        due = int((time.monotonic() - t0) * rate_hz) - made
        if due <= 0:
            return None
    return min(n, due)
