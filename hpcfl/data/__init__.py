"""Datasets by name, partitioned into clients whose data lives as tensors on the device."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..config import DataConfig
from . import builtin
from .partition import partition, split_train_test

# name -> (channels, height, width)
SHAPES = {"digits": (1, 8, 8), "synthetic-cifar10": (3, 32, 32), "synthetic-mnist": (1, 28, 28)}


@dataclass
class ClientData:
    """One client's samples, already on the device."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass
class FederatedData:
    name: str
    shape: tuple[int, int, int]
    num_classes: int
    num_train: list[int]            # every client's training-set size (aggregation weight)
    num_test: list[int]
    clients: dict[int, ClientData]  # the data of the clients this process hosts


def load_pool(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples of a dataset as (x float32 NCHW, normalized per channel; y int64)."""
    if cfg.name == "digits":
        x, y = builtin.load_digits()
    elif cfg.name.startswith("synthetic-"):
        x, y = builtin.make_synthetic(SHAPES[cfg.name], cfg.synthetic_samples)
    else:
        raise ValueError(f"unknown dataset {cfg.name!r}")
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / std, y


def load_federated(cfg: DataConfig, seed: int, device: torch.device | str = "cpu",
                   hosted: Callable[[list[int]], Iterable[int]] | None = None) -> FederatedData:
    """Partition the dataset into cfg.num_clients clients and move to the device the data of the
    clients that `hosted(train sizes)` names (default: all); the others live on other ranks."""
    x, y = load_pool(cfg)
    parts = partition(y.numpy(), cfg.partition, cfg.num_clients, seed,
                      classes_per_client=cfg.classes_per_client, alpha=cfg.dirichlet_alpha)
    splits = split_train_test(parts, cfg.test_fraction, seed)
    num_train = [len(tr) for tr, _ in splits]
    wanted = range(cfg.num_clients) if hosted is None else hosted(num_train)
    clients = {}
    for cid in wanted:
        tr, te = (torch.from_numpy(s) for s in splits[cid])
        clients[cid] = ClientData(x[tr].to(device), y[tr].to(device),
                                  x[te].to(device), y[te].to(device))
    return FederatedData(cfg.name, SHAPES[cfg.name], int(y.max()) + 1,
                         num_train, [len(te) for _, te in splits], clients)
