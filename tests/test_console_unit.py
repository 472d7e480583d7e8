"""Pure parts of the console: credentials, config, query parsing, gate shaping, images."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from edgeship.errors import ConfigError
from edgeship.fleet.console import auth, images
from edgeship.fleet.console import config as cconfig
from edgeship.fleet.console.data import (
    QueryError,
    filter_sort_devices,
    parse_device_query,
    parse_stages,
    shape_gate,
    stage_timeline,
)


def test_password_hash_roundtrip_and_mismatch():
    h = auth.hash_password("correct horse")
    assert h.startswith("scrypt$") and "correct" not in h
    assert auth.verify_password("correct horse", h)
    assert not auth.verify_password("correct horsE", h)
    assert not auth.verify_password("correct horse", "scrypt$bad")
    # A hand-edited cost must not make a login burn unbounded memory.
    assert not auth.verify_password("x", "scrypt$1099511627776$8$1$AAAA$AAAA")
    with pytest.raises(ConfigError, match="shorter than 8"):
        auth.hash_password("short")


def test_token_and_csrf():
    tok = auth.new_token()
    assert auth.verify_token(tok, auth.token_digest(tok))
    assert not auth.verify_token(tok + "x", auth.token_digest(tok))
    assert not auth.verify_token("", auth.token_digest(tok))
    s = auth.new_session("admin", ttl_s=10, now=100.0)
    assert auth.csrf_ok(s, s.csrf) and not auth.csrf_ok(s, "nope") and not auth.csrf_ok(s, None)
    assert not s.expired(109.9) and s.expired(110.0)


def test_console_init_appends_section_and_refuses_overwrite(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[collector]\nbroker = "mqtt://127.0.0.1:1883"\n')
    p, token = cconfig.init_console_config(path, password="pass-word-1")
    assert token and token.startswith("es_")
    text = path.read_text()
    assert "[collector]" in text and token not in text and "pass-word-1" not in text
    assert (path.stat().st_mode & 0o077) == 0
    cfg = cconfig.load_console_config(path)
    assert auth.verify_password("pass-word-1", cfg.password_hash) and auth.verify_token(token, cfg.token_sha256)
    with pytest.raises(ConfigError, match="already has a \\[console\\]"):
        cconfig.init_console_config(path, password="pass-word-2")
    _, token2 = cconfig.init_console_config(path, password="pass-word-2", force=True)
    cfg2 = cconfig.load_console_config(path)
    assert auth.verify_token(token2, cfg2.token_sha256) and not auth.verify_token(token, cfg2.token_sha256)
    assert "[collector]" in path.read_text()


def test_console_config_errors_name_the_key(tmp_path):
    path = tmp_path / "fleet.toml"
    with pytest.raises(ConfigError, match="console init"):
        cconfig.load_console_config(path)
    path.write_text('[console]\nuser = "admin"\nport = "80"\n')
    with pytest.raises(ConfigError, match="port"):
        cconfig.load_console_config(path)
    path.write_text('[console]\nuser = "admin"\ncolour = 1\n')
    with pytest.raises(ConfigError, match="colour: unknown key"):
        cconfig.load_console_config(path)
    path.write_text('[console]\nuser = "admin"\n')
    with pytest.raises(ConfigError, match="console init"):
        cconfig.load_console_config(path)
    path.write_text(f'[console]\ntoken_sha256 = "{"0" * 64}"\ntls_cert = "{tmp_path}/missing.pem"\n'
                    f'tls_key = "{tmp_path}/missing.key"\n')
    with pytest.raises(ConfigError, match="tls_cert"):
        cconfig.load_console_config(path)


@pytest.mark.parametrize("kwargs, name", [
    ({"sort": "password"}, "sort"), ({"order": "sideways"}, "order"), ({"limit": "abc"}, "limit"),
    ({"limit": "0"}, "limit"), ({"offset": "-1"}, "offset"), ({"status": "maybe"}, "status"),
    ({"drift": "1"}, "drift"), ({"q": "x" * 200}, "q"),
])
def test_device_query_rejects_malformed(kwargs, name):
    with pytest.raises(QueryError, match=name):
        parse_device_query(**kwargs)


def test_filter_sort_devices():
    rows = [
        {"device": "b", "online": True, "model_version": "1", "p95_ms": 3.0, "drift": False},
        {"device": "a", "online": False, "model_version": "2", "p95_ms": None, "drift": True},
        {"device": "c", "online": True, "model_version": "2", "p95_ms": 1.0, "drift": False},
    ]
    total, page = filter_sort_devices(rows, parse_device_query(sort="p95_ms", order="desc"))
    assert total == 3 and [r["device"] for r in page] == ["b", "c", "a"]  # no figure: last
    total, page = filter_sort_devices(rows, parse_device_query(status="online", model="2"))
    assert total == 1 and page[0]["device"] == "c"
    total, page = filter_sort_devices(rows, parse_device_query(drift="yes"))
    assert [r["device"] for r in page] == ["a"]
    total, page = filter_sort_devices(rows, parse_device_query(limit=1, offset=1))
    assert total == 3 and [r["device"] for r in page] == ["b"]


def test_parse_stages():
    assert parse_stages("1, 10,50,100") == [1, 10, 50, 100]
    assert parse_stages("") is None
    for bad in ("10,5,100", "1,10", "a,b", "0,100", "1,200"):
        with pytest.raises(QueryError, match="stages"):
            parse_stages(bad)


def test_shape_gate_and_timeline():
    g = shape_gate({"name": "latency_p95", "canary": 2.4, "control": 2.0, "threshold": 1.2, "verdict": "fail",
                    "unit": "ratio", "slack": 0.0})
    assert g["verdict"] == "fail" and g["threshold_line"] == pytest.approx(2.4) and g["canary_text"] == "2.40 ms"
    g = shape_gate({"name": "error_rate", "canary": 0.01, "control": 0.004, "threshold": 0.02,
                    "verdict": "insufficient", "unit": "rate"})
    assert g["verdict_text"] == "waiting for samples" and g["canary_text"] == "1.00 %"
    assert g["threshold_line"] == pytest.approx(0.024)  # control + allowed increase
    g = shape_gate({"name": "failures", "canary": 0.1, "control": None, "threshold": 0.05, "verdict": "hold",
                    "unit": "rate", "canary_n": 10, "control_n": 0})
    assert g["threshold_line"] == pytest.approx(0.05) and g["control_n"] is None
    tl = stage_timeline([1, 10, 50, 100], 1, "aborted")
    assert [s["status"] for s in tl] == ["done", "aborted", "pending", "pending"]
    tl = stage_timeline([1, 100], 1, "completed")
    assert [s["status"] for s in tl] == ["done", "done"]


def _decode_png(data: bytes) -> tuple[int, int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, depth, color = struct.unpack(">IIBB", data[16:26])
    assert zlib.crc32(data[12:29]) & 0xFFFFFFFF == struct.unpack(">I", data[29:33])[0]
    return w, h, color


def test_input_to_png_shapes():
    arr = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    body, mime = images.input_to_png(arr)
    assert mime == "image/png" and _decode_png(body) == (128, 128, 0)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 16, 16), dtype=np.uint8))
    body, _ = images.input_to_png(buf.getvalue())
    assert _decode_png(body) == (128, 128, 2)  # CHW became RGB
    assert images.input_to_png(np.zeros(10)) is None  # a feature vector is not an image
    assert images.input_to_png(b"not an image") is None
    assert images.input_to_png(b"\x89PNG\r\n\x1a\nrest") == (b"\x89PNG\r\n\x1a\nrest", "image/png")
    assert images.input_to_png([[0, 1], [2, 3]])[1] == "image/png"


def test_input_to_png_from_feedback_field():
    from edgeship.protocol import array_field

    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    body, mime = images.input_to_png({"input": array_field("float32", arr.shape, arr.tobytes())})
    assert mime == "image/png" and _decode_png(body)[:2] == (128, 128)
    assert images.input_to_png({"input": {"dtype": "float32", "shape": [2], "b64": "!!"}}) is None


def test_drift_flag_follows_the_agent_verdict():
    from edgeship.fleet.console.data import drift_flagged

    assert drift_flagged({"drift": {"alarm": True, "score": 0.5}})
    assert not drift_flagged({"drift": {"alarm": None, "score": 0.9}})  # too few samples to judge
    assert not drift_flagged({"drift": {"alarm": False, "score": 0.05}})
    assert drift_flagged({"drift": {"inputs": {"x": {"psi": 0.3, "z": 0.1}}}})  # no verdict: same rule
    assert not drift_flagged({"drift": {"inputs": {"x": {"psi": 0.05, "z": 0.1}}}})
    assert not drift_flagged({}) and not drift_flagged(None)


def test_parse_soak():
    from edgeship.fleet.console.data import parse_soak

    assert parse_soak("", 4) == 1800.0 and parse_soak("60", 4) == 60.0
    assert parse_soak("5, 600", 2) == [5.0, 600.0]
    for bad, n in (("x", 2), ("-1", 2), ("1,2,3", 2), ("1e12", 1)):
        with pytest.raises(QueryError, match="soak_s"):
            parse_soak(bad, n)
