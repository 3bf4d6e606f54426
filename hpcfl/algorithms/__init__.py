"""Federated methods by name (DESIGN §7); each one file, none touching MPI, files or devices."""
from __future__ import annotations

from ..config import RunConfig
from .base import Algorithm, Params, Phase
from .fedavg import FedAvg
from .hyperfl import HyperFL
from .local import Local

ALGORITHMS = {cls.name: cls for cls in (FedAvg, Local, HyperFL)}


def build_algorithm(cfg: RunConfig, shape, num_classes: int) -> Algorithm:
    return ALGORITHMS[cfg.algorithm.name](cfg, shape, num_classes)


__all__ = ["Algorithm", "Params", "Phase", "build_algorithm", "ALGORITHMS"]
