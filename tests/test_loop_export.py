"""Field loop, collect (#22.2): `fleet export-feedback` writes provenance and a by-device held-out split;
bad inputs are skipped with a count; an export with nothing labelled is one line. Real SQLite fleet DB."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from edgeship import protocol
from edgeship.errors import DataError
from edgeship.fleet.db import FleetDB
from edgeship.fleet.field import export_field_data, split_devices

T0 = 1_790_000_000.0


def _fb(device: str, n: int, kind: str, *, value=None, predicted="3", x: np.ndarray | None = None,
        version: str = "1.0.0") -> protocol.Message:
    body = {"prediction_id": f"{device}-p{n}", "kind": kind, "value": value, "predicted": predicted,
            "model": {"name": "digits", "version": version}}
    if x is not None:
        x = np.ascontiguousarray(x, dtype="<f4")
        body["input"] = {"input": protocol.array_field("float32", list(x.shape), x.tobytes())}
    t = protocol.device_topic("rf", device, "feedback")
    return protocol.parse_message(t, protocol.encode(protocol.make_message("feedback", device, body, ts=T0 + n)))


def _good(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 8, 8), dtype=np.float32)


@pytest.fixture()
def db(tmp_path):
    d = FleetDB.open(str(tmp_path / "fleet.sqlite"))
    yield d
    d.close()


def _fill(db) -> dict:
    """Five devices, labelled samples each, plus one of every bad kind; returns expected counts."""
    msgs, n = [], 0
    for dev in ("a", "b", "c", "d", "e"):
        for _ in range(4):
            n += 1
            msgs.append(_fb(dev, n, "label", value="7", x=_good(n), version="1.0.0" if dev < "c" else "1.1.0"))
        n += 1
        msgs.append(_fb(dev, n, "correct", predicted="3", x=_good(n)))
    n += 1
    msgs.append(_fb("a", n, "label", value="5", x=np.full((1, 8, 8), np.nan, np.float32)))   # corrupt: NaN
    n += 1
    msgs.append(_fb("b", n, "label", value="5", x=np.zeros((3, 4), np.float32)))           # wrong shape
    n += 1
    msgs.append(_fb("c", n, "incorrect", x=_good(n)))                                      # no label: not a sample
    n += 1
    msgs.append(_fb("d", n, "label", value="cat", x=_good(n)))                              # not a class index
    assert db.store_messages(msgs).stored == len(msgs)
    # A stored input that does not decode (written by an older collector, or a damaged DB): skipped, counted.
    n += 1
    bad = _fb("e", n, "label", value="1", x=_good(n))
    assert db.store_messages([bad]).stored == 1
    db._exec("UPDATE feedback_inputs SET data = ? WHERE device = 'e' AND prediction_id = ?", ('{"input": {"b64": 1}}',
                                                                                               f"e-p{n}"))
    return {"samples": 25, "corrupt": 2, "wrong_shape": 1, "unknown_label": 1}


def test_split_devices_is_stable_and_never_all_or_none():
    devs = [f"pi-{i:02d}" for i in range(20)]
    held = split_devices(devs, 0.2)
    assert len(held) == 4 and held == split_devices(list(reversed(devs)), 0.2)
    assert held < split_devices(devs, 0.5)  # one hash order: a bigger share keeps the same devices held out
    assert split_devices(["a", "b"], 0.01) and len(split_devices(["a", "b"], 0.99)) == 1
    assert split_devices(["a"], 0.5) == set() and split_devices(devs, 0.0) == set()
    with pytest.raises(DataError):
        split_devices(devs, 1.0)


def test_export_writes_provenance_and_a_by_device_holdout(db, tmp_path):
    want = _fill(db)
    res = export_field_data(db, tmp_path / "field.npz", holdout=0.4)
    assert res.samples == want["samples"] and res.train + res.holdout == res.samples
    assert res.skipped["corrupt"] == want["corrupt"] and res.skipped["wrong_shape"] == want["wrong_shape"]
    assert res.skipped["unknown_label"] == want["unknown_label"]
    assert len(res.holdout_devices) == 2 and set(res.devices) == {"a", "b", "c", "d", "e"}
    prov = json.loads(res.provenance.read_text())
    rows = prov["samples"]
    assert len(rows) == res.samples
    # every sample: device, version, time; a device's samples are all in one split
    assert all(r["device"] and r["model_version"] in ("1.0.0", "1.1.0") and r["ts"] >= T0 for r in rows)
    for dev in res.devices:
        assert len({r["split"] for r in rows if r["device"] == dev}) == 1
    assert {r["device"] for r in rows if r["split"] == "holdout"} == set(res.holdout_devices)
    with np.load(res.path) as z, np.load(res.train_path) as tr, np.load(res.holdout_path) as ho:
        assert sorted(z.files) == ["input", "labels"] and z["input"].shape == (25, 1, 8, 8)
        assert len(tr["labels"]) == res.train and len(ho["labels"]) == res.holdout
        labels = [r["label"] for r in rows]
        assert z["labels"].tolist() == labels and set(labels) == {7, 3}
        # the rows of field.npz are the provenance rows, in order
        i = next(k for k, r in enumerate(rows) if r["prediction_id"] == "c-p11")
        assert np.allclose(z["input"][i], _good(11))


def test_export_cli_counts_skips_and_refuses_empty_in_one_line(db, tmp_path):
    _fill(db)
    path = str(tmp_path / "fleet.sqlite")
    out = run_cli("fleet", "export-feedback", "--db", path, "--out", str(tmp_path / "f.npz"))
    line = out.stdout.strip()
    assert len(line.splitlines()) == 1 and line.startswith("wrote 25 labelled samples from 5 device(s)")
    assert "2 corrupt" in line and "1 wrong shape" in line and "1 unknown label" in line and "held out" in line
    # Nothing labelled for this version: one clear line, no traceback, no file.
    none = run_cli("fleet", "export-feedback", "--db", path, "--out", str(tmp_path / "x.npz"),
                   "--model-version", "9.9", check=False)
    assert none.returncode == 1 and len(none.stderr.strip().splitlines()) == 1
    assert none.stderr.startswith("error: no labelled feedback with attached inputs")
    assert not (tmp_path / "x.npz").exists()


def test_export_of_only_bad_samples_says_why(db, tmp_path):
    db.store_messages([_fb("a", 1, "label", value="cat", x=_good(1)), _fb("b", 2, "incorrect", x=_good(2))])
    with pytest.raises(DataError, match=r"1 unknown label.*--labels labels.txt"):
        export_field_data(db, tmp_path / "f.npz")


def test_privacy_switch_off_keeps_no_input_and_sends_none(tmp_path):
    """[feedback] keep_inputs = false (the default): nothing on disk, a correction carries no input."""
    from edgeship.agent.config import parse_config
    from edgeship.agent.feedback import FeedbackManager
    from edgeship.agent.link import FleetLink
    from edgeship.agent.outbox import Outbox

    assert parse_config({"agent": {"device_id": "d", "state_dir": str(tmp_path)}}).feedback.keep_inputs is False
    for keep in (False, True):
        cfg = parse_config({"agent": {"device_id": f"d{keep}", "fleet": "f", "state_dir": str(tmp_path / str(keep))},
                            "mqtt": {"broker": "mqtt://127.0.0.1:1"}, "feedback": {"keep_inputs": keep}})
        link = FleetLink.from_config(cfg)
        try:
            assert (link.feedback_manager.writer is not None) is keep
        finally:
            link.outbox.close()
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    fm = FeedbackManager(ob, "f", "d1", ring_size=10, inputs_dir=None).start()
    try:
        fm.remember("p1", label="3", inputs={"input": _good(1)})
        assert "input" not in fm.feedback("p1", "label", "7")
    finally:
        fm.stop(5)
        ob.close()
