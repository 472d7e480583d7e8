"""Real-size models and real data for benchmarks and tests beyond the 8x8 digits.

The issues on serving (#19), quantization (#18) and bring-your-own-model (#20)
all need the same things: model *shapes* users actually bring (a MobileNetV3-
style 224x224 CNN with depthwise convolutions, squeeze-excite and hard-swish;
a ResNet-style CNN; a dense-output detector with dynamic H/W; a sequence
recognizer; a two-input transformer text classifier; a GRU keyword spotter
with state in/out; a 1-D audio CNN) and real inputs for them. Nothing is
downloaded: images are crops of scikit-learn's two bundled photos
(``china.jpg``, ``flower.jpg``), audio is synthesised.

A labelled task on real photos, so models can be trained briefly and their
int8 agreement means something: :func:`photo_patches` labels each crop with
(which photo, which quadrant) = 8 classes.

Every model factory imports torch inside the function (this module is
imported by tests that may not need torch). Add models by appending new
functions; several benchmarks and tests rely on the existing ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["sample_photos", "photo_patches", "write_jpegs", "synth_audio", "write_wav", "MobileNetV3Like",
           "ResNetLike", "TinyDetector", "SequenceRecognizer", "TextTransformer", "GRUKeywordSpotter",
           "AudioCNN1D", "train_classifier_briefly", "to_nchw", "PHOTO_CLASSES", "IMAGENET_PREPROCESS"]

PHOTO_CLASSES = [f"{p}-{q}" for p in ("china", "flower") for q in ("tl", "tr", "bl", "br")]
# How the photo models expect their input: RGB, NCHW, ImageNet mean/std on 0..1 pixels.
IMAGENET_PREPROCESS = {"scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "layout": "NCHW", "resize": [224, 224], "color": "RGB", "dtype": "float32"}


# ----------------------------------------------------------------------------- data

def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos, (427, 640, 3) uint8 each. No download."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(im, dtype=np.uint8) for im in load_sample_images().images]


def photo_patches(n: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random crops, resized to ``size``x``size``: ``(x uint8 (n, size, size, 3), y int64 (n,))``.

    A crop is centred inside one quadrant of one photo; its label is that
    (photo, quadrant) pair (see :data:`PHOTO_CLASSES`). Scale, position and
    brightness vary; no flips, since a flip would move a crop to another
    quadrant's label.
    """
    from PIL import Image

    photos = sample_photos()
    rng = np.random.default_rng(seed)
    xs = np.empty((n, size, size, 3), np.uint8)
    ys = np.empty(n, np.int64)
    for i in range(n):
        p = int(rng.integers(len(photos)))
        q = int(rng.integers(4))
        img = photos[p]
        h, w = img.shape[:2]
        qh, qw = h // 2, w // 2
        side = int(rng.uniform(0.45, 0.95) * min(qh, qw))
        top = (q // 2) * qh + int(rng.integers(0, qh - side + 1))
        left = (q % 2) * qw + int(rng.integers(0, qw - side + 1))
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        a = np.asarray(crop, np.float32) * rng.uniform(0.8, 1.2)
        xs[i] = np.clip(a, 0, 255).astype(np.uint8)
        ys[i] = p * 4 + q
    return xs, ys


def write_jpegs(folder: str | Path, n: int, size: int = 224, seed: int = 0, quality: int = 90) -> list[Path]:
    """Write ``n`` photo crops as JPEG files (``img_00000.jpg`` ...) and a ``labels.txt``; returns the paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = photo_patches(n, size, seed)
    paths = []
    for i, x in enumerate(xs):
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(x).save(p, quality=quality)
        paths.append(p)
    (folder / "labels.txt").write_text("".join(f"{p.name} {PHOTO_CLASSES[y]}\n" for p, y in zip(paths, ys)))
    return paths


def synth_audio(n: int, seconds: float = 1.0, sr: int = 16000, n_classes: int = 4, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic clips ``(x float32 (n, sr*seconds), y int64)``: class k is a chirp/tone pattern + noise.

    No audio ships with scikit-learn, so the signal is made up; the shape and
    cost (16 kHz windows) are what matter for serving.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds), dtype=np.float32) / sr
    xs = np.empty((n, t.size), np.float32)
    ys = rng.integers(0, n_classes, n).astype(np.int64)
    for i, k in enumerate(ys):
        f0 = 200.0 * (k + 1) * rng.uniform(0.9, 1.1)
        sweep = f0 * (1 + (k % 2) * t / seconds)  # odd classes chirp up
        x = 0.5 * np.sin(2 * np.pi * sweep * t) + 0.05 * rng.standard_normal(t.size)
        xs[i] = x.astype(np.float32)
    return xs, ys


def write_wav(path: str | Path, samples: np.ndarray, sr: int = 16000) -> Path:
    """Write float samples in [-1, 1] as a 16-bit mono WAV file (stdlib ``wave``)."""
    import wave

    path = Path(path)
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return path


# ----------------------------------------------------------------------------- models

def _nn():
    import torch.nn as nn

    return nn


def MobileNetV3Like(num_classes: int = 8, width: float = 1.0):  # noqa: N802 - factories read like classes
    """MobileNetV3-small-style CNN for 224x224 RGB: depthwise convs, squeeze-excite, hard-swish (~1.5M params)."""
    import torch
    nn = _nn()

    def c(ch: int) -> int:
        return max(8, int(ch * width + 4) // 8 * 8)

    class SE(nn.Module):
        def __init__(self, ch: int) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(ch, c(ch // 4), 1), nn.Conv2d(c(ch // 4), ch, 1)

        def forward(self, x):
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    class Block(nn.Module):
        def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: bool, hs: bool) -> None:
            super().__init__()
            act = nn.Hardswish if hs else nn.ReLU
            layers = [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), act()] if exp != cin else []
            layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), act()]
            if se:
                layers.append(SE(exp))
            layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.res else y

    # (kernel, expansion, out, SE, hard-swish, stride): MobileNetV3-small's table.
    cfg = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
           (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
           (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
           (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks = [nn.Conv2d(3, c(16), 3, 2, 1, bias=False), nn.BatchNorm2d(c(16)), nn.Hardswish()]
            cin = c(16)
            for k, e, o, se, hs, s in cfg:
                blocks.append(Block(cin, c(e), c(o), k, s, se, hs))
                cin = c(o)
            blocks += [nn.Conv2d(cin, c(576), 1, bias=False), nn.BatchNorm2d(c(576)), nn.Hardswish()]
            self.features = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Linear(c(576), 1024), nn.Hardswish(), nn.Dropout(0.2),
                                      nn.Linear(1024, num_classes))

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
            return self.head(x)

    return Net()


def ResNetLike(num_classes: int = 8, width: int = 32):  # noqa: N802
    """A ResNet-18-style CNN (basic blocks, 4 stages) at reduced width, for 224x224 RGB."""
    import torch
    nn = _nn()

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.down(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = width
            self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, cin = [], w
            for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
                layers += [Basic(cin, cout, 1 if i == 0 else 2), Basic(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))

    return Net()


def TinyDetector(num_classes: int = 2):  # noqa: N802
    """A fully convolutional dense-output detector: H, W any multiple of 32 (dynamic).

    Output ``(N, 5 + num_classes, H/8, W/8)``: objectness logit, 4 box
    offsets, class logits per cell (a CenterNet/YOLO-style head).
    """
    nn = _nn()

    def cbr(cin, cout, s):
        return [nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(*cbr(3, 16, 2), *cbr(16, 32, 2), *cbr(32, 32, 1), *cbr(32, 64, 2),
                                          *cbr(64, 64, 1), *cbr(64, 64, 1))
            self.head = nn.Conv2d(64, 5 + num_classes, 1)

        def forward(self, x):
            return self.head(self.backbone(x))

    return Net()


def SequenceRecognizer(num_classes: int = 37, height: int = 32):  # noqa: N802
    """A CRNN-style text-line recognizer: (N, 1, 32, W) image -> (N, W/4, num_classes) per-step scores."""
    import torch
    nn = _nn()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(64, 96, 3, 1, 1), nn.ReLU(), nn.MaxPool2d((height // 4, 1)))
            self.rnn = nn.GRU(96, 96, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(192, num_classes)

        def forward(self, x):
            f = self.cnn(x).squeeze(2).transpose(1, 2)  # (N, T, 96)
            y, _ = self.rnn(f)
            return torch.log_softmax(self.fc(y), -1)

    return Net()


def TextTransformer(vocab: int = 2000, seq_len: int = 64, num_classes: int = 2, dim: int = 128, layers: int = 2):  # noqa: N802
    """A two-input transformer encoder classifier: ``ids`` (int64 N, L) and ``mask`` (int64 N, L, 1 = token)."""
    import torch
    nn = _nn()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, 4, dim * 2, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.fc = nn.Linear(dim, num_classes)

        def forward(self, ids, mask):
            x = self.emb(ids) + self.pos[:, : ids.shape[1]]
            x = self.enc(x, src_key_padding_mask=mask == 0)
            m = mask.unsqueeze(-1).to(x.dtype)
            return self.fc((x * m).sum(1) / m.sum(1).clamp(min=1.0))

    return Net()


def GRUKeywordSpotter(n_features: int = 40, hidden: int = 64, num_classes: int = 12):  # noqa: N802
    """A streaming keyword spotter with explicit state: ``(frames (N, T, F), h (1, N, H)) -> (logits, h_out)``.

    The agent must carry ``h`` per stream between consecutive windows.
    """
    nn = _nn()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(n_features, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, num_classes)

        def forward(self, frames, h):
            y, h_out = self.gru(frames, h)
            return self.fc(y[:, -1]), h_out

    return Net()


def AudioCNN1D(num_classes: int = 4, samples: int = 16000):  # noqa: N802
    """A 1-D CNN over raw 16 kHz audio windows: (N, 1, samples) -> (N, num_classes)."""
    import torch
    nn = _nn()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [1, 16, 32, 64, 64, 128]
            layers = []
            for a, b in zip(chans, chans[1:]):
                layers += [nn.Conv1d(a, b, 9, 4, 4, bias=False), nn.BatchNorm1d(b), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.fc = nn.Linear(128, num_classes)

        def forward(self, x):
            return self.fc(torch.mean(self.body(x), -1))

    return Net()


def train_classifier_briefly(model, x: np.ndarray, y: np.ndarray, *, epochs: int = 2, batch: int = 32,
                             lr: float = 2e-3, seed: int = 0):
    """A few epochs of Adam on float NCHW ``x``: enough that outputs are not random, so int8 agreement means
    something. Returns the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def to_nchw(x_uint8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 NHWC photos -> float32 NCHW with :data:`IMAGENET_PREPROCESS`'s normalisation."""
    p = IMAGENET_PREPROCESS
    x = x_uint8_nhwc.astype(np.float32) * p["scale"]
    x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
