"""Defenses against gradient inversion, by name (docs/ARCHITECTURE.md, "Plugging in"): each is
one object in one file of this package, behind the interface of .base.Defense; `register` adds
one in-process, and privacy.defense=module:Class names a user's own from any command.

References: breaching's (JonasGeiping/breaching) and GIFD's DP-style noise (DP-G, DP-L), top-k
compression (Zhu et al., Deep Leakage from Gradients, NeurIPS 2019), Soteria (Sun et al., CVPR
2021), GradDefense's random slices (Wang et al., INFOCOM 2022), GradientHide (ICLR 2026
submission).
"""
from __future__ import annotations

from ...config import ConfigError, PrivacyConfig, is_plugin, load_class
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


def defense_class(name: str) -> type[Defense] | None:
    """The class privacy.defense names (None for none): a registered one (DEFENSES), or a user's
    own subclass of Defense as module:Class; ConfigError (one line) for anything else."""
    if name == "none":
        return None
    if is_plugin(name):
        return load_class("privacy.defense", name, Defense)
    if name not in DEFENSES:
        raise ConfigError(f"privacy.defense: {name!r} is not one of none, "
                          f"{', '.join(DEFENSES)} or module:Class")
    return DEFENSES[name]


def build_defense(cfg: PrivacyConfig, seed: int) -> Defense | None:
    """The defense privacy.defense names (None for none); ConfigError for an unknown name."""
    cls = defense_class(cfg.defense)
    return None if cls is None else cls(cfg, seed)


__all__ = ["DEFENSES", "Defense", "Setup", "build_defense", "defense_class", "register"]
