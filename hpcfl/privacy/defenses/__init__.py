"""Defenses against gradient inversion, by name (docs/ARCHITECTURE.md, "Defenses"): each is one
object in one file of this package, behind the interface of .base.Defense; `register` adds one.

References (shared/research/privacy.md §6): breaching's and GIFD's DP-style noise (DP-G, DP-L),
top-k compression, Soteria (CVPR 2021), GradDefense's random slices (INFOCOM 2022),
GradientHide (ICLR 2026 submission).
"""
from __future__ import annotations

from ...config import ConfigError, PrivacyConfig
from .base import Defense, Setup
from .gradienthide import GradientHide
from .noise import DPGaussian, DPLaplace
from .random_slice import RandomSlice
from .soteria import Soteria
from .topk import TopK

DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Make privacy.defense=<cls.name> build `cls` (usable as a class decorator)."""
    DEFENSES[cls.name] = cls
    return cls


for _cls in (DPGaussian, DPLaplace, TopK, Soteria, RandomSlice, GradientHide):
    register(_cls)


def build_defense(cfg: PrivacyConfig, seed: int) -> Defense | None:
    """The defense privacy.defense names (None for none); ConfigError for an unknown name."""
    if cfg.defense == "none":
        return None
    if cfg.defense not in DEFENSES:
        raise ConfigError(f"privacy.defense: {cfg.defense!r} is not one of none, "
                          f"{', '.join(DEFENSES)}")
    return DEFENSES[cfg.defense](cfg, seed)


__all__ = ["DEFENSES", "Defense", "Setup", "build_defense", "register"]
