"""The shared model zoo's data: real photo crops with honest labels, readable JPEG/WAV files."""
from __future__ import annotations

import wave

import numpy as np
from PIL import Image

from edgeship.demo_data import zoo


def test_photo_patches_are_deterministic_real_crops_with_quadrant_labels():
    x, y = zoo.photo_patches(16, size=64, seed=3)
    x2, y2 = zoo.photo_patches(16, size=64, seed=3)
    assert x.shape == (16, 64, 64, 3) and x.dtype == np.uint8 and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert set(y.tolist()) <= set(range(len(zoo.PHOTO_CLASSES)))
    assert x.std() > 20  # real photo content, not a flat fill
    # Crops from different photos differ in colour statistics (china is bluer than flower).
    photos = zoo.sample_photos()
    assert len(photos) == 2 and not np.allclose(photos[0].mean((0, 1)), photos[1].mean((0, 1)), atol=5)


def test_write_jpegs_and_wav_round_trip(tmp_path):
    paths = zoo.write_jpegs(tmp_path / "img", 3, size=32)
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    labels = (tmp_path / "img" / "labels.txt").read_text().split("\n")
    assert labels[0].split()[0] == "img_00000.jpg" and labels[0].split()[1] in zoo.PHOTO_CLASSES
    x, y = zoo.synth_audio(2, seconds=0.25)
    p = zoo.write_wav(tmp_path / "a.wav", x[0])
    with wave.open(str(p)) as w:
        assert (w.getframerate(), w.getnframes(), w.getsampwidth()) == (16000, 4000, 2)
