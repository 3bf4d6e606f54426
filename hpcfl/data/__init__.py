"""Datasets by name, partitioned into clients: each split of the dataset one pool of images on
the device (uint8 where the source is), each client's samples indices into the pools
(hpcfl.data.index), its images gathered only for the round it trains or is evaluated in."""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from ..memory import available_memory, refuse_unless_fits
from . import builtin
from .files import FILE_DATASETS, PreparedFile
from .index import ClientIndex, SampledIndex, SplitIndex
from .partition import hold_out, noniid_s, partition, split_train_test

# name -> (channels, height, width)
SHAPES = {"digits": (1, 8, 8), "synthetic-cifar10": (3, 32, 32), "synthetic-mnist": (1, 28, 28),
          "photos": (3, 32, 32),
          **{name: spec.shape for name, spec in FILE_DATASETS.items()}}


@dataclass
class ClientData:
    """One client's samples, on the device: pixels (uint8, or floats in [0, 1]) normalized per
    batch with `mean` and `std` (data.transforms.model_inputs)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor | None = None  # (1, C, 1, 1)
    std: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass
class Pool:
    """One split's images on the device (uint8 where the source is) and labels."""
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class FederatedData:
    """The run's data: the pools, every client's indices into them, and how batches are made."""
    name: str
    shape: tuple[int, int, int]
    num_classes: int
    index: ClientIndex
    train_pool: Pool
    test_pool: Pool
    mean: torch.Tensor
    std: torch.Tensor
    augment: bool = False  # random crop + flip of training batches

    @property
    def num_train(self) -> np.ndarray:
        """Every client's training-set size (its aggregation weight)."""
        return self.index.num_train

    @property
    def num_test(self) -> np.ndarray:
        return self.index.num_test

    def client(self, cid: int) -> ClientData:
        """Client `cid`'s samples, gathered from the pools."""
        tr, te = (torch.from_numpy(i).to(self.train_pool.y.device)
                  for i in (self.index.train(cid), self.index.test(cid)))
        return ClientData(self.train_pool.x[tr], self.train_pool.y[tr], self.test_pool.x[te],
                          self.test_pool.y[te], self.mean, self.std)

    @property
    def clients(self) -> "Clients":
        """Every client's samples by id, gathered when asked for."""
        return Clients(self)


class Clients(Mapping):
    """FederatedData.client as a read-only mapping from client id."""

    def __init__(self, data: FederatedData):
        self.data = data

    def __getitem__(self, cid: int) -> ClientData:
        if not 0 <= cid < len(self):
            raise KeyError(cid)
        return self.data.client(cid)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self)))

    def __len__(self) -> int:
        return len(self.data.num_train)


def load_pool(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """All samples of a built-in dataset as (x NCHW, y int64, mean, std): pixels (digits:
    floats in [0, 1]; photos and the synthetic images: uint8) with their per-channel mean and
    std, to be normalized per batch (data.transforms.model_inputs) and undone by an attack's
    metrics."""
    if cfg.name.startswith("synthetic-"):
        return builtin.make_synthetic(SHAPES[cfg.name], cfg.synthetic_samples)
    if cfg.name == "digits":
        x, y = builtin.load_digits()
        pixels = x
    elif cfg.name == "photos":
        x, y = builtin.load_photos()
        pixels = x.float() / 255
    else:
        raise ValueError(f"unknown built-in dataset {cfg.name!r}")
    return (x, y, pixels.mean(dim=(0, 2, 3), keepdim=True),
            pixels.std(dim=(0, 2, 3), keepdim=True))


class Source:
    """A dataset's labels per split and a reader of its images by split and indices, with the
    mean/std that normalize them."""

    def __init__(self, cfg: DataConfig, device: torch.device | str = "cpu"):
        self.file = None
        if cfg.name in FILE_DATASETS:
            self.file = PreparedFile(cfg.name, cfg.root)
            self.labels, self.num_classes = self.file.labels, self.file.spec.num_classes
            self.read = self.file.images
            self.whole = lambda split: self.read(split, np.arange(len(self.labels[split])))
            self.mean, self.std = (torch.tensor(v, device=device).view(1, -1, 1, 1)
                                   for v in (self.file.spec.mean, self.file.spec.std))
        else:
            x, y, mean, std = load_pool(cfg)
            self.labels, self.num_classes = {"train": y.numpy()}, int(y.max()) + 1
            self.mean, self.std = mean.to(device), std.to(device)
            self.read = lambda _, idx: x.numpy()[idx]
            self.whole = lambda _: x.numpy()  # the pool itself: no copy (2M images: 1.6 GB)

    def close(self) -> None:
        if self.file is not None:
            self.file.f.close()


def load_public(cfg: DataConfig, seed: int, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                           torch.Tensor | None, int]:
    """The public split (data.public_fraction of the train split, held out from every client):
    (pixels, labels, mean, std, number of classes)."""
    if cfg.public_fraction <= 0:
        raise ConfigError("data.public_fraction is 0: this dataset has no public split; set "
                          "e.g. data.public_fraction=0.2 (and the same in the attacked run)")
    source = Source(cfg, device)
    public, _ = hold_out(len(source.labels["train"]), cfg.public_fraction, seed)
    x = torch.from_numpy(source.read("train", public)).to(device)
    y = torch.from_numpy(source.labels["train"][public]).to(device)
    source.close()
    return x, y, source.mean, source.std, source.num_classes


def class_names(cfg: DataConfig) -> list[str] | None:
    """The names of the dataset's classes (a prepared file's `classes`, the digits' "0".."9"),
    or None where the labels name nothing (synthetic images, photos labelled by index)."""
    if cfg.name == "digits":
        return [str(c) for c in range(10)]
    if cfg.name in FILE_DATASETS:
        source = Source(cfg)
        names = json.loads(source.file.f.attrs.get("classes", "[]"))  # as prepare writes it
        source.close()
        return [str(c) for c in names] if len(names) == source.num_classes else None
    return None


def augment_on(cfg: DataConfig) -> bool:
    """data.augment=auto: the official training transform of the dataset."""
    if cfg.augment == "auto":
        return cfg.name in FILE_DATASETS and FILE_DATASETS[cfg.name].augment
    return cfg.augment == "true"


def client_splits(cfg: DataConfig, seed: int, labels: dict[str, np.ndarray], num_classes: int
                  ) -> tuple[str, str, list[tuple[np.ndarray, np.ndarray]]]:
    """Which splits the clients' train and test parts come from, and every client's (train
    indices, test indices). `labels` has a "train" split and, for the file datasets, the
    official "test" split. With data.public_fraction the clients share what is left of the
    train split after the public part is held out."""
    if cfg.public_fraction > 0:
        _, private = hold_out(len(labels["train"]), cfg.public_fraction, seed)
        train, test, splits = client_splits(replace(cfg, public_fraction=0.0), seed,
                                            {**labels, "train": labels["train"][private]},
                                            num_classes)
        if train == test:
            return train, test, [(private[tr], private[te]) for tr, te in splits]
        return train, test, [(private[tr], te) for tr, te in splits]
    if cfg.partition == "noniid_s":
        if "test" not in labels:
            raise ConfigError(f"data.partition=noniid_s needs a dataset with an official test "
                              f"split ({', '.join(FILE_DATASETS)}); {cfg.name} has none")
        spec = FILE_DATASETS[cfg.name]
        rules, size = spec.rules, cfg.local_size or spec.local_size

        def split(name: str, n: int, which: int) -> list[np.ndarray]:
            return noniid_s(labels[name], num_classes, cfg.num_clients, n, cfg.noniid_s, rules,
                            which, seed)
        return "train", "test", list(zip(split("train", size, 0),
                                         split("test", rules.test_size or size, 1)))
    # Other partitions spread the training split; each client's test part comes from its share.
    parts = partition(labels["train"], cfg.partition, cfg.num_clients, seed,
                      classes_per_client=cfg.classes_per_client, alpha=cfg.dirichlet_alpha)
    return "train", "train", split_train_test(parts, cfg.test_fraction, seed)


def client_index(cfg: DataConfig, seed: int, labels: dict[str, np.ndarray],
                 num_classes: int) -> tuple[str, str, ClientIndex]:
    """Which splits the clients' train and test parts come from, and every client's indices."""
    if cfg.partition == "sampled":
        allowed = (hold_out(len(labels["train"]), cfg.public_fraction, seed)[1]
                   if cfg.public_fraction > 0 else None)
        index = SampledIndex(cfg, seed, labels, allowed, num_classes)
        return "train", ("test" if "test" in labels else "train"), index
    train_split, test_split, splits = client_splits(cfg, seed, labels, num_classes)
    if min(min(len(tr), len(te)) for tr, te in splits) == 0:
        raise ConfigError("data: some client got no training or no test samples; use fewer "
                          "clients or a larger data.local_size")
    return train_split, test_split, SplitIndex(splits)


def check_memory(cfg: DataConfig) -> None:
    """Refuse, before anything is made, data whose size the config alone sets and which cannot
    fit in memory: a synthetic pool (uint8 pixels, int64 labels) and, with partition=sampled,
    every client's two int64 sizes. The other partitions give every client two samples at
    least (partition.partition checks it), so the pool bounds them; a prepared file holds what
    was prepared. Each rank holds the data, and this checks one rank's copy."""
    need, what, keys = 0, [], []
    if cfg.name.startswith("synthetic-"):
        need += cfg.synthetic_samples * (math.prod(SHAPES[cfg.name]) + 8)
        what.append(f"data.synthetic_samples={cfg.synthetic_samples:,} images")
        keys.append("data.synthetic_samples")
    if cfg.partition == "sampled":
        need += 16 * cfg.num_clients
        what.append(f"the sizes of data.num_clients={cfg.num_clients:,} clients")
        keys.append("data.num_clients")
    if need:
        refuse_unless_fits(need, available_memory(), " and ".join(what),
                           f"lower {' or '.join(keys)}")


def load_federated(cfg: DataConfig, seed: int,
                   device: torch.device | str = "cpu") -> FederatedData:
    """Partition the dataset into cfg.num_clients clients, its splits as pools on the device."""
    check_memory(cfg)
    source = Source(cfg, device)
    train_split, test_split, index = client_index(cfg, seed, source.labels, source.num_classes)

    def pool(split: str) -> Pool:
        return Pool(torch.from_numpy(source.whole(split)).to(device),
                    torch.from_numpy(source.labels[split]).to(device))

    train = pool(train_split)
    test = train if test_split == train_split else pool(test_split)
    source.close()
    return FederatedData(cfg.name, SHAPES[cfg.name], source.num_classes, index, train, test,
                         source.mean, source.std, augment_on(cfg))
