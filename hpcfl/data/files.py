"""The paper's datasets as prepared HDF5 files (`python -m hpcfl.data.prepare`), and the facts of
the official code about each: normalization, augmentation and the rules of its non-IID split.

A prepared file `<data.root>/<name>.h5` holds
    /train/images, /test/images   uint8 (N, C, H, W), the official train/test split
    /train/labels, /test/labels   int64 (N,)
    attrs: format = "hpcfl-dataset", format_version, name, classes (class names),
           sources (JSON: source file -> sha256), command, created, hpcfl_version
Images stay uint8 on the device (CINIC-10's 270,000 images would be 3.3 GB as float32) and are
normalized per batch with the official mean and std (engine.model_inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..config import ConfigError

FORMAT, FORMAT_VERSION = "hpcfl-dataset", 1
READ_BLOCK = 8192  # images per read


@dataclass(frozen=True)
class NoniidRules:
    """How the official loader (FedPAC's data_loader.py, `*_noniid_s`) builds each client's
    split: `iid_percent` of its images spread evenly over all classes, the rest over the label
    group `class_groups[client % len(class_groups)]`, taken class by class with a cursor per
    class that
    starts at `cursor` and wraps to the class start when a request would overflow it."""
    class_groups: tuple[tuple[int, ...], ...]
    test_size: int         # test images per client; 0 = the same as local_size
    train_cursor: int = 0
    test_cursor: int = 0
    # emnist_noniid_s advances the cursor of a group's last class by the per-class share, not by
    # the (larger) number it took.
    advance_by_share: bool = False


TEN_CLASS_GROUPS = ((0, 1, 2), (2, 3, 4), (4, 5, 6), (6, 7, 8), (8, 9, 0))
MNIST_RULES = NoniidRules(TEN_CLASS_GROUPS, test_size=0)                  # mnist_noniid_s
CIFAR_RULES = NoniidRules(TEN_CLASS_GROUPS, test_size=300, train_cursor=2000,
                          test_cursor=500)                                # cifar_noniid_s
EMNIST_RULES = NoniidRules((tuple(range(10)), tuple(range(10, 36)), tuple(range(36, 62))),
                           test_size=600, advance_by_share=True)          # emnist_noniid_s


@dataclass(frozen=True)
class FileDataset:
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]   # the official transforms.Normalize
    std: tuple[float, ...]
    augment: bool             # the official training transform has RandomCrop(32, 4) + flip
    local_size: int           # official training images per client
    rules: NoniidRules


MNIST_NORM = dict(mean=(0.1307,), std=(0.3081,))  # the official code uses it for all three
FILE_DATASETS = {
    "mnist": FileDataset((1, 28, 28), 10, **MNIST_NORM, augment=False, local_size=600,
                         rules=MNIST_RULES),
    "fmnist": FileDataset((1, 28, 28), 10, **MNIST_NORM, augment=False, local_size=600,
                          rules=MNIST_RULES),
    "emnist": FileDataset((1, 28, 28), 62, **MNIST_NORM, augment=False, local_size=1000,
                          rules=EMNIST_RULES),
    "cifar10": FileDataset((3, 32, 32), 10, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2023, 0.1994, 0.2010), augment=True, local_size=600,
                           rules=CIFAR_RULES),
    "cinic10": FileDataset((3, 32, 32), 10, mean=(0.47889522, 0.47227842, 0.43047404),
                           std=(0.24205776, 0.23828046, 0.25874835), augment=True,
                           local_size=600, rules=CIFAR_RULES),
}


class PreparedFile:
    """An open prepared dataset file: labels in memory, images read on demand."""

    def __init__(self, name: str, root: str):
        self.name, self.path = name, Path(root) / f"{name}.h5"
        hint = (f"run: python -m hpcfl.data.prepare {name} --source DIR --out {self.path} "
                "(docs/data.md)")
        if not self.path.is_file():
            raise ConfigError(f"data.name={name}: {self.path} not found; {hint}")
        try:
            self.f = h5py.File(self.path, "r", locking=False)
            spec = FILE_DATASETS[name]
            if self.f.attrs.get("format") != FORMAT or self.f.attrs.get("name") != name:
                raise ValueError(f"not a prepared {name} file")
            self.labels = {}
            for split in ("train", "test"):
                images, labels = self.f[f"{split}/images"], self.f[f"{split}/labels"][:]
                if images.dtype != np.uint8 or images.shape[1:] != spec.shape or \
                        len(images) != len(labels) or len(labels) == 0:
                    raise ValueError(f"/{split} has images {images.shape} {images.dtype} and "
                                     f"{len(labels)} labels")
                if labels.min() < 0 or labels.max() >= spec.num_classes:
                    raise ValueError(f"/{split} labels outside 0..{spec.num_classes - 1}")
                self.labels[split] = labels.astype(np.int64)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"data.name={name}: {self.path} is damaged or not a prepared "
                              f"dataset ({e}); {hint}") from None
        self.spec = spec

    def images(self, split: str, idx: np.ndarray) -> np.ndarray:
        """Images `idx` (any order, repeats allowed) of a split, reading only those rows."""
        wanted, where = np.unique(idx, return_inverse=True)
        ds = self.f[f"{split}/images"]
        out = np.empty((len(wanted), *ds.shape[1:]), dtype=np.uint8)
        try:  # block by block: sequential reads, bounded memory, blocks nobody needs skipped
            for start in range(0, len(ds), READ_BLOCK):
                lo, hi = np.searchsorted(wanted, [start, start + READ_BLOCK])
                if hi > lo:
                    out[lo:hi] = ds[start:start + READ_BLOCK][wanted[lo:hi] - start]
        except OSError as e:
            raise ConfigError(f"data.name={self.name}: {self.path} is damaged ({e}); prepare "
                              "it again") from None
        return out[where]
