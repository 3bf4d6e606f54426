"""Datasets that need no download: real 8x8 digits, scikit-image's photographs, and seeded
synthetic images of the paper's shapes."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real handwritten digits (8x8, 17 grey levels), 10 classes: its
    file read as sklearn.datasets.load_digits reads it, without importing scikit-learn (1-3 s
    of the start of every process that trains on digits)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits come with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")  # 64 pixels and the label per row
    x = torch.from_numpy(table[:, :-1].reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    return x, y


def make_synthetic(shape: tuple[int, int, int], num_samples: int, num_classes: int = 10,
                   seed: int = 1234, chunk: int = 16384
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learnable images: each class is a smooth random prototype; a sample is its prototype with
    random contrast, a random shift of up to 2 pixels and Gaussian pixel noise. Returned as
    uint8 pixels (the values in [-6, 6] mapped to 0..255, 0.05 a level against a noise std of
    1) with the pixels' per-channel mean and std: a real dataset's shape, a quarter of float32's
    memory (2M 28x28 images: 1.6 GB), made chunk by chunk.

    The data is a fixed dataset (its own seed), not a function of the run's seed, so that runs
    with different seeds see the same data, as with a real dataset. (Before hpcfl 0.2 the images
    were float32 and drawn in one piece; the labels, and so every partition, are the same.)
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, c, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    y = torch.arange(num_samples) % num_classes
    y = y[torch.randperm(num_samples, generator=g)]
    x = torch.empty(num_samples, c, h, w, dtype=torch.uint8)
    total = torch.zeros(2, c, dtype=torch.float64)  # sums of pixels and of their squares
    for k, start in enumerate(range(0, num_samples, chunk)):
        yk = y[start:start + chunk]
        gk = torch.Generator().manual_seed(seed * 1_000_003 + k + 1)
        contrast = 0.5 + torch.rand(len(yk), 1, 1, 1, generator=gk)
        xk = protos[yk] * contrast
        shifts = torch.randint(-2, 3, (len(yk), 2), generator=gk)
        for dy in range(-2, 3):  # shift in 25 groups instead of per sample
            for dx in range(-2, 3):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                xk[sel] = torch.roll(xk[sel], shifts=(dy, dx), dims=(2, 3))
        xk += torch.randn(xk.shape, generator=gk)
        pixels = ((xk + 6) / 12).clamp_(0, 1).mul_(255).round_()
        x[start:start + chunk] = pixels.to(torch.uint8)
        unit = pixels.double() / 255
        total[0] += unit.sum(dim=(0, 2, 3))
        total[1] += unit.pow(2).sum(dim=(0, 2, 3))
    n = num_samples * h * w
    mean = total[0] / n
    std = ((total[1] / n - mean ** 2) * n / (n - 1)).sqrt()
    return x, y, mean.float().view(1, c, 1, 1), std.float().view(1, c, 1, 1)


# scikit-image's sample photographs that ship inside its wheel (no download), colour then grey.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "logo", "camera", "brick", "grass", "gravel", "moon", "page",
          "text", "coins", "cell", "clock", "microaneurysms")


def load_photos(size: int = 32, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The 20 sample photographs of scikit-image as uint8 RGB (N, 3, size, size): centre square
    crop, Lanczos resize; grey photos repeated over three channels, transparency composited on
    white. A small real CIFAR-shaped set to attack; labels are arbitrary (index mod classes)."""
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)())
        if img.mode == "RGBA":
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img)
        img = img.convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(img.resize((size, size), Image.LANCZOS)).transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(out))
    return x, torch.arange(len(PHOTOS)) % num_classes
