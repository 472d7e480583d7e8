"""The manifest's ``preprocess`` section, applied with numpy.

Steps, in order, each optional::

    {"color": "L" | "RGB" | "BGR",     # decode/convert images (Pillow, lazily)
     "resize": [height, width],        # bilinear (Pillow, antialiased)
     "scale": 0.00392,                 # x * scale
     "mean": [..], "std": [..],        # (x - mean) / std, per channel (last axis before layout)
     "layout": "NHWC" | "NCHW",        # raw samples are HWC; NCHW moves channels first
     "dtype": "float32"}               # final dtype

A raw sample is an image file path, image bytes, a PIL image, or an array
(HW or HWC for images, anything for other models). :class:`Preprocessor`
turns one raw sample into one model input row (no batch axis) and a list of
samples into a batch. Pure numpy except the image decoding.
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError, EdgeshipError, InputError

__all__ = ["KEYS", "check_preprocess", "Preprocessor", "resize", "resize_bilinear", "decode_image"]

KEYS = ("color", "resize", "scale", "mean", "std", "layout", "dtype")
_COLORS = ("L", "RGB", "BGR")
_LAYOUTS = ("NHWC", "NCHW")


def check_preprocess(spec: Mapping[str, Any] | None, *, error: type[EdgeshipError] = ConfigError) -> dict | None:
    """Validate a preprocess dict; returns a clean copy. Unknown steps are refused so
    a device never silently skips a step it does not understand."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise error(f"preprocess must be an object with keys {', '.join(KEYS)}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise error(f"preprocess: unknown step {unknown[0]!r}; known steps are {', '.join(KEYS)} "
                    "(a newer edgeship may be needed)")
    out: dict[str, Any] = {}
    if spec.get("color") is not None:
        if spec["color"] not in _COLORS:
            raise error(f"preprocess: color must be one of {', '.join(_COLORS)}, got {spec['color']!r}")
        out["color"] = spec["color"]
    if spec.get("resize") is not None:
        r = spec["resize"]
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in r)):
            raise error(f"preprocess: resize must be [height, width] positive ints, got {r!r}")
        out["resize"] = [int(r[0]), int(r[1])]
    if spec.get("scale") is not None:
        if not isinstance(spec["scale"], (int, float)) or isinstance(spec["scale"], bool):
            raise error(f"preprocess: scale must be a number, got {spec['scale']!r}")
        out["scale"] = float(spec["scale"])
    for key in ("mean", "std"):
        if spec.get(key) is not None:
            v = spec[key]
            vals = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if (not isinstance(vals, (list, tuple)) or not vals
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)):
                raise error(f"preprocess: {key} must be a number or a list of numbers, got {v!r}")
            if key == "std" and any(x == 0 for x in vals):
                raise error("preprocess: std must not contain 0")
            out[key] = [float(x) for x in vals]
    if spec.get("layout") is not None:
        if spec["layout"] not in _LAYOUTS:
            raise error(f"preprocess: layout must be NHWC or NCHW, got {spec['layout']!r}")
        out["layout"] = spec["layout"]
    if spec.get("dtype") is not None:
        try:
            out["dtype"] = str(np.dtype(spec["dtype"]))
        except TypeError as exc:
            raise error(f"preprocess: unknown dtype {spec['dtype']!r}") from exc
    return out


def decode_image(sample: Any, color: str | None = None) -> np.ndarray:
    """An image file path, bytes or PIL image -> HWC (or HW for "L") uint8 array."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ConfigError("decoding images needs Pillow: pip install 'edgeship[agent]'") from exc
    if isinstance(sample, Image.Image):
        img = sample
    else:
        src = io.BytesIO(bytes(sample)) if isinstance(sample, (bytes, bytearray, memoryview)) else str(sample)
        try:
            img = Image.open(src)
            img.load()
        except FileNotFoundError as exc:
            raise InputError(f"image file {sample} does not exist", input_name="image") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            what = "the image bytes" if not isinstance(src, str) else f"image file {src}"
            raise InputError(f"cannot decode {what}: {exc}; give a PNG/JPEG/BMP image or an array",
                             input_name="image") from exc
    mode = "RGB" if color == "BGR" else color
    if mode and img.mode != mode:
        img = img.convert(mode)
    arr = np.asarray(img)
    if color == "BGR":
        arr = arr[..., ::-1]
    return arr


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an HW or HWC array (align_corners=False, like PIL/OpenCV). Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    h, w = x.shape[:2]
    if (h, w) == (height, width):
        return x

    def coords(n_in: int, n_out: int):
        c = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
        c = np.clip(c, 0, n_in - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (c - lo).astype(np.float32)

    y0, y1, fy = coords(h, height)
    x0, x1, fx = coords(w, width)
    fy = fy.reshape((-1, 1) + (1,) * (x.ndim - 2))
    fx = fx.reshape((1, -1) + (1,) * (x.ndim - 2))
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bot = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an HW or HWC array to (height, width) as float32.

    Uses Pillow's bilinear filter (antialiased when shrinking, as torchvision
    and most training pipelines do) channel by channel in float mode, so a
    file and the same pixels given as an array give identical results. Falls
    back to plain bilinear interpolation without Pillow.
    """
    x = np.asarray(x)
    if x.shape[:2] == (height, width):
        return x.astype(np.float32, copy=False)
    try:
        from PIL import Image
    except ImportError:
        return resize_bilinear(x, height, width)
    chans = x[..., None] if x.ndim == 2 else x
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(chans[..., c], dtype=np.float32))
                      .resize((width, height), Image.BILINEAR), dtype=np.float32)
           for c in range(chans.shape[-1])]
    res = np.stack(out, axis=-1)
    return res[..., 0] if x.ndim == 2 else res


def _is_image_source(sample: Any) -> bool:
    if isinstance(sample, (str, os.PathLike, bytes, bytearray, memoryview)):
        return True
    return type(sample).__module__.startswith("PIL.")


class Preprocessor:
    """Applies one manifest ``preprocess`` to raw samples for one model input.

    ``input_shape``: the model input's shape (``-1`` = any), used to tell one
    sample from a batch and to check the result.
    """

    def __init__(self, spec: Mapping[str, Any] | None, input_shape: Sequence[int] | None = None,
                 input_dtype: str = "float32") -> None:
        self.spec = check_preprocess(spec) or {}
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.dtype = np.dtype(self.spec.get("dtype", input_dtype if input_dtype.startswith("float") else "float32"))
        # Image samples are recognised by these steps.
        self.is_image = any(k in self.spec for k in ("color", "resize", "layout"))

    @property
    def sample_rank(self) -> int | None:
        """Rank of one preprocessed sample (model input rank minus the batch axis)."""
        return None if self.input_shape is None else max(len(self.input_shape) - 1, 0)

    def is_batch(self, sample: Any) -> bool:
        """Whether ``sample`` is a batch of raw samples rather than one."""
        if isinstance(sample, (list, tuple)):
            return True
        if _is_image_source(sample):
            return False
        arr = np.asarray(sample)
        if self.is_image:
            if self.spec.get("color") == "L":
                return arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] != 1)
            return arr.ndim == 4
        rank = self.sample_rank
        return rank is not None and arr.ndim == rank + 1

    def one(self, sample: Any) -> np.ndarray:
        """One raw sample -> one model input row (no batch axis)."""
        s = self.spec
        if _is_image_source(sample):
            x = decode_image(sample, s.get("color"))
        else:
            x = np.asarray(sample)
            if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
                raise InputError(f"sample of dtype {x.dtype} is not numeric; give numbers or an image",
                                 input_name="sample", expected="numeric", got=str(x.dtype))
            if s.get("color") == "BGR" and x.ndim == 3:
                x = x[..., ::-1]
        if self.is_image and x.ndim == 2:
            x = x[..., None]  # HW -> HWC so channel-wise steps and layout apply uniformly
        if "resize" in s:
            if x.ndim != 3:
                raise InputError(f"cannot resize a sample of shape {x.shape}; expected an HxW or HxWxC image",
                                 input_name="sample", expected="HW or HWC", got=x.shape)
            x = resize(x, *s["resize"])
        x = x.astype(np.float32, copy=False)
        if "scale" in s:
            x = x * np.float32(s["scale"])
        if "mean" in s:
            x = x - np.asarray(s["mean"], dtype=np.float32)
        if "std" in s:
            x = x / np.asarray(s["std"], dtype=np.float32)
        if s.get("layout") == "NCHW" and x.ndim == 3:
            x = np.transpose(x, (2, 0, 1))
        rank = self.sample_rank
        if rank is not None and x.ndim != rank and x.size == int(np.prod([d for d in self.input_shape[1:]])) \
                and all(d > 0 for d in self.input_shape[1:]):
            x = x.reshape(self.input_shape[1:])  # e.g. an 8x8 image for a flat 64-feature model
        return np.ascontiguousarray(x.astype(self.dtype, copy=False))

    def batch(self, samples: Sequence[Any]) -> np.ndarray:
        rows = [self.one(s) for s in samples]
        if not rows:
            raise InputError("empty batch: give at least one sample", input_name="sample")
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:
            raise InputError(f"samples have different shapes after preprocessing: {sorted(shapes)}",
                             input_name="sample", got=sorted(shapes))
        return np.stack(rows)

    def __call__(self, sample: Any) -> tuple[np.ndarray, bool]:
        """``(batch array, was_batch)`` for one raw sample or a batch of them."""
        if self.is_batch(sample):
            return self.batch(list(sample)), True
        return self.one(sample)[None, ...], False
