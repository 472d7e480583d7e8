"""Input sources on real files, FIFOs and a fake camera (no agent needed)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from edgeship.agent.sources import (
    CameraSource,
    CsvSource,
    FakeCapture,
    FolderSource,
    JsonLinesSource,
    StreamSource,
    SyntheticSource,
    make_source,
    source_class,
)
from edgeship.errors import ConfigError


def read_all(src, max_n=100, timeout=0.2, limit=5.0):
    src.open()
    blocks = []
    deadline = time.monotonic() + limit
    while not src.exhausted and time.monotonic() < deadline:
        b = src.read(max_n, timeout)
        if b is not None:
            blocks.append(b)
    src.close()
    return blocks


def test_csv_header_block_parse_and_bad_rows(tmp_path):
    p = tmp_path / "s.csv"
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    lines = ["a,b,c"] + [",".join(map(str, r)) for r in rows]
    lines.insert(4, "1,oops,3")
    p.write_text("\n".join(lines))  # no trailing newline: the last line still counts
    blocks = read_all(CsvSource("c", path=str(p)), max_n=4)
    data = np.concatenate([b.data for b in blocks if len(b)])
    errors = [e for b in blocks for e in b.errors]
    np.testing.assert_array_equal(data, rows)
    assert len(errors) == 1 and errors[0][0] == "s.csv:5" and "numbers" in errors[0][1]


def test_jsonl_arrays_fast_path_and_objects_with_ts(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("[1, 2]\n[3, 4.5]\n")
    (b,) = read_all(JsonLinesSource("j", path=str(p)))
    np.testing.assert_array_equal(b.data, [[1, 2], [3, 4.5]])
    q = tmp_path / "o.jsonl"
    q.write_text('{"x": [1, 2], "ts": 5.0}\n{"x": [3, 4], "ts": 6.0}\n{"y": 1}\n[1,2,3]\n')
    (b,) = read_all(JsonLinesSource("j", path=str(q)))
    np.testing.assert_array_equal(b.data, [[1, 2], [3, 4]])
    assert list(b.ts) == [5.0, 6.0] and len(b.errors) == 2


def test_jsonl_fast_path_never_mistakes_nested_ragged_or_blank_lines(tmp_path):
    # Block-level checks decide the fast path: each case below must fall back to
    # the per-line path and name exactly the bad lines, never reshape silently.
    p = tmp_path / "n.jsonl"
    p.write_text("[1, 2]\n\n   \n[[3, 4]]\n[5, 6]\n  [7, 8]\n[9]\n")
    (b,) = read_all(JsonLinesSource("j", path=str(p)))
    np.testing.assert_array_equal(b.data, [[1, 2], [5, 6], [7, 8]])
    reasons = [e[1] for e in b.errors]
    assert len(b.errors) == 2 and all("shape" in r for r in reasons)
    # Two lines whose brackets balance overall ("[1, 2" + "3]") are not two arrays.
    q = tmp_path / "b.jsonl"
    q.write_text("[1, 2\n3]\n[4, 5]\n")
    (b,) = read_all(JsonLinesSource("j", path=str(q)))
    np.testing.assert_array_equal(b.data, [[4, 5]])
    assert len(b.errors) == 2


def test_follow_reads_a_growing_file(tmp_path):
    p = tmp_path / "grow.jsonl"
    p.write_text("[1]\n")
    src = JsonLinesSource("g", path=str(p), follow=True)
    src.open()
    assert src.read(10, 0.1).data.tolist() == [[1.0]]
    assert src.read(10, 0.05) is None and not src.exhausted
    with open(p, "a") as f:
        f.write("[2]\n[3")
    assert src.read(10, 0.5).data.tolist() == [[2.0]]  # the partial "[3" waits for its newline
    with open(p, "a") as f:
        f.write("]\n")
    assert src.read(10, 0.5).data.tolist() == [[3.0]]
    src.close()


def test_stream_source_on_a_fifo(tmp_path):
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    src = StreamSource("serial", path=str(fifo), format="csv")
    src.open()
    assert src.read(10, 0.05) is None and not src.exhausted  # no writer yet: wait, do not end

    def writer():
        with open(fifo, "w") as f:
            for i in range(50):
                f.write(f"{i},{i + 1}\n")
                f.flush()

    t = threading.Thread(target=writer)
    t.start()
    got = []
    deadline = time.monotonic() + 10
    while not src.exhausted and time.monotonic() < deadline:
        b = src.read(16, 0.2)
        if b is not None:
            got.append(b.data)
    t.join(5)
    src.close()
    data = np.concatenate(got)
    assert data.shape == (50, 2) and data[:, 0].tolist() == list(range(50))


def test_a_pipe_hands_over_what_it_has_without_waiting_for_a_full_block(tmp_path):
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    src = JsonLinesSource("slow", path=str(fifo))
    src.open()
    w = os.open(fifo, os.O_WRONLY)
    try:
        os.write(w, b"[1, 2]\n")
        t0 = time.monotonic()
        b = src.read(256, 5.0)  # a slow sensor: one sample, far from a block of 256
        waited = time.monotonic() - t0
        assert b is not None and b.data.tolist() == [[1.0, 2.0]]
        # It returned on the sample, not on the 5 s read timeout.
        assert waited < 2.5
    finally:
        os.close(w)
        src.close()


def _process_source(path, **kw):
    from edgeship.agent.procsource import ProcessSource

    return ProcessSource("jsonl", "proc", {"path": str(path), **kw}, block_size=64)


def test_process_reader_gives_the_same_rows_errors_and_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    lines = ["[" + ",".join(f"{v:.4f}" for v in r) + "]" for r in x]
    lines[1500] = '{"oops": 1}'
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(lines) + "\n")
    src = _process_source(p)
    blocks = read_all(src, max_n=64, timeout=1.0, limit=30)
    assert src.exhausted and src.pid is None  # closed: the child is gone
    assert all(len(b) <= 64 for b in blocks)  # the child's bigger blocks are split to what was asked
    data = np.concatenate([b.data for b in blocks if b.data is not None and len(b.data)])
    errors = [e for b in blocks for e in b.errors]
    assert data.shape == (2999, 8)
    np.testing.assert_allclose(data, np.delete(x, 1500, axis=0), atol=1e-4)
    assert [e[0] for e in errors] == ["s.jsonl:1501"]
    # Exactly what the same source gives in the agent's own process.
    same = np.concatenate([b.data for b in read_all(JsonLinesSource("t", path=str(p)), max_n=64)
                           if b.data is not None and len(b.data)])
    np.testing.assert_array_equal(data, same)


def test_process_reader_reports_a_failing_child_and_refuses_what_it_cannot_do(tmp_path):
    from edgeship.agent.procsource import ProcessSource, SourceProcessError

    src = _process_source(tmp_path / "missing.jsonl")
    src.open()
    with pytest.raises(SourceProcessError, match="does not exist"):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            src.read(64, 0.5)
    src.close()
    with pytest.raises(ConfigError, match="numeric sources"):
        ProcessSource("folder", "cam", {"path": str(tmp_path)})
    with pytest.raises(ConfigError, match="stdin"):
        ProcessSource("jsonl", "in", {"path": "-"})
    with pytest.raises(ConfigError, match="unknown option"):
        ProcessSource("jsonl", "x", {"path": str(tmp_path / "a"), "bogus": 1})


def test_process_reader_child_stops_when_closed_mid_stream(tmp_path):
    fifo = tmp_path / "never.fifo"
    os.mkfifo(fifo)
    src = _process_source(fifo)
    src.open()
    pid = src.pid
    assert src.read(64, 0.3) is None and not src.exhausted  # no writer: nothing yet, not the end
    src.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by close()


def test_synthetic_count_distinct_nan_and_rate():
    blocks = read_all(SyntheticSource("s", shape=[4], count=25, distinct=3, nan_every=10), max_n=10)
    data = np.concatenate([b.data for b in blocks])
    assert data.shape == (25, 4)
    assert np.isnan(data).any(axis=1).sum() == 2
    finite = data[~np.isnan(data).any(axis=1)]
    assert len(np.unique(finite, axis=0)) == 3
    src = SyntheticSource("r", shape=[1], rate_hz=200)
    src.open()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 0.25:
        b = src.read(100, 0.05)
        n += len(b) if b is not None else 0
    src.close()
    assert 20 <= n <= 70  # ~50 at 200 Hz; loose bounds on a shared machine


def test_folder_lists_in_order_and_watch_picks_up_new_files(tmp_path):
    for name in ("b.npy", "a.npy"):
        np.save(tmp_path / name, np.zeros(3))
    (tmp_path / "notes.txt").write_text("ignored")
    src = FolderSource("f", path=str(tmp_path), watch=True, poll_s=0.05)
    src.open()
    b = src.read(10, 0.1)
    assert b.refs == ["a.npy", "b.npy"]
    assert src.decode(b.items[0]).shape == (3,)
    np.save(tmp_path / "c.npy", np.ones(2))
    got = []
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        nb = src.read(10, 0.1)
        if nb is not None:
            got = nb.refs
    src.close()
    assert got == ["c.npy"]
    glob_src = FolderSource("g", path=str(tmp_path / "*.npy"))
    assert [r for blk in read_all(glob_src) for r in blk.refs] == ["a.npy", "b.npy", "c.npy"]


def test_fake_camera_frames_and_unplug():
    cam = CameraSource("cam", capture=FakeCapture(width=8, height=6, fail_after=3), color="L")
    cam.open()
    frames = [cam.decode(cam.read(1, 0.1).items[0]) for _ in range(3)]
    assert frames[0].shape == (6, 8) and frames[0].dtype == np.uint8 and not np.array_equal(frames[0], frames[1])
    with pytest.raises(OSError, match="no frame"):
        cam.read(1, 0.1)
    cam.close()
    fake = make_source("camera", "c2", device="fake", width=4, height=4)
    fake.open()
    assert fake.decode(fake.read(1, 0.1).items[0]).shape == (4, 4, 3)
    fake.close()


def test_registry_and_option_errors():
    assert source_class("folder") is FolderSource and source_class("synthetic") is SyntheticSource
    with pytest.raises(ConfigError, match="unknown source type 'nope'"):
        source_class("nope")
    with pytest.raises(ConfigError, match="shape"):
        make_source("synthetic", "s")
    with pytest.raises(ConfigError, match="colour: unknown option"):
        make_source("jsonl", "j", path="x", colour=1)
    with pytest.raises(ConfigError, match="does not exist"):
        JsonLinesSource("j", path="/nonexistent/x.jsonl").open()
