"""#20 item 5: calibration / eval data in the shapes users have — .npy, .jsonl, image and audio folders.

Real files written with the zoo's JPEG/WAV writers, decoded by the same
preprocessing code the device runs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeship.converters.data import InputSpec, check_against, decode_wav, load_data
from edgeship.demo_data import zoo
from edgeship.errors import DataError


def test_npy_is_one_input(tmp_path):
    x = np.random.default_rng(0).random((6, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    ds = load_data(tmp_path / "x.npy", input_names=["image"])
    assert ds.names == ["image"] and len(ds) == 6 and ds.labels is None
    np.testing.assert_array_equal(ds.inputs["image"], x)


def test_jsonl_with_two_inputs_and_named_labels(tmp_path):
    rows = [{"ids": [1, 2, 3, 0], "mask": [1, 1, 1, 0], "label": "pos"},
            {"ids": [4, 5, 0, 0], "mask": [1, 1, 0, 0], "label": "neg"},
            {"ids": [6, 7, 8, 9], "mask": [1, 1, 1, 1], "label": "pos"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_data(tmp_path / "d.jsonl", input_names=["ids", "mask"])
    assert ds.inputs["ids"].shape == (3, 4) and ds.inputs["ids"].dtype.kind == "i"
    assert ds.label_names == ("neg", "pos") and ds.labels.tolist() == [1, 0, 1]
    checked = check_against(ds, [InputSpec("ids", "int64", (-1, 4)), InputSpec("mask", "int64", (-1, 4))])
    assert checked.inputs["mask"].dtype == np.int64


def test_jsonl_lines_may_name_image_files(tmp_path):
    jpegs = zoo.write_jpegs(tmp_path / "img", 3, size=16)
    lines = [json.dumps({"image": f"img/{p.name}", "label": i % 2}) for i, p in enumerate(jpegs)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    pre = {"color": "RGB", "scale": 1 / 255, "layout": "NCHW", "dtype": "float32"}
    ds = load_data(tmp_path / "d.jsonl", input_names=["image"], preprocess=pre)
    assert ds.inputs["image"].shape == (3, 3, 16, 16) and ds.labels.tolist() == [0, 1, 0]
    assert 0.0 <= ds.inputs["image"].min() and ds.inputs["image"].max() <= 1.0


@pytest.mark.parametrize("text, fragment", [
    ('{"x": [1, 2]}\n{"y": [1, 2]}\n', "differ from line 1"),
    ('{"x": [1, 2]}\nnot json\n', "d.jsonl:2: not valid JSON"),
    ('{"x": [1, 2], "label": 1}\n{"x": [3, 4]}\n', "d.jsonl:2: no label where line 1 has one"),
    ('{"x": [1, 2]}\n{"x": [1, 2, 3]}\n', "different shapes"),
    ('{"x": "missing.png"}\n', "is not a file (paths are relative to the .jsonl)"),
    ('{"x": ["a", "b"]}\n', "give numbers (nested lists) or a file path"),
    ('{"x": [[1, 2], [3]]}\n', "not a rectangular array"),
])
def test_bad_jsonl_is_one_line_naming_the_line(tmp_path, fragment, text):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(DataError) as info:
        load_data(tmp_path / "d.jsonl", input_names=["x"])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_audio_folder_with_class_subfolders(tmp_path):
    x, y = zoo.synth_audio(6, seconds=0.25, n_classes=2)
    for i, (clip, label) in enumerate(zip(x, y)):
        (tmp_path / f"class{label}").mkdir(exist_ok=True)
        zoo.write_wav(tmp_path / f"class{label}" / f"{i}.wav", clip)
    ds = load_data(tmp_path, input_names=["audio"])
    assert ds.inputs["audio"].shape == (6, 1, 4000) and ds.inputs["audio"].dtype == np.float32
    assert ds.label_names == ("class0", "class1")
    order = sorted(range(6), key=lambda i: (y[i], f"{i}.wav"))
    np.testing.assert_allclose(ds.inputs["audio"][:, 0], np.asarray(x)[order].reshape(6, -1), atol=1 / 16000)
    assert sorted(ds.labels.tolist()) == sorted(int(v) for v in y)


def test_wav_decoding_reads_pcm_widths_and_channels(tmp_path):
    import wave

    stereo = np.array([[0, 16384], [-32768, 32767]], dtype="<i2")  # frames x channels
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(stereo.tobytes())
    got = decode_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(got, [[0.0, -1.0], [0.5, 32767 / 32768]])


def test_audio_clips_of_different_lengths_are_refused(tmp_path):
    zoo.write_wav(tmp_path / "a.wav", np.zeros(100, np.float32))
    zoo.write_wav(tmp_path / "b.wav", np.zeros(120, np.float32))
    with pytest.raises(DataError, match="cut every clip to the model's window length"):
        load_data(tmp_path, input_names=["audio"])


def test_a_folder_mixing_images_and_audio_is_refused(tmp_path):
    zoo.write_jpegs(tmp_path, 1, size=8)
    zoo.write_wav(tmp_path / "a.wav", np.zeros(10, np.float32))
    with pytest.raises(DataError, match="mixes images and audio"):
        load_data(tmp_path, input_names=["x"])


def test_progress_bar_on_request(tmp_path, capsys):
    zoo.write_jpegs(tmp_path, 4, size=8)
    pre = {"color": "L", "dtype": "float32"}
    load_data(tmp_path, input_names=["x"], preprocess=pre, progress=True)
    assert "decoding" in capsys.readouterr().err
    load_data(tmp_path, input_names=["x"], preprocess=pre)  # not a terminal: no bar
    assert capsys.readouterr().err == ""
