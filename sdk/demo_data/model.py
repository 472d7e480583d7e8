"""Digits models shared by ``edgeship demo``, examples/digits, the benchmarks and the tests.

scikit-learn ships the 8x8 digits data set (1,797 images, values 0..16), so
nothing is downloaded. ``split()`` gives a fixed train / calibration / eval
split; the teacher is a ~0.63M-parameter CNN, the student has ~1/17 of that.
"""
from __future__ import annotations

import numpy as np

__all__ = ["load_digits_split", "Teacher", "Student", "train_classifier", "count_params", "PREPROCESS", "LABELS"]

# Raw digits pixels are 0..16; the models see x / 16 in NCHW float32.
PREPROCESS = {"scale": 1.0 / 16.0, "mean": [0.0], "std": [1.0], "layout": "NCHW", "resize": [8, 8],
              "color": "L", "dtype": "float32"}
LABELS = [str(i) for i in range(10)]


def load_digits_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed split: 1,200 train, 197 calibration, 400 eval. Inputs are raw 0..16 pixels, (N, 1, 8, 8) float32."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return {
        "x_train": x[:1200], "y_train": y[:1200],
        "x_calib": x[1200:1397], "y_calib": y[1200:1397],
        "x_eval": x[1397:], "y_eval": y[1397:],
    }


def _torch():
    import torch
    return torch


def Teacher():  # noqa: N802 - a factory that reads like a class
    """~0.63M parameters: three 3x3 convs (64, 128, 256) and a 256-wide head."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 4x4
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 2x2
        nn.Flatten(), nn.Linear(256 * 4, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10),
    )


def Student():  # noqa: N802
    """~37k parameters (under 1/10 of the teacher)."""
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 4x4
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_classifier(model, x: np.ndarray, y: np.ndarray, *, epochs: int = 20, seed: int = 0,
                     lr: float = 2e-3, batch_size: int = 64, scale: float = 1.0 / 16.0):
    """Plain supervised training (cross-entropy, Adam). Returns the model in eval mode."""
    torch = _torch()
    torch.manual_seed(seed)
    xt = torch.from_numpy(x * scale)
    yt = torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()
