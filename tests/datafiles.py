"""Tiny datasets written in the real on-disk formats of their distributions, laid out as
torchvision's `root` (the official code's data/): idx files (gzipped or plain), CIFAR-10's python
pickles, CINIC-10's PNG folders. Every class gets a brightness pattern of its own, so a model can
learn them."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 images whose mean brightness and one bright row depend on the label."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 60, size=(len(labels), *shape)).astype(np.int64)
    num_classes = int(labels.max()) + 1
    x += (labels * (150 // num_classes)).reshape(-1, *[1] * len(shape))
    rows = shape[-2] if len(shape) == 3 else shape[0]
    for i, y in enumerate(labels):
        row = y % rows
        if len(shape) == 3:
            x[i, :, row] = 255
        else:
            x[i, row] = 255
    return x.clip(0, 255).astype(np.uint8)


def balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def write_idx(path: Path, a: np.ndarray, gz: bool) -> Path:
    raw = b"\0\0\x08" + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist_like(root: Path, name: str, per_class=(12, 6), gz: bool = True) -> dict:
    """MNIST/FashionMNIST (`MNIST/raw/train-images-idx3-ubyte` ...) or EMNIST byclass
    (`EMNIST/raw/emnist-byclass-train-images-idx3-ubyte` ...)."""
    folder = {"mnist": "MNIST", "fmnist": "FashionMNIST", "emnist": "EMNIST"}[name]
    num_classes = 62 if name == "emnist" else 10
    out = {}
    for i, split in enumerate(("train", "test")):
        y = balanced_labels(num_classes, per_class[i], seed=i).astype(np.uint8)
        x = images(y, (28, 28), seed=10 + i)
        pre = f"emnist-byclass-{split}-" if name == "emnist" else \
            {"train": "train-", "test": "t10k-"}[split]
        raw = root / folder / "raw"
        write_idx(raw / f"{pre}images-idx3-ubyte", x, gz)
        write_idx(raw / f"{pre}labels-idx1-ubyte", y, gz)
        out[split] = (x[:, None], y.astype(np.int64))
    return out


def write_cifar10(root: Path, per_batch: int = 20, test: int = 30) -> dict:
    """`cifar-10-batches-py/`: five data batches, a test batch and batches.meta, each a pickled
    dict (data: (N, 3072) uint8 rows, R then G then B planes; labels: a list). The real files
    are Python 2 pickles whose strings load as str with encoding="latin1"; these are protocol-2
    pickles with str keys, which load the same way."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for i, (name, n) in enumerate([*[(f"data_batch_{k}", per_batch) for k in range(1, 6)],
                                   ("test_batch", test)]):
        y = np.random.default_rng(i).integers(0, 10, n)
        y[:10] = np.arange(10)  # every class in every batch
        x = images(y, (3, 32, 32), seed=20 + i)
        batch = {"batch_label": f"batch {i}", "labels": y.tolist(),
                 "data": x.reshape(n, 3072), "filenames": [f"img_{j}.png" for j in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        xs[split].append(x), ys[split].append(y)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": per_batch, "num_vis": 3072,
                     "label_names": CIFAR_CLASSES}, f, protocol=2)
    return {s: (np.concatenate(xs[s]), np.concatenate(ys[s])) for s in xs}


def write_cinic10(root: Path, per_class=(4, 3, 2)) -> dict:
    """`CINIC-10/{train,valid,test}/<class>/*.png`, 32x32 RGB PNGs (valid/ is never read)."""
    from PIL import Image

    out = {}
    for i, split in enumerate(("train", "valid", "test")):
        y = np.repeat(np.arange(10), per_class[i])
        x = images(y, (3, 32, 32), seed=30 + i)
        for j, (img, label) in enumerate(zip(x, y)):
            d = root / "CINIC-10" / split / CIFAR_CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            # names sort in writing order within a class, as ImageFolder reads them
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"n{j:05d}.png")
        out[split] = (x, y)
    return out


def write_dataset(root: Path, name: str) -> dict:
    if name == "cifar10":
        return write_cifar10(root)
    if name == "cinic10":
        return write_cinic10(root)
    return write_mnist_like(root, name, gz=name != "fmnist")  # fmnist: plain idx files
