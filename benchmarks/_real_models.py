"""Real-size models for benchmarks/quantize_real.py: built from edgeship.demo_data.zoo, trained briefly on
real photo crops where a class decision exists, exported to ONNX, cached by name in a folder.

Each builder returns ``(onnx_path, calib_npz, eval_npz, metric, metric_options)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from edgeship.converters.onnx_export import export_onnx
from edgeship.demo_data import zoo


def _torch_seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def _save_sets(folder: Path, name: str, calib: dict, evald: dict) -> tuple[Path, Path]:
    c, e = folder / f"{name}.calib.npz", folder / f"{name}.eval.npz"
    np.savez(c, **calib)
    np.savez(e, **evald)
    return c, e


def _export(model, sample, path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model.eval(), sample, path, **kw)
    return path


def mobilenet(folder: Path, *, n_calib: int = 64, n_eval: int = 128, n_train: int = 384) -> tuple:
    """MobileNetV3-style 224x224 classifier trained briefly on (photo, quadrant) crops."""
    p = folder / "mobilenet.onnx"
    c, e = folder / "mobilenet.calib.npz", folder / "mobilenet.eval.npz"
    if not p.is_file():
        _torch_seed()
        x, y = zoo.photo_patches(n_train + n_calib + n_eval, seed=1)
        x = zoo.to_nchw(x)
        m = zoo.train_classifier_briefly(zoo.MobileNetV3Like(), x[:n_train], y[:n_train], epochs=3)
        _export(m, x[:2], p)
        c, e = _save_sets(folder, "mobilenet", {"input": x[n_train:n_train + n_calib]},
                          {"input": x[n_train + n_calib:], "labels": y[n_train + n_calib:]})
    return p, c, e, "agreement", {}


def detector(folder: Path, *, n_calib: int = 32, n_eval: int = 32, size: int = 256) -> tuple:
    """Dense detector (dynamic H/W) trained briefly to mark the china photo's cells; gated on IoU."""
    import torch

    p = folder / "detector.onnx"
    c, e = folder / "detector.calib.npz", folder / "detector.eval.npz"
    if not p.is_file():
        _torch_seed()
        x, y = zoo.photo_patches(256 + n_calib + n_eval, size=size, seed=2)
        x = zoo.to_nchw(x)
        model = zoo.TinyDetector()
        # objectness target: every cell of a crop from the china photo (y < 4) with a bright pixel mean.
        xt = torch.from_numpy(x[:256])
        obj = ((xt.mean(1, keepdim=True) > 0).float())
        obj = torch.nn.functional.avg_pool2d(obj, 8)
        obj = (obj > 0.5).float() * torch.from_numpy((y[:256] < 4).astype(np.float32)).view(-1, 1, 1, 1)
        opt = torch.optim.Adam(model.parameters(), 2e-3)
        model.train()
        for _ in range(3):
            for idx in torch.randperm(256).split(32):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt[idx])[:, :1], obj[idx])
                loss.backward()
                opt.step()
        _export(model.eval(), x[:2], p)
        import onnx

        mp = onnx.load(str(p))  # free H/W so the detector is dynamic like a real one
        for v in list(mp.graph.input) + list(mp.graph.output):
            dims = v.type.tensor_type.shape.dim
            for i in (2, 3):
                dims[i].ClearField("dim_value")
                dims[i].dim_param = f"{v.name}_{'hw'[i - 2]}"
        onnx.save(mp, str(p))
        c, e = _save_sets(folder, "detector", {"input": x[256:256 + n_calib]}, {"input": x[256 + n_calib:]})
    return p, c, e, "iou", {"threshold": 0.0, "channel": 0}


def recognizer(folder: Path, *, n_calib: int = 64, n_eval: int = 64, width: int = 128) -> tuple:
    """CRNN recognizer on grey 32xW strips of the photos; gated on per-step agreement."""
    p = folder / "recognizer.onnx"
    c, e = folder / "recognizer.calib.npz", folder / "recognizer.eval.npz"
    if not p.is_file():
        _torch_seed()
        x, _ = zoo.photo_patches(n_calib + n_eval, size=width, seed=3)
        g = x.astype(np.float32).mean(-1)[:, None, 48:80, :] / 127.5 - 1.0   # (n, 1, 32, width)
        g = np.ascontiguousarray(g, np.float32)
        m = zoo.SequenceRecognizer()
        _export(m, g[:2], p)
        c, e = _save_sets(folder, "recognizer", {"input": g[:n_calib]}, {"input": g[n_calib:]})
    return p, c, e, "step_agreement", {}


def transformer(folder: Path, *, n_calib: int = 64, n_eval: int = 128, seq: int = 64) -> tuple:
    """Two-input transformer text classifier (ids, mask) on synthetic token data; gated on agreement."""
    p = folder / "transformer.onnx"
    c, e = folder / "transformer.calib.npz", folder / "transformer.eval.npz"
    if not p.is_file():
        import torch

        _torch_seed()
        rng = np.random.default_rng(4)
        n = 512 + n_calib + n_eval
        ids = rng.integers(1, 2000, (n, seq)).astype(np.int64)
        y = rng.integers(0, 2, n)
        ids[y == 1, :8] = rng.integers(1, 100, (int((y == 1).sum()), 8))   # class 1: low ids up front
        lens = rng.integers(seq // 2, seq + 1, n)
        mask = (np.arange(seq)[None] < lens[:, None]).astype(np.int64)
        ids = ids * mask
        m = zoo.TextTransformer()
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        m.train()
        it, mt, yt = torch.from_numpy(ids[:512]), torch.from_numpy(mask[:512]), torch.from_numpy(y[:512])
        for _ in range(2):
            for idx in torch.randperm(512).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(it[idx], mt[idx]), yt[idx]).backward()
                opt.step()
        _export(m.eval(), (ids[:2], mask[:2]), p, input_names=("ids", "mask"))
        c, e = _save_sets(folder, "transformer", {"ids": ids[512:512 + n_calib], "mask": mask[512:512 + n_calib]},
                          {"ids": ids[512 + n_calib:], "mask": mask[512 + n_calib:]})
    return p, c, e, "agreement", {}


BUILDERS = {"mobilenet": mobilenet, "detector": detector, "recognizer": recognizer, "transformer": transformer}


def digits(folder: Path) -> tuple:
    """The existing 8x8 digits Teacher CNN (trained here on scikit-learn's digits), gated on top-1."""
    p = folder / "digits.onnx"
    c, e = folder / "digits.calib.npz", folder / "digits.eval.npz"
    if not p.is_file():
        from edgeship.demo_data.model import Teacher, load_digits_split, train_classifier

        _torch_seed()
        d = load_digits_split()
        m = train_classifier(Teacher(), d["x_train"], d["y_train"], epochs=8)
        _export(m, d["x_calib"][:2].astype(np.float32), p)
        _save_sets(folder, "digits", {"input": d["x_calib"][:64].astype(np.float32)},
                   {"input": d["x_eval"].astype(np.float32), "labels": d["y_eval"]})
    return p, c, e, "top1", {}


BUILDERS["digits"] = digits
