"""Structured pruning (edgeship.converters.pruning): shapes, exactness, parameter targets, export, the gate."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from edgeship.converters import checkpoints  # noqa: E402
from edgeship.converters import pruning as P  # noqa: E402
from edgeship.errors import AccuracyBudgetError, ConversionError  # noqa: E402


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)).eval()


def test_plan_finds_producers_consumers_and_bn():
    groups = P.plan(_cnn())
    assert [(g.producer, g.consumer, g.flattened) for g in groups] == [(0, 3, False), (3, 7, True), (7, 10, False)]
    assert groups[0].bns == (1,)
    # the output layer is never a producer; a non-Sequential model is refused
    with pytest.raises(ConversionError, match="Sequential"):
        P.plan(nn.Linear(3, 3))


def test_pruning_zero_channels_is_exact_and_shapes_follow():
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 16, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
    with torch.no_grad():  # half of every prunable layer contributes nothing: pruning them must not change outputs
        for layer, dead in ((m[0], [1, 3, 5]), (m[2], [0, 2, 4, 6]), (m[5], [1, 3, 5, 7, 9])):
            layer.weight[dead] = 0
            layer.bias[dead] = -1.0  # ReLU(-1) = 0 everywhere
    x = torch.randn(5, 1, 4, 4)
    pm = P.prune_structure(m, 0.5)
    assert pm[0].weight.shape == (3, 1, 3, 3) and pm[2].weight.shape == (4, 3, 3, 3)
    assert pm[5].weight.shape == (5, 4 * 16) and pm[7].weight.shape == (4, 5)
    with torch.no_grad():
        assert torch.allclose(m(x), pm(x), atol=1e-5)
    assert P.count_params(pm) < P.count_params(m) / 2
    assert P.count_params(m) == sum(p.numel() for p in m.parameters())  # the original is untouched


def test_l1_magnitude_keeps_the_largest_channels():
    m = _cnn()
    scores = P.channel_scores(m[0])
    pm = P.prune_structure(m, 0.5)
    keep = np.sort(np.argsort(-scores)[:4])
    assert torch.equal(pm[0].weight, m[0].weight[torch.as_tensor(keep)])
    assert torch.equal(pm[1].running_mean, m[1].running_mean[torch.as_tensor(keep)])  # BN follows its conv
    with torch.no_grad():
        assert pm(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_ratio_for_params_meets_the_target():
    m = _cnn()
    r = P.ratio_for_params(m, 0.6)
    assert 1 - P.count_params(P.prune_structure(m, r)) / P.count_params(m) >= 0.6
    assert 1 - P.count_params(P.prune_structure(m, max(0.0, r - 0.05))) / P.count_params(m) < 0.6
    with pytest.raises(ConversionError, match="target_params"):
        P.ratio_for_params(m, 1.5)


def test_checkpoint_round_trip(tmp_path):
    pm = P.prune_structure(_cnn(), 0.5)
    path = checkpoints.save_pruned(pm, tmp_path / "p.pt", ratio=0.5)
    back = checkpoints.load_pruned(_cnn, path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(back(x), pm(x))
    from edgeship.converters.checkpoints import load_student  # the recipe path: factory + pruned weights

    factory = tmp_path / "f.py"
    factory.write_text("import torch.nn as nn\n"
                       "def Net():\n"
                       "    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
                       "        nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),\n"
                       "        nn.Flatten(), nn.Linear(12 * 4 * 4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))\n")
    via_distill = load_student(f"{factory}:Net", path)
    with torch.no_grad():
        assert torch.allclose(via_distill(x), pm(x))


def _blobs(n, rng):
    y = rng.integers(0, 3, n)
    x = rng.normal(0, 0.6, (n, 1, 8, 8)).astype(np.float32)
    for c in range(3):  # each class lights one band of rows
        x[y == c, 0, 2 * c + 1:2 * c + 3, :] += 1.5
    return {"input": x, "labels": y}


@pytest.mark.slow
def test_prune_end_to_end_onnx_runs_and_gate(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    train, evald = _blobs(600, rng), _blobs(200, rng)
    m = _cnn().train()
    P.finetune(m, train["input"], train["labels"], epochs=4, lr=3e-3)
    res = P.prune(m, train, ratio=0.5, eval=evald, teacher=True, finetune_epochs=3, out=tmp_path, max_drop=5.0,
                  repeats=5, exporter="torchscript", quiet=True)
    assert res.params_after < 0.5 * res.params_before and res.drop <= 5.0
    assert res.checkpoint.is_file() and res.plot.is_file() and res.report_md.is_file()
    sess = ort.InferenceSession(str(res.onnx), providers=["CPUExecutionProvider"])
    x = evald["input"][:7]
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        assert np.allclose(onnx_out, res.model(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert [r["ratio"] for r in res.sweep] == [0.0, 0.5]
    # the gate: a budget of zero points against a model pruned to the bone, without fine-tuning
    with pytest.raises(AccuracyBudgetError, match="points"):
        P.prune(m, train, ratio=0.9, eval=evald, finetune_epochs=0, max_drop=0.0, out=tmp_path / "bad", repeats=3,
                exporter="torchscript", quiet=True)
    assert not (tmp_path / "bad" / "pruned.onnx").exists() and (tmp_path / "bad" / "prune.report.md").is_file()


def test_recipe_plans_a_prune_step_only_when_asked(tmp_path, signing_keys):
    from edgeship.converters.recipe import STEPS, run_recipe

    rng = np.random.default_rng(0)
    for part in ("train", "calib", "eval"):
        np.savez(tmp_path / f"{part}.npz", input=rng.random((8, 1, 8, 8), dtype=np.float32),
                 labels=rng.integers(0, 3, 8))
    (tmp_path / "nets.py").write_text("import torch.nn as nn\n"
                                      "def Net():\n"
                                      "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(),
               tmp_path / "teacher.pt")
    base = (f'name = "p"\nout_dir = "{tmp_path}/build"\n[data]\ntrain = "train.npz"\ncalib = "calib.npz"\n'
            f'eval = "eval.npz"\n[teacher]\nfactory = "nets.py:Net"\nweights = "teacher.pt"\n'
            f'[student]\nfactory = "nets.py:Net"\n[package]\nsigning_key = "{signing_keys[0]}"\n')
    (tmp_path / "plain.toml").write_text(base)
    (tmp_path / "pruned.toml").write_text(base + "[prune]\nratio = 0.5\nfinetune_epochs = 2\n")
    plain = run_recipe(tmp_path / "plain.toml", dry_run=True)
    assert [s.name for s in plain.steps] == [s.name for s in STEPS]
    pruned = run_recipe(tmp_path / "pruned.toml", dry_run=True)
    names = [s.name for s in pruned.steps]
    assert names[:3] == ["distill", "prune", "export_onnx"]
    # pruning changes what every later step reads: their keys differ from the plain recipe's
    key = {s.name: s.key for s in plain.steps}
    assert all(s.key != key[s.name] for s in pruned.steps if s.name not in ("distill", "prune"))
