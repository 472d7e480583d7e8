"""Postprocess answers (#20.4) reach the agent's sinks and JSON lines, not only the HTTP API.

An identity model makes the head's output whatever the test feeds it, so each
hook (topk labels, grid boxes + NMS, a thresholded map, CTC text) is checked
against :func:`edgeship.runtime.postprocess.apply` on the very output each
line carries. The source is a real JSON-lines file through prefetch and the
micro-batcher; results go to a real JSON-lines file and a callback sink.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from models import make_identity_onnx

from edgeship import package as P
from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.agent.sources import make_source
from edgeship.runtime.postprocess import apply, check_postprocess

pytest.importorskip("onnx")

HEADS = {
    "topk": ((5,), ["a", "b", "c", "d", "e"], {"kind": "topk", "k": 3, "activation": "softmax"}),
    "boxes": ((7, 2, 3), ["cat", "dog"], {"kind": "boxes", "layout": "grid", "stride": 8, "score_threshold": 0.3}),
    "threshold": ((3, 4), None, {"kind": "threshold", "threshold": 0.5, "activation": "sigmoid"}),
    "ctc": ((6, 4), ["<blank>", "a", "b", "c"], {"kind": "ctc", "blank": 0, "activation": "softmax"}),
}


def samples(kind: str, n: int, seed: int) -> np.ndarray:
    shape = HEADS[kind][0]
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32) * 2
    if kind == "boxes":
        x[:, 0] -= 2.0  # most cells empty ...
        x[:, 0, 0, :2] += 6.0  # ... two neighbours with objects, so NMS has work
    return x


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_postprocess_answers_in_json_lines_and_callbacks(tmp_path, kind):
    shape, labels, post = HEADS[kind]
    pkg = P.build(tmp_path / f"{kind}.edgepkg", make_identity_onnx(tmp_path / "m.onnx", shape), name=kind,
                  version="1", labels=labels, postprocess=post)
    xs = samples(kind, 6, seed=len(kind))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x.tolist()) + "\n" for x in xs))
    again = tmp_path / "again.jsonl"  # the first sample again, once its answer is cached
    again.write_text(json.dumps(xs[0].tolist()) + "\n")
    out = tmp_path / "out.jsonl"
    got = []
    cfg = {"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
           "batcher": {"max_batch": 4, "max_delay_ms": 5}, "cache": {"enabled": True},
           "sources": [{"type": "jsonl", "id": "file", "path": str(src)}],
           "sinks": [{"type": "jsonl", "path": str(out), "outputs": True},
                     {"type": "callback", "name": "c"}]}
    with Agent(parse_config(cfg), callbacks={"c": got.append}) as agent:
        assert agent.wait_idle(30)
        agent.add_source(make_source("jsonl", "again", path=str(again)))
        assert agent.wait_idle(30)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(got) == 7
    assert any(d.get("cached") for d in lines)
    spec = check_postprocess(post)
    seen = []
    for d in lines:
        y = np.asarray(d["outputs"]["y"], np.float32)
        want = apply(spec, {"y": y}, labels)
        seen.append(y)
        if kind == "topk":
            assert d["label"] == want["label"] and d["score"] == pytest.approx(want["score"], abs=1e-6)
            assert [lab for lab, _ in d["top"]] == [lab for lab, _ in want["top"]] and len(d["top"]) == 3
        elif kind == "boxes":
            assert d["detections"] == want["detections"] and d["detections"], d
            assert "label" not in d
        elif kind == "threshold":
            assert d["mask"] == want["mask"].tolist() and d["positive"] == pytest.approx(want["positive"])
        else:
            assert d["text"] == want["text"] and d["score"] == pytest.approx(want["score"], abs=1e-6)
            assert d["text"] and set(d["text"]) <= set("abc")
    # Every sample answered once (plus the cached repeat), each line's answer from its own output.
    assert sorted(map(bytes, seen)) == sorted(map(bytes, [*xs, xs[0]]))
    for r in got:  # the callback sink's per-sample results carry the same answers
        want = apply(spec, {"y": r.outputs["y"]}, labels)
        d = r.to_dict(outputs=False)
        assert "outputs" not in d
        for key in want:
            v = want[key]
            assert d[key] == (v.tolist() if isinstance(v, np.ndarray) else [list(t) for t in v] if key == "top"
                              else pytest.approx(v) if isinstance(v, float) else v)


def test_json_lines_without_outputs_still_carry_the_answer(tmp_path):
    """The default jsonl sink (no raw outputs): a detector's line holds its detections, not arrays."""
    shape, labels, post = HEADS["boxes"]
    pkg = P.build(tmp_path / "det.edgepkg", make_identity_onnx(tmp_path / "m.onnx", shape), name="det",
                  version="1", labels=labels, postprocess=post)
    xs = samples("boxes", 3, seed=1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x.tolist()) + "\n" for x in xs))
    out = tmp_path / "out.jsonl"
    cfg = {"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
           "sources": [{"type": "jsonl", "id": "file", "path": str(src)}],
           "sinks": [{"type": "jsonl", "path": str(out)}]}
    with Agent(parse_config(cfg)) as agent:
        assert agent.wait_idle(30)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    spec = check_postprocess(post)
    assert [d["detections"] for d in lines] == [apply(spec, {"y": x}, labels)["detections"] for x in xs]
    assert all("outputs" not in d and d["model"] == {"name": "det", "version": "1"} for d in lines)
