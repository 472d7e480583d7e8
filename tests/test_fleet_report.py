"""Fleet report: pure summaries, PNG + HTML output, and the CLI on a real SQLite fleet DB."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli

from edgeship import protocol
from edgeship.errors import DataError
from edgeship.fleet.db import FleetDB
from edgeship.fleet.report import Section, build_report, is_negative, parse_since, pick_bucket, summarize
from edgeship.metrics import Histogram

T0 = 1_790_000_000.0


def _tel(device: str, version: str, ts: float, n: int, errors: int, lat: float) -> protocol.Message:
    h = Histogram()
    h.add_repeated(lat, n)
    body = {"window_s": 60.0, "counts": {"inferences": n, "errors": errors}, "model": {"name": "m", "version": version},
            "latency_ms": {"p50": lat, "p95": lat, "p99": lat, "hist": h.to_dict()}}
    t = protocol.device_topic("rf", device, "telemetry")
    return protocol.parse_message(t, protocol.encode(protocol.make_message("telemetry", device, body, ts=ts)))


def _fb(device: str, version: str, ts: float, kind: str, value=None, predicted="c1") -> protocol.Message:
    body = {"prediction_id": f"p{ts}", "kind": kind, "value": value, "predicted": predicted,
            "model": {"name": "m", "version": version}}
    t = protocol.device_topic("rf", device, "feedback")
    return protocol.parse_message(t, protocol.encode(protocol.make_message("feedback", device, body, ts=ts)))


@pytest.fixture()
def fleet_db(fleet_db_url):
    path = fleet_db_url  # a SQLite file, or a fresh database on a throwaway PostgreSQL cluster
    db = FleetDB.open(path)
    msgs = []
    for i in range(30):  # 30 minutes, two devices on 1.0, one on 2.0 (slower, more errors)
        ts = T0 + 60 * i
        msgs += [_tel("a", "1.0", ts, 100, 1, 2.0), _tel("b", "1.0", ts + 1, 100, 0, 3.0),
                 _tel("c", "2.0", ts + 2, 50, 5, 8.0)]
    msgs += [_fb("a", "1.0", T0 + 10, "correct"), _fb("a", "1.0", T0 + 20, "incorrect"),
             _fb("b", "1.0", T0 + 30, "label", "c1"),  # agrees with the prediction: not negative
             _fb("c", "2.0", T0 + 40, "label", "c2"), _fb("c", "2.0", T0 + 50, "incorrect"),
             _fb("c", "2.0", T0 + 60, "rating", 2), _fb("c", "2.0", T0 + 70, "comment", "dark")]
    rt = protocol.device_topic("rf", "c", "rollout")
    msgs.append(protocol.parse_message(rt, protocol.encode(protocol.make_message(
        "rollout", "c", {"rollout_id": "r1", "state": "active", "model": {"name": "m", "version": "2.0"}}, ts=T0))))
    res = db.store_messages(msgs)
    assert res.stored == len(msgs) and db.store_messages(msgs[:5]).duplicates == 5
    assert db.rollout_reports("r1")[0]["state"] == "active"
    yield db, path
    db.close()


def test_parse_since_and_bucket():
    now = 1_000_000.0
    assert parse_since("24h", now) == now - 86400 and parse_since("30m", now) == now - 1800
    assert parse_since("7d", now) == now - 7 * 86400 and parse_since("", now) == 0.0
    assert parse_since("2026-11-25", now) == 1795564800.0
    assert parse_since("1790000000", now) == 1790000000.0
    with pytest.raises(DataError, match="--since"):
        parse_since("last tuesday", now)
    assert pick_bucket(1800) == 60 and pick_bucket(7 * 86400) == 6 * 3600


def test_negative_feedback_rule():
    assert is_negative("incorrect") and not is_negative("correct")
    assert is_negative("label", "cat", "dog") and not is_negative("label", "dog", "dog")
    assert not is_negative("rating", 1)


def test_summary_figures(fleet_db):
    db, _ = fleet_db
    s = summarize(db.telemetry(), db.feedback())
    v1, v2 = s["versions"]
    assert (v1.version, v2.version) == ("1.0", "2.0")
    assert v1.inferences == 6000 and v1.errors == 30 and v1.error_rate == pytest.approx(30 / 6030)
    assert v2.inferences == 1500 and v2.error_rate == pytest.approx(150 / 1650)
    assert len(v1.devices) == 2 and v1.p(95) == pytest.approx(3.0, rel=0.1) and v2.p(50) == pytest.approx(8.0, rel=0.1)
    assert v1.feedback == {"correct": 1, "incorrect": 1, "label": 1} and v1.negative_rate == pytest.approx(1 / 3)
    assert v2.negative_rate == 1.0 and v2.feedback["rating"] == 1
    assert len(v1.series) == 30 and s["bucket_s"] == 60  # latency over time, one point per minute


def test_build_report_writes_table_pngs_html_and_extra_sections(fleet_db, tmp_path):
    db, _ = fleet_db

    def drift_section(db_, summary, out):  # how the rollout/drift engineers plug in
        return Section("Drift", text=f"{len(summary['versions'])} versions checked", data={"ok": True})

    rep = build_report(db, out_dir=tmp_path / "rep", sections=[drift_section])
    assert "1.0" in rep.table and "2.0" in rep.table and "9.09%" in rep.table  # 2.0's error rate
    assert [p.name for p in rep.plots] == ["latency.png", "inferences_errors.png", "feedback.png"]
    for p in rep.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    html = rep.html_path.read_text()
    assert "<table>" in html and "latency.png" in html and "<h2>Drift</h2>" in html
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["versions"][1]["negative_rate"] == 1.0 and summary["sections"]["Drift"] == {"ok": True}
    assert "== Drift ==" in rep.text()
    # --since narrows the period.
    later = build_report(db, since=T0 + 60 * 25)
    assert later.summary["versions"][0].inferences == 5 * 200


def test_cli_report_and_devices(fleet_db, tmp_path):
    _, path = fleet_db
    out = run_cli("fleet", "report", "--db", str(path), "--out", str(tmp_path / "r"))
    assert "negative" in out.stdout and "report.html" in out.stdout
    assert (tmp_path / "r" / "report.html").exists()
    dev = run_cli("fleet", "devices", "--db", str(path))
    lines = dev.stdout.splitlines()
    assert lines[0].split()[:3] == ["device", "fleet", "status"] and len(lines) == 5
    assert "2.0" in [ln for ln in lines if ln.startswith("c ")][0]
    as_json = json.loads(run_cli("fleet", "devices", "--db", str(path), "--json").stdout)
    assert {d["device"] for d in as_json} == {"a", "b", "c"}
    bad = run_cli("fleet", "report", "--db", str(path), "--since", "someday", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --since")
    none = run_cli("fleet", "export-feedback", "--db", str(path), "--out", str(tmp_path / "x.npz"), check=False)
    assert none.returncode == 1 and "no labelled feedback with attached inputs" in none.stderr


@pytest.mark.mqtt
def test_cli_collect_with_embedded_broker(tmp_path):
    out = run_cli("fleet", "collect", "--db", str(tmp_path / "f.sqlite"), "--fleet", "rf", "--duration", "1",
                  "--quiet")
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["stored"] == 0 and stats["rejected"] == 0
