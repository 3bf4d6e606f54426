"""Federated methods by name (docs/ARCHITECTURE.md, "Plugging in"); each one file, none touching
MPI, files or devices."""
from __future__ import annotations

from ..config import RunConfig, is_plugin, load_class
from .base import DPSGD, Algorithm, Params, Phase
from .centaur import Centaur
from .dpfedavg import DPFedAvg
from .fedavg import FedAvg, FedAvgAdapter
from .hyperfl import HyperFL
from .hyperfl_lpm import HyperFLLPM
from .local import Local, LocalAdapter
from .ppsgd import PPSGD

ALGORITHMS = {cls.name: cls for cls in (FedAvg, Local, HyperFL, HyperFLLPM, FedAvgAdapter,
                                        LocalAdapter, DPFedAvg, PPSGD, Centaur)}


def algorithm_class(name: str) -> type[Algorithm]:
    """The class algorithm.name names: a built-in (ALGORITHMS), or a user's own subclass of
    Algorithm as module:Class (ConfigError, one line, if it is not one)."""
    if is_plugin(name):
        return load_class("algorithm.name", name, Algorithm)
    return ALGORITHMS[name]


def build_algorithm(cfg: RunConfig, shape, num_classes: int, num_train=()) -> Algorithm:
    """The method of cfg.algorithm.name for data of `shape` and `num_classes`; `num_train` (every
    client's training-set size) calibrates the DP baselines' noise."""
    return algorithm_class(cfg.algorithm.name)(cfg, shape, num_classes, num_train)


__all__ = ["DPSGD", "Algorithm", "Params", "Phase", "algorithm_class", "build_algorithm",
           "ALGORITHMS"]
