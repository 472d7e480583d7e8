"""The variant served at start-up (issue 18 / 19.5): pure choices, then real agents timing real onnxruntime variants."""
from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_port  # noqa: E402
from models import make_deep_mlp_onnx, make_mlp_onnx, mlp_reference  # noqa: E402

from edgeship.agent.adapt_choice import (  # noqa: E402
    VariantChooser,
    choice_line,
    choice_metric_lines,
    machine_info,
    measure_variants,
    parse_cpuinfo,
)
from edgeship.agent.adapt_policy import (  # noqa: E402
    DEFAULT_MAX_DROP,
    accuracy_budget,
    accuracy_drops,
    choose_fastest,
    eligible_variants,
)

ROOT = Path(__file__).resolve().parents[1]

FP32 = {"id": "onnx-fp32", "precision": "fp32", "metrics": {"points": 97.5, "drop": 0.0}}
INT8 = {"id": "onnx-int8", "precision": "int8", "default": True, "metrics": {"points": 97.0, "drop": 0.5}}
BAD = {"id": "onnx-int8-bad", "precision": "int8", "metrics": {"points": 90.0}}
BARE = {"id": "tflite-int8", "precision": "int8"}


# -- pure ---------------------------------------------------------------------------

def test_accuracy_drops_from_the_recorded_drop_or_the_metric_below_fp32():
    drops = accuracy_drops([FP32, INT8, BAD, BARE])
    assert drops == {"onnx-fp32": 0.0, "onnx-int8": 0.5, "onnx-int8-bad": pytest.approx(7.5), "tflite-int8": None}
    # a 0..1 metric is on the points scale; the reference is the most accurate fp32 variant
    assert accuracy_drops([{"id": "a", "precision": "fp32", "metrics": {"top1": 0.98}},
                           {"id": "b", "precision": "int8", "metrics": {"top1": 0.975}}])["b"] == pytest.approx(0.5)


def test_accuracy_budget_config_then_package_then_default():
    manifest = {"provenance": {"quantization": {"onnx": {"max_drop": 2.0}, "tflite": {"max_drop": 1.5}}}}
    assert accuracy_budget(manifest) == (1.5, "the package's quantization budget")
    assert accuracy_budget(manifest, 0.25) == (0.25, "[adapt] max_drop")
    assert accuracy_budget({}) == (DEFAULT_MAX_DROP, "the default budget")


def test_eligible_variants_never_admit_one_beyond_the_budget_or_of_unknown_accuracy():
    ids, excluded = eligible_variants([FP32, INT8, BAD, BARE], "onnx-int8", 1.0)
    assert ids == ["onnx-fp32", "onnx-int8"]
    assert "7.50 pt below fp32, over the 1 pt budget" in excluded["onnx-int8-bad"]
    assert "no accuracy recorded" in excluded["tflite-int8"]
    # the default is always served, whatever its figures; a named backend keeps the others away
    ids, excluded = eligible_variants([FP32, BAD], "onnx-int8-bad", 1.0)
    assert ids == ["onnx-fp32", "onnx-int8-bad"]
    ids, excluded = eligible_variants([{**FP32, "runtime": "tflite"}, {**INT8, "runtime": "onnxruntime"}],
                                      "onnx-int8", 1.0, backend="onnxruntime")
    assert ids == ["onnx-int8"] and "runs on tflite" in excluded["onnx-fp32"]


def test_choose_fastest_needs_more_than_the_noise_margin_to_leave_the_default():
    figs = {"int8": {"b1_ms": 3.0, "bn_ms": 48.0, "batch": 8}, "fp32": {"b1_ms": 1.0, "bn_ms": 16.0, "batch": 8}}
    best, reason, rel = choose_fastest(figs, "int8")
    assert best == "fp32" and rel["fp32"] == pytest.approx(1 / 3) and "0.33x the default" in reason
    close = {"int8": {"b1_ms": 1.0, "bn_ms": 8.0, "batch": 8}, "fp32": {"b1_ms": 0.95, "bn_ms": 7.6, "batch": 8}}
    best, reason, _ = choose_fastest(close, "int8", margin=0.1)
    assert best == "int8" and "within the 10% noise margin" in reason
    assert choose_fastest(close, "int8", margin=0.0)[0] == "fp32"
    # ... unless the faster one is also more accurate: an int8 default measured slower than fp32 is never kept
    best, reason, _ = choose_fastest(close, "int8", margin=0.1, drops={"int8": 0.5, "fp32": 0.0})
    assert best == "fp32" and "more accurate than the default" in reason
    slower = {"int8": {"b1_ms": 1.0, "bn_ms": 8.0, "batch": 8}, "fp32": {"b1_ms": 1.05, "bn_ms": 8.4, "batch": 8}}
    assert choose_fastest(slower, "int8", 0.1, {"int8": 0.5, "fp32": 0.0})[0] == "int8"
    # the other way round: an fp32 default keeps serving when the less accurate int8 is only a little faster
    assert choose_fastest(close, "fp32", 0.1, {"int8": 0.5, "fp32": 0.0})[0] == "fp32"
    # batch 1 and per sample at the batch both count (geometric mean): faster alone, slower in batches
    mixed = {"a": {"b1_ms": 1.0, "bn_ms": 8.0, "batch": 8}, "b": {"b1_ms": 0.5, "bn_ms": 32.0, "batch": 8}}
    assert choose_fastest(mixed, "a")[0] == "a"
    # a variant timed at batch 1 only (a fixed-batch TFLite) is compared at batch 1
    one = {"a": {"b1_ms": 2.0, "bn_ms": 8.0, "batch": 8}, "t": {"b1_ms": 1.0, "bn_ms": None, "batch": 1}}
    assert choose_fastest(one, "a")[2]["t"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        choose_fastest({"x": figs["int8"]}, "int8")


def test_parse_cpuinfo_and_machine_info(tmp_path):
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512_vnni\n"
    assert parse_cpuinfo(x86) == ("AMD EPYC 9R14", {"fpu", "avx2", "avx512_vnni"})
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n"
    assert parse_cpuinfo(arm) == (None, {"fp", "asimd", "asimddp"})
    (tmp_path / "cpuinfo").write_text(arm)
    (tmp_path / "model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    m = machine_info(tmp_path / "cpuinfo", tmp_path / "model")
    assert m["cpu"] == "Raspberry Pi 5 Model B Rev 1.0" and m["int8_dot"] == ["asimddp"]
    assert machine_info(tmp_path / "none", tmp_path / "none")["int8_dot"] == []


def test_choice_line_and_metric_lines_name_the_variant_the_figures_and_the_machine():
    choice = {"mode": "fastest", "variant": "onnx-fp32", "default": "onnx-int8", "reason": "onnx-fp32 is the fastest",
              "measured": {"onnx-int8": {"b1_ms": 3.0, "bn_ms": 20.0, "batch": 8, "relative": 1.0},
                           "onnx-fp32": {"b1_ms": 1.0, "bn_ms": 7.0, "batch": 8, "relative": 0.34}},
              "excluded": {"tflite-int8": "cannot be loaded here: no TFLite\nruntime"}, "measure_s": 0.41,
              "machine": {"cpu": 'AMD "EPYC"', "arch": "x86_64", "cores": 2, "int8_dot": []}}
    line = choice_line(choice)
    assert "\n" not in line and "serving onnx-fp32 (package default onnx-int8)" in line
    assert "onnx-int8 b1 3.000 ms b8 20.000 ms (1.00x)" in line
    assert "tflite-int8 not served: cannot be loaded here: no TFLite runtime" in line
    assert "x86_64, 2 cores, no int8 dot product" in line
    text = "\n".join(choice_metric_lines(choice))
    assert 'edgeship_variant_choice_info{variant="onnx-fp32",default="onnx-int8",mode="fastest",' in text
    assert 'cpu="AMD \\"EPYC\\""' in text and 'int8_dot="none"' in text
    assert 'edgeship_variant_call_ms{variant="onnx-int8",batch="8"} 20.000000' in text


def test_measure_variants_is_bounded_and_interleaved():
    calls: list[str] = []
    runs = {"a": lambda f: calls.append("a"), "b": lambda f: calls.append("b")}
    out = measure_variants(runs, {"a": {1: [], 4: []}, "b": {1: [], 4: []}}, seconds=0.0)
    assert set(out) == {"a", "b"} and set(out["a"]) == {1, 4} == set(out["b"])
    # per batch size a phase: one untimed call each, then MIN_ROUNDS rounds of one call each
    assert len(calls) == 2 * (2 + 3 * 2)
    assert calls[2:4] != calls[4:6]        # the order rotates from round to round
    calls.clear()
    out = measure_variants(runs, {"a": {1: [], 4: []}, "b": {1: []}}, seconds=0.0)
    assert set(out["a"]) == {1, 4} and set(out["b"]) == {1} and len(calls) == (2 + 3 * 2) + (1 + 3)
    calls.clear()
    measure_variants({"a": runs["a"]}, {"a": {1: []}}, seconds=60.0, max_rounds=7)
    assert len(calls) == 1 + 7


# -- real agents ----------------------------------------------------------------------

def _int8_slower_package(tmp_path: Path) -> Path:
    """A package like ``convert quantize`` writes, int8 default: a deep narrow MLP quantized to static QDQ int8.

    Its Sigmoid has no int8 kernel, so each of the 16 layers dequantizes and
    requantizes around it: the int8 file takes ~2x the fp32 time here
    (models.make_deep_mlp_onnx), as int8 did for the MobileNet of issue 19.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeship import package

    class Calib(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"input": np.random.default_rng(i).normal(size=(1, 64)).astype(np.float32)}
                           for i in range(16))

        def get_next(self):
            return next(self.it, None)

    fp32 = make_deep_mlp_onnx(tmp_path / "deep.onnx", act="Sigmoid")
    int8 = tmp_path / "deep.int8.onnx"
    quantize_static(str(fp32), str(int8), Calib(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    return package.build(tmp_path / "q.edgepkg", {"model.onnx": int8, "model.fp32.onnx": fp32}, name="deep",
                         version="1.0.0", example_input=x,
                         provenance={"quantization": {"onnx": {"method": "static", "max_drop": 1.0}}},
                         variants=[{"id": "onnx-int8", "file": "model.onnx", "precision": "int8", "default": True,
                                    "metrics": {"points": 97.0, "drop": 0.5}},
                                   {"id": "onnx-fp32", "file": "model.fp32.onnx", "precision": "fp32",
                                    "metrics": {"points": 97.5, "drop": 0.0}}])


def _big_small_package(tmp_path: Path, small_drop: float) -> Path:
    """fp32 default with a 8,192-unit hidden layer beside a far cheaper 8-unit variant ``small_drop`` points worse."""
    from edgeship import package

    big = make_mlp_onnx(tmp_path / "big.onnx", hidden=8192, seed=0)
    small = make_mlp_onnx(tmp_path / "small.onnx", hidden=8, seed=1)
    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32)
    return package.build(tmp_path / f"bs{small_drop}.edgepkg", {"big.onnx": big, "small.onnx": small}, name="bs",
                         version="1.0.0", example_input=x,
                         variants=[{"id": "big", "file": "big.onnx", "precision": "fp32", "default": True,
                                    "metrics": {"points": 99.0}},
                                   {"id": "small", "file": "small.onnx", "precision": "fp32",
                                    "metrics": {"points": 99.0 - small_drop}}])


def _agent(tmp_path, pkg, **sections):
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config

    sections.setdefault("adapt", {})
    sections["adapt"] = {"choose_s": 0.3, **sections["adapt"]}
    return Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg),
                                         "state_dir": str(tmp_path / "state")},
                               "runtime": {"threads": 1}, "batcher": {"max_batch": 8}, **sections}))


def _chooser(agent) -> VariantChooser:
    c = next(c for c in agent.components if isinstance(c, VariantChooser))
    assert c.ready.wait(60)
    return c


def test_an_int8_default_slower_here_serves_fp32(tmp_path):
    pkg = _int8_slower_package(tmp_path)
    with _agent(tmp_path, pkg) as agent:
        assert agent.handle.variant == "onnx-int8"        # the default serves from the start
        x = np.random.default_rng(1).normal(size=64).astype(np.float32)
        agent.infer(x)
        c = _chooser(agent)
        choice = agent.metrics.variant_choice
        m = choice["measured"]
        assert m["onnx-int8"]["b1_ms"] > m["onnx-fp32"]["b1_ms"]  # slower here: the premise of this test
        assert c.state == "done" and choice["variant"] == "onnx-fp32" == agent.handle.variant
        assert choice["default"] == "onnx-int8" and choice["max_drop"] == 1.0
        assert choice["machine"]["arch"] and choice["machine"]["cpu"]
        assert set(m["onnx-int8"]) >= {"b1_ms", "bn_ms", "batch", "relative"} and m["onnx-int8"]["batch"] == 8
        # the fp32 file answers now: the same as onnxruntime running it
        import onnxruntime as ort

        raw = ort.InferenceSession(str(tmp_path / "deep.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(agent.infer(x).outputs["logits"], raw.run(None, {"input": x[None]})[0][0],
                                   rtol=1e-4, atol=1e-4)


def test_a_faster_variant_within_the_budget_is_served_and_reported_in_metrics(tmp_path):
    pkg = _big_small_package(tmp_path, small_drop=0.5)
    port = free_port()
    with _agent(tmp_path, pkg, api={"enabled": True, "port": port}) as agent:
        _chooser(agent)
        assert agent.handle.variant == "small"
        x = np.random.default_rng(1).normal(size=64).astype(np.float32)
        np.testing.assert_allclose(agent.infer(x).outputs["logits"], mlp_reference(x[None], hidden=8, seed=1)[0],
                                   rtol=1e-4, atol=1e-4)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/metrics", timeout=10).read().decode()
        health = agent.health()
    info = re.search(r'^edgeship_variant_choice_info\{(.*)\} 1$', text, re.M)
    assert info and 'variant="small"' in info.group(1) and 'default="big"' in info.group(1)
    assert 'arch="' in info.group(1) and 'cpu="' in info.group(1)
    assert re.search(r'^edgeship_variant_call_ms\{variant="big",batch="8"\} [0-9.]+$', text, re.M)
    assert re.search(r'^edgeship_variant_call_ms\{variant="small",batch="1"\} [0-9.]+$', text, re.M)
    assert health["components"]["VariantChooser"]["variant"] == "small"
    assert agent.metrics.counters["switches"] == 1


def test_a_variant_beyond_the_accuracy_budget_is_never_served_however_fast(tmp_path):
    pkg = _big_small_package(tmp_path, small_drop=5.0)
    with _agent(tmp_path, pkg) as agent:
        c = _chooser(agent)
        choice = agent.metrics.variant_choice
        assert agent.handle.variant == "big" and choice["variant"] == "big" and c.state == "done"
        assert choice["measured"] == {}                   # nothing to time it against: no load, no timing
        assert "over the 1 pt budget" in choice["excluded"]["small"]
    # the same package with a budget that admits it: the small variant is faster
    with _agent(tmp_path / "b", pkg, adapt={"max_drop": 6.0}) as agent:
        _chooser(agent)
        assert agent.handle.variant == "small"
        assert agent.metrics.variant_choice["max_drop_from"] == "[adapt] max_drop"


def test_choose_default_and_most_accurate_and_a_pinned_variant(tmp_path):
    pkg = _big_small_package(tmp_path, small_drop=0.5)
    with _agent(tmp_path / "d", pkg, adapt={"choose": "default"}) as agent:
        assert not any(isinstance(c, VariantChooser) for c in agent.components)
        assert agent.handle.variant == "big" and agent.metrics.variant_choice is None
    with _agent(tmp_path / "p", pkg, runtime={"variant": "big", "threads": 1}) as agent:
        assert not any(isinstance(c, VariantChooser) for c in agent.components)
    pkg2 = _big_small_package(tmp_path / "acc", small_drop=-0.5)   # the small one measured more accurate
    with _agent(tmp_path / "m", pkg2, adapt={"choose": "most_accurate"}) as agent:
        _chooser(agent)
        assert agent.handle.variant == "small" and agent.metrics.variant_choice["mode"] == "most_accurate"


def test_with_a_latency_budget_adapt_makes_the_one_start_up_choice(tmp_path):
    from edgeship.agent.adapt import AdaptController

    pkg = _big_small_package(tmp_path, small_drop=0.5)
    with _agent(tmp_path / "w", pkg, adapt={"latency_budget_ms": 1000.0, "check_s": 3600, "tune": False,
                                            "measure_s": 0.1}) as agent:
        assert not any(isinstance(c, VariantChooser) for c in agent.components)   # adapt owns the choice
    # A controller added to a running agent stops a chooser still timing: one choice, adapt's.
    with _agent(tmp_path / "a", pkg, adapt={"choose_s": 5.0}) as agent:
        ctl = agent.add_component(AdaptController(agent, budget_ms=1000.0, measure_s=0.1, check_s=3600, tune=False))
        assert ctl.ready.wait(60)
        chooser = next(c for c in agent.components if isinstance(c, VariantChooser))
        assert not chooser.alive
        choice = agent.metrics.variant_choice
        assert choice["mode"] == "latency_budget" and choice["variant"] == agent.handle.variant == "big"
        assert set(choice["measured"]) == {"big", "small"} and choice["machine"]["arch"]


def test_the_choice_goes_into_telemetry(tmp_path):
    from edgeship.agent.outbox import Outbox
    from edgeship.agent.telemetry import Telemetry

    pkg = _big_small_package(tmp_path, small_drop=0.5)
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    with _agent(tmp_path, pkg) as agent:
        tel = Telemetry(ob, "f", "d1", window_s=3600, metrics_snapshot=agent.metrics.snapshot)
        _chooser(agent)
        msg = tel.flush()
    ob.close()
    vc = msg["variant_choice"]
    assert vc["variant"] == "small" and set(vc["measured"]) == {"big", "small"} and vc["machine"]["cores"]
    json.dumps(msg)  # plain JSON for the wire


def test_the_docs_config_block_parses():
    from edgeship.agent.config import parse_config

    text = (ROOT / "docs" / "adapt.md").read_text()
    block = re.search(r"```toml\n(\[adapt\]\n.*?)```", text, re.S).group(1)
    import tomllib

    cfg = parse_config(tomllib.loads(block))
    assert cfg.adapt.choose == "fastest" and cfg.adapt.choose_s > 0
