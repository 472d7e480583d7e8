"""Turn a captured model input into a PNG the browser can show (pure, stdlib + numpy).

Feedback may attach the input that was misjudged: raw image bytes (PNG/JPEG
as captured) or an array (``.npy`` bytes, or a nested list). Arrays that look
like images — (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, possibly with a
leading batch axis of 1 — are scaled to 0..255 and encoded here with zlib, so
the console needs no imaging library. Anything else is "not an image".
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

__all__ = ["png_bytes", "as_image_array", "input_to_png", "sniff_image"]

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def sniff_image(data: bytes) -> str | None:
    """MIME type of raw image bytes we can hand to a browser as they are."""
    if data.startswith(_PNG_SIG):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def as_image_array(arr: np.ndarray) -> np.ndarray | None:
    """Return an (H, W) or (H, W, C) uint8 array, or None when it is not image-like."""
    a = np.asarray(arr)
    if a.dtype.kind not in "biuf" or a.size == 0:
        return None
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]  # drop batch axes of 1
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        return None
    if min(a.shape[:2]) < 2 or max(a.shape[:2]) > 4096:
        return None
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        a = np.nan_to_num(a)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray, scale: int = 1) -> bytes:
    """Encode an (H, W) grey or (H, W, 3|4) uint8 array as PNG (nearest-neighbour upscaled)."""
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    h, w = img.shape[:2]
    color = {2: 0, 3: 2, 4: 6}[img.ndim if img.ndim == 2 else 2 + img.shape[2] // 2]
    rows = img.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return _PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def input_to_png(data: object) -> tuple[bytes, str] | None:
    """(body, mime) for a captured input, or None when it is not an image."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        mime = sniff_image(data)
        if mime:
            return data, mime
        if data.startswith(b"\x93NUMPY"):
            try:
                arr = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError):
                return None
        else:
            return None
    elif isinstance(data, dict):
        # Feedback inputs as the collector stores them: {input_name: {"dtype", "shape", "b64"}}.
        from ...protocol import MessageError, parse_array_field

        field = next(iter(data.values()), None) if data else None
        if "b64" in data:
            field = data
        try:
            dtype, shape, raw = parse_array_field(field)
        except MessageError:
            return None
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    elif isinstance(data, np.ndarray):
        arr = data
    elif isinstance(data, list):
        try:
            arr = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError):
            return None
    else:
        return None
    img = as_image_array(arr)
    if img is None:
        return None
    # Small inputs (8x8 digits) are unreadable at 1:1; upscale to ~128 px.
    scale = max(1, min(16, 128 // max(img.shape[:2])))
    return png_bytes(img, scale), "image/png"
