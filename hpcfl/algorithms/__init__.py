"""Federated methods by name (docs/ARCHITECTURE.md, "Plugging in"); each one file, none touching
MPI, files or devices."""
from __future__ import annotations

from ..config import RunConfig
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


def build_algorithm(cfg: RunConfig, shape, num_classes: int, num_train=()) -> Algorithm:
    """The method of cfg.algorithm.name for data of `shape` and `num_classes`; `num_train` (every
    client's training-set size) calibrates the DP baselines' noise."""
    return ALGORITHMS[cfg.algorithm.name](cfg, shape, num_classes, num_train)


__all__ = ["DPSGD", "Algorithm", "Params", "Phase", "build_algorithm", "ALGORITHMS"]
