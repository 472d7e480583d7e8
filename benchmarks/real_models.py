"""Real-size packages for the serving benchmarks (issue 19), built once and cached.

* ``photo``: :func:`edgeship.demo_data.zoo.MobileNetV3Like` (224x224 RGB, 8 classes),
  trained briefly (:func:`~edgeship.demo_data.zoo.train_classifier_briefly`, one
  epoch on 256 :func:`~edgeship.demo_data.zoo.photo_patches`) so its labels are
  not all the same class and the label comparison between loops means something;
  preprocess :data:`~edgeship.demo_data.zoo.IMAGENET_PREPROCESS`.
* ``audio``: :func:`~edgeship.demo_data.zoo.AudioCNN1D` over 1 s windows of 16 kHz
  audio (random weights: its cost, not its accuracy, is measured).

Exported with :func:`edgeship.converters.onnx_export.export_onnx`, packaged with
:func:`edgeship.package.build`. Bump ``VERSION`` when a model changes, so the cache
is rebuilt.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve()
AUDIO_SAMPLES = 16000


VERSION = 1


def build_photo(work: Path) -> dict:
    from edgeship import package
    from edgeship.converters.onnx_export import export_onnx
    from edgeship.demo_data import zoo

    onnx_path, pkg = work / "photo.onnx", work / "photo.edgepkg"
    if not pkg.exists():
        import torch

        torch.manual_seed(0)
        x, y = zoo.photo_patches(256, seed=1)
        model = zoo.train_classifier_briefly(zoo.MobileNetV3Like(len(zoo.PHOTO_CLASSES)), zoo.to_nchw(x), y,
                                             epochs=1)
        export_onnx(model, zoo.to_nchw(x[:2]), onnx_path)
        package.build(pkg, onnx_path, name="photo", version="1.0.0", labels=zoo.PHOTO_CLASSES,
                      preprocess=zoo.IMAGENET_PREPROCESS, example_input=zoo.to_nchw(x[:1]))
    return {"pkg": pkg, "onnx": onnx_path}


def build_audio(work: Path) -> dict:
    from edgeship import package
    from edgeship.converters.onnx_export import export_onnx
    from edgeship.demo_data import zoo

    onnx_path, pkg = work / "audio.onnx", work / "audio.edgepkg"
    if not pkg.exists():
        import torch

        torch.manual_seed(0)
        model = zoo.AudioCNN1D(4, AUDIO_SAMPLES).eval()
        x, _ = zoo.synth_audio(2)
        export_onnx(model, x[:, None, :], onnx_path)
        package.build(pkg, onnx_path, name="audio", version="1.0.0", labels=["a", "b", "c", "d"],
                      example_input=x[:1, None, :])
    return {"pkg": pkg, "onnx": onnx_path}


def build_all(cache: Path | None = None) -> dict:
    """Both packages, in ``cache`` (default ``benchmarks/out/models-<key>``), built when missing."""
    work = cache or HERE.parent / "out" / f"models-v{VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    return {"photo": build_photo(work), "audio": build_audio(work)}


if __name__ == "__main__":
    print(build_all())
