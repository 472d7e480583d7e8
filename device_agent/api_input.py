"""Request bodies of the local HTTP API, parsed; responses as strict JSON (pure: bytes in, arrays out).

The formats are documented for users in docs/http-api.md. Everything here
works on a body already read whole (its size is bounded by ``[api]
max_body_bytes`` before it is read), refuses what it cannot parse with an
:class:`~edgeship.errors.InputError` whose message is one line, and never
trusts a size that the body declares (a ``.npy`` header, an image header,
a multipart part count) before checking it against what is there.

No sockets and no threads here: ``device_agent/api.py`` does the I/O.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import InputError

__all__ = ["InferRequest", "parse_infer", "parse_multipart", "load_npy", "decode_image_bytes", "strict_json",
           "parse_json",
           "INPUT_KINDS", "MAX_IMAGE_PIXELS"]

INPUT_KINDS = ("raw", "model")
# Image formats the API decodes; others (TIFF, EPS, ...) are refused unread: less decoder surface.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "PPM")
MAX_IMAGE_PIXELS = 4096 * 4096  # above a 12 MP camera frame; checked from the header before decoding
NPY_TYPES = ("application/x-npy", "application/octet-stream")
_OPTIONS = ("input", "preprocess", "deadline_ms", "outputs", "stream", "reset", "batch")
_JSON_KEYS = ("x", "inputs", "samples") + _OPTIONS[:-1]
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# RFC 9110 parameter: name=token or name="quoted string"
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


@dataclass
class InferRequest:
    """One ``POST /v1/infer``: its samples and options."""

    samples: list = field(default_factory=list)  # each an array, or {input name: array} for multi-input models
    batch: bool = False  # answer {"results": [...]} (one entry per sample) instead of one result
    input: str = "raw"  # "raw": the package's preprocess is applied; "model": rows are model-ready
    deadline_ms: float | None = None
    outputs: bool = True  # include the raw output tensors
    images: int = 0  # how many samples are uploaded images (raw input only)
    stream: str | None = None  # a stateful model's stream id: its state carries from call to call
    reset: bool = False  # the (first) sample restarts ``stream`` from the initial state


# -- options ---------------------------------------------------------------------------------------

def _flag(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise InputError(f"{name} must be true or false (got {str(v)[:40]!r})")


def _set_option(req: InferRequest, key: str, v: Any, seen: dict) -> None:
    if key == "input":
        kind = str(v).strip().lower()
        if kind not in INPUT_KINDS:
            raise InputError(f"input must be \"raw\" (the package's preprocess is applied) or \"model\" "
                             f"(model-ready rows), got {str(v)[:40]!r}")
    elif key == "preprocess":  # the older spelling: preprocess=false is input=model
        kind = "raw" if _flag(v, "preprocess") else "model"
    elif key == "deadline_ms":
        try:
            ms = float(v)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"deadline_ms must be a number (got {str(v)[:40]!r})") from None
        if not (0 < ms < 1e9):  # also refuses NaN
            raise InputError(f"deadline_ms must be > 0 and finite (got {str(v)[:40]!r})")
        req.deadline_ms = ms
        return
    elif key == "outputs":
        req.outputs = _flag(v, "outputs")
        return
    elif key == "stream":
        sid = str(v)
        if not isinstance(v, (str, int)) or isinstance(v, bool) or not 0 < len(sid) <= 128 or not sid.isprintable():
            raise InputError("stream must be a non-empty id of at most 128 printable characters")
        req.stream = sid
        return
    elif key == "reset":
        req.reset = _flag(v, "reset")
        return
    else:  # batch
        req.batch = req.batch or _flag(v, "batch")
        return
    other = seen.get("kind")
    if other is not None and other[1] != kind:
        raise InputError(f"{key} says {kind} input but {other[0]} says {other[1]}; give one of them")
    seen["kind"] = (key, kind)
    req.input = kind


def _options(req: InferRequest, pairs: Mapping[str, Any], where: str, seen: dict) -> None:
    for k, v in pairs.items():
        if k not in _OPTIONS:
            raise InputError(f"unknown {where} parameter {k[:40]!r}; known: {', '.join(_OPTIONS)}")
        _set_option(req, k, v, seen)


def content_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``'multipart/form-data; boundary="x"'`` -> ``('multipart/form-data', {'boundary': 'x'})``."""
    value = value or ""
    head, sep, rest = value.partition(";")
    mime = head.strip().lower()
    params: dict[str, str] = {}
    if not sep:
        return mime, params
    for m in _PARAM.finditer(";" + rest):
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params[m.group(1).lower()] = v
    return mime, params


# -- arrays ----------------------------------------------------------------------------------------

def _array(v: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(v)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise InputError(f"{what}: not a rectangular array of numbers ({' '.join(str(exc).split())[:120]})") from None
    if a.dtype == object:
        raise InputError(f"{what}: ragged, mixed or out-of-range array; send a rectangular array of numbers "
                         "(integers within 64 bits)")
    if a.dtype.kind not in "biuf":
        raise InputError(f"{what}: values must be numbers (got {a.dtype.kind!r} data)")
    if a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    return a


def _sample(v: Any, what: str) -> Any:
    if isinstance(v, Mapping):
        if not v:
            raise InputError(f"{what}: an empty object; give {{input name: array}}")
        return {str(k): _array(a, f"{what}.{k}") for k, a in v.items()}
    return _array(v, what)


def load_npy(data: bytes, what: str = "body") -> np.ndarray:
    """A ``.npy`` file's array; its header is checked against the bytes there before anything is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(f"{what}: .npy version {version} is not supported")
    except InputError:
        raise
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise InputError(f"{what}: not a readable .npy file ({' '.join(str(exc).split())[:160]})") from None
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{what}: .npy dtype {dtype.str!r} is not a plain number type")
    count = math.prod(shape)  # Python ints: a header declaring 2**40 elements does not overflow
    need = count * dtype.itemsize
    have = len(data) - f.tell()
    if need != have:
        raise InputError(f"{what}: .npy header declares shape {tuple(shape)} ({need} bytes) but {have} bytes follow")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
    return a.astype(dtype.newbyteorder("="), copy=True)  # writable and native byte order, like np.load gave


def decode_image_bytes(data: bytes, color: str | None = None, what: str = "image") -> np.ndarray:
    """Image bytes -> HWC (or HW for "L") uint8 array; the pixel count is checked before decoding."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("image uploads need Pillow on the device (pip install 'edgeship[agent]'); "
                         "send an array instead") from None
    from ..preprocess import decode_image  # noqa: PLC0415 - only image requests need it

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"{what}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
        img.load()
        if color is None and img.mode not in ("L", "RGB"):
            color = "RGB"  # palette, RGBA, CMYK, 16-bit: give the model plain pixels
        return decode_image(img, color)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes raise many types; all mean "bad image"
        reason = ("not an image of a known format" if isinstance(exc, Image.UnidentifiedImageError)
                  else " ".join(str(exc).split())[:160] or type(exc).__name__)
        raise InputError(f"{what}: cannot decode the image ({reason}); send PNG, JPEG, BMP, GIF, WebP or PPM") from None


# -- multipart/form-data -----------------------------------------------------------------------------

@dataclass
class Part:
    name: str
    filename: str | None
    ctype: str
    data: bytes


def parse_multipart(body: bytes, boundary: str | None, max_parts: int) -> list[Part]:
    """The parts of a ``multipart/form-data`` body (RFC 7578), at most ``max_parts``."""
    if not boundary or len(boundary) > 70:
        raise InputError("multipart/form-data needs a boundary parameter of 1 to 70 characters")
    delim = b"--" + boundary.encode("latin-1", "replace")
    pos = body.find(delim)
    if pos < 0:
        raise InputError("multipart body does not contain its boundary")
    parts: list[Part] = []
    pos += len(delim)
    while True:
        if body[pos:pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos, pos + 1024)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise InputError("multipart body: malformed boundary line")
        start = eol + 2
        end = body.find(b"\r\n" + delim, start)
        if end < 0:
            raise InputError("multipart body has no closing boundary")
        if len(parts) == max_parts:
            raise InputError(f"multipart body has more than {max_parts} parts")
        parts.append(_part(body[start:end], len(parts)))
        pos = end + 2 + len(delim)


def _part(raw: bytes, i: int) -> Part:
    if raw.startswith(b"\r\n"):
        head, data = b"", raw[2:]
    else:
        head, sep, data = raw.partition(b"\r\n\r\n")
        if not sep:
            raise InputError(f"multipart part {i}: no blank line after its headers")
    lines = head.split(b"\r\n") if head else []
    if len(lines) > 16 or len(head) > 8192:
        raise InputError(f"multipart part {i}: too many or too long headers")
    headers = {}
    for line in lines:
        k, sep, v = line.decode("utf-8", "replace").partition(":")
        if not sep:
            raise InputError(f"multipart part {i}: malformed header line")
        headers[k.strip().lower()] = v.strip()
    disp, params = content_type(headers.get("content-disposition"))
    if disp != "form-data" or "name" not in params:
        raise InputError(f"multipart part {i}: needs Content-Disposition: form-data; name=\"...\"")
    ctype = content_type(headers.get("content-type"))[0]
    return Part(params["name"], params.get("filename"), ctype, data)


def _file_sample(req: InferRequest, p: Part, what: str, color: str | None) -> Any:
    if p.ctype == "application/x-npy" or p.data[:6] == b"\x93NUMPY":
        return load_npy(p.data, what)
    if p.ctype == "application/json":
        return _sample(parse_json(p.data, what), what)
    req.images += 1
    return decode_image_bytes(p.data, color, what)


# -- the whole request -----------------------------------------------------------------------------

def _no_constants(name: str):
    raise InputError(f"JSON contains {name}; send finite numbers (strict JSON has no NaN/Infinity)")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)  # built once: json.loads(..., parse_constant=) builds one per call
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def parse_json(body: bytes, what: str = "body") -> Any:
    """Strict JSON (no NaN/Infinity); too deep or malformed -> :class:`InputError` with one line."""
    try:
        return _DECODER.decode(body.decode("utf-8-sig") if isinstance(body, (bytes, bytearray)) else body)
    except RecursionError:
        raise InputError(f"{what}: JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{what} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None


def parse_infer(body: bytes, ctype_header: str | None, query: Mapping[str, list[str]] | None, *,
                max_samples: int, color: str | None = None) -> InferRequest:
    """One ``POST /v1/infer`` body (+ its query parameters) -> :class:`InferRequest`.

    ``color``: the package's preprocess color, for decoding uploaded images.
    """
    req = InferRequest()
    seen: dict = {}
    if query:
        _options(req, {k: v[-1] for k, v in query.items()}, "query", seen)
    mime, params = content_type(ctype_header)
    if mime.startswith("image/"):
        req.samples = [decode_image_bytes(body, color)]
        req.images = 1
    elif mime == "multipart/form-data":
        files = []
        fields = {}
        for i, p in enumerate(parse_multipart(body, params.get("boundary"), max_samples + len(_OPTIONS))):
            if p.filename is not None or p.ctype not in ("", "text/plain"):
                files.append(_file_sample(req, p, f"part {i} ({p.name[:40]})", color))
            else:
                fields[p.name] = p.data.decode("utf-8", "replace")[:100]
        _options(req, fields, "form", seen)
        if not files:
            raise InputError("multipart body has no file part; attach the sample(s) as files")
        req.samples = files
        req.batch = req.batch or len(files) > 1
    elif mime in NPY_TYPES or body[:6] == b"\x93NUMPY":
        a = load_npy(body)
        req.samples = [a] if not req.batch else list(a) if a.ndim else []
    else:  # JSON; also what curl -d sends (form-urlencoded)
        obj = parse_json(body)
        if isinstance(obj, dict):
            unknown = [k for k in obj if k not in _JSON_KEYS]
            if unknown:
                raise InputError(f"unknown key {str(unknown[0])[:40]!r}; known: "
                                 f"{', '.join(json.dumps(k) for k in _JSON_KEYS)}")
            given = [k for k in ("x", "inputs", "samples") if k in obj]
            if len(given) != 1:
                raise InputError("JSON object needs exactly one of \"x\": [...] (one sample), \"inputs\": "
                                 "{name: [...]} (one multi-input sample) or \"samples\": [...] (a batch)")
            _options(req, {k: obj[k] for k in _OPTIONS[:-1] if k in obj}, "JSON", seen)
            key = given[0]
            if key == "x":
                req.samples = [_array(obj["x"], "x")]
            elif key == "inputs":
                if not isinstance(obj["inputs"], dict):
                    raise InputError("\"inputs\" must be an object {input name: array}")
                req.samples = [_sample(obj["inputs"], "inputs")]
            else:
                if not isinstance(obj["samples"], list):
                    raise InputError("\"samples\" must be a list of samples")
                if len(obj["samples"]) > max_samples:
                    raise InputError(f"{len(obj['samples'])} samples is over the {max_samples} per request "
                                     "([api] max_batch)")
                req.samples = [_sample(s, f"samples[{i}]") for i, s in enumerate(obj["samples"])]
                req.batch = True
        else:
            req.samples = [_array(obj, "body")]
    if not req.samples:
        raise InputError("the request holds no sample")
    if len(req.samples) > max_samples:
        raise InputError(f"{len(req.samples)} samples is over the {max_samples} per request ([api] max_batch)")
    if req.reset and req.stream is None:
        raise InputError("reset restarts a stream: give the stream id too (\"stream\": \"...\")")
    if req.input == "model" and req.images:
        raise InputError("an uploaded image is raw input: the package's preprocess turns it into model input; "
                         "drop input=model")
    return req


# -- strict JSON out -------------------------------------------------------------------------------

_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _finite(v: Any) -> tuple[Any, bool]:
    if isinstance(v, float):
        if math.isfinite(v):
            return v, False
        return ("NaN" if math.isnan(v) else _NONFINITE[v]), True
    if isinstance(v, dict):
        out, changed = {}, False
        for k, x in v.items():
            out[k], c = _finite(x)
            changed |= c
        return out, changed
    if isinstance(v, (list, tuple)):
        out_l, changed = [], False
        for x in v:
            y, c = _finite(x)
            out_l.append(y)
            changed |= c
        return out_l, changed
    return v, False


def _flagged(d: Any) -> Any:
    out, changed = _finite(d)
    if changed and isinstance(out, dict):
        out["nonfinite"] = True
    return out


def strict_json(obj: Any) -> bytes:
    """Strict JSON bytes of an answer. A NaN/±inf float becomes the string "NaN"/"Infinity"/
    "-Infinity" (``float()`` in Python and ``Number()`` in JavaScript read them back) and the
    result that held one (the answer, or its entry in ``"results"``) gets ``"nonfinite": true``."""
    try:
        return _ENCODER.encode(obj).encode()
    except ValueError:  # the rare path: only answers with NaN/inf pay for the walk
        if isinstance(obj, dict) and isinstance(obj.get("results"), list):
            obj = {**obj, "results": [_flagged(r) for r in obj["results"]]}
        return _ENCODER.encode(_flagged(obj)).encode()
