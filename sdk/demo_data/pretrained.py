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
