"""Real pretrained models that ship inside a wheel on the package index, read from the installed package.

``rapidocr-onnxruntime`` (Apache-2.0, in the ``test`` extra) carries three PP-OCR ONNX models in its wheel:
a text detector with a dense probability map and dynamic H×W, a CTC sequence recognizer (dynamic width),
and a MobileNet text-angle classifier (2 classes). They are real trained networks, not built here, which is
what the model-coverage suite and the quantization benchmark need next to the zoo's briefly trained ones.

The files are located through the distribution's file list, so the package itself (which imports OpenCV)
is never imported and nothing is downloaded.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

DISTRIBUTION = "rapidocr-onnxruntime"
# name -> (file in the wheel, what it is, input layout)
RAPIDOCR = {
    "ocr_det": ("ch_PP-OCRv4_det_infer.onnx", "PP-OCRv4 text detector: probability map, dynamic H×W (multiples of 32)",
                "x: float32[N,3,H,W]"),
    "ocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", "PP-OCRv4 text recognizer: CTC over 6,625 characters per step",
                "x: float32[N,3,48,W]"),
    "ocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", "MobileNet text-angle classifier: 0° or 180°",
                "x: float32[N,3,48,192]"),
}


def rapidocr_models() -> dict[str, Path]:
    """name -> path of each model in the installed wheel; raises LookupError with the fix when absent."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise LookupError(f"{DISTRIBUTION} is not installed; pip install -c constraints.txt "
                          f"'edgeship[test]' (it carries the pretrained models)") from exc
    by_name = {Path(str(f)).name: Path(str(dist.locate_file(f))) for f in (dist.files or ())
               if str(f).endswith(".onnx")}
    out = {}
    for name, (file, _, _) in RAPIDOCR.items():
        path = by_name.get(file)
        if path is None or not path.is_file():
            raise LookupError(f"{DISTRIBUTION} {dist.version} has no {file}; reinstall it at the pinned version")
        out[name] = path
    return out


# -- inputs for the OCR models (#20): rendered text, nothing downloaded --------------------------------

# PP-OCR's own normalisation of each model's input (what rapidocr applies), as a package ``preprocess``.
_PPOCR_DET = {"color": "RGB", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "layout": "NCHW", "dtype": "float32"}
_PPOCR_TEXT = {"color": "RGB", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
               "layout": "NCHW", "dtype": "float32"}
OCR_PREPROCESS = {"ocr_det": _PPOCR_DET, "ocr_rec": {**_PPOCR_TEXT, "resize": [48, 160]},
                  "ocr_cls": {**_PPOCR_TEXT, "resize": [48, 192]}}
_WORDS = ("edge", "ship", "model", "7421", "PI-4B", "batch", "HELLO", "2026", "sensor", "fleet", "OK 42", "int8")


def ocr_images(name: str, n: int, seed: int = 0, size: tuple[int, int] | None = None) -> list:
    """``n`` RGB uint8 images of rendered words for model ``name`` (Pillow's built-in font).

    ``ocr_det``: a page of ``size`` (H, W; default 64×96) with a few words; ``ocr_rec``: one word on a
    48-pixel line; ``ocr_cls``: a 48×192 line, every second one turned 180° (the classifier's class 1).
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), 3)]
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        paper = tuple(int(v) for v in rng.integers(190, 256, 3))
        if name == "ocr_det":
            h, w = size or (64, 96)
            img = Image.new("RGB", (w, h), paper)
            draw = ImageDraw.Draw(img)
            font = ImageFont.load_default(size=max(8, h // 5))
            for k, word in enumerate(words):
                draw.text((int(rng.integers(2, max(3, w // 3))), 4 + k * (h // 3)), word, fill=ink, font=font)
        else:
            w = 160 if name == "ocr_rec" else 192
            img = Image.new("RGB", (w, 48), paper)
            font = ImageFont.load_default(size=int(rng.integers(26, 34)))
            ImageDraw.Draw(img).text((int(rng.integers(2, 12)), 6), " ".join(words[:1 if name == "ocr_rec" else 2]),
                                     fill=ink, font=font)
            if name == "ocr_cls" and i % 2:
                img = img.rotate(180)
        out.append(np.asarray(img))
    return out


def ocr_inputs(name: str, n: int, seed: int = 0, size: tuple[int, int] | None = None):
    """:func:`ocr_images` through the model's PP-OCR preprocess: a float32 ``(n, 3, H, W)`` batch."""
    import numpy as np

    from ..preprocess import Preprocessor

    pre = Preprocessor(OCR_PREPROCESS[name])
    return np.stack([pre.one(x) for x in ocr_images(name, n, seed, size)]).astype(np.float32)


def ocr_charset(path) -> list[str]:
    """The recognizer's CTC classes: blank, the dictionary stored in the model's metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def ocr_package_args(name: str) -> dict:
    """What a user declares to package model ``name`` (``edgeship.package.build`` keywords besides the file).

    The wheel's graphs leave H and W open: the package fixes what the model was trained for (the
    recognizer's 48-pixel lines, the classifier's 48×192) and the detector's steps of 32, adds PP-OCR's
    preprocess and a built-in ``postprocess`` (the detector's map is already a probability: no activation).
    """
    shapes = {"ocr_det": ["batch", 3, -1, -1], "ocr_rec": ["batch", 3, 48, -1], "ocr_cls": ["batch", 3, 48, 192]}
    x = {"name": "x", "dtype": "float32", "shape": shapes[name]}
    if name == "ocr_det":
        x["multiple_of"] = 32
    args: dict = {"inputs": [x], "preprocess": OCR_PREPROCESS[name], "example_input": ocr_inputs(name, 1, seed=99)}
    if name == "ocr_det":
        args["postprocess"] = {"kind": "threshold", "threshold": 0.3, "activation": "none"}
    elif name == "ocr_rec":
        args.update(labels=ocr_charset(rapidocr_models()[name]), postprocess={"kind": "ctc", "blank": 0,
                                                                            "activation": "none"})
    elif name == "ocr_cls":
        args.update(labels=["0", "180"], postprocess={"kind": "topk", "k": 2, "activation": "none"})
    return args
