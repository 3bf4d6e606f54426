"""A user's own attack (attack.name=module:Class, docs/extending.md): a subclass of Attack that
python -m hpcfl.attack builds once per run and asks for each attacked client's reconstruction."""
from __future__ import annotations

from ...config import AttackConfig, load_class
from .common import Problem, Reconstruction


class Attack:
    """Reconstructs a client's images from its upload. `reconstruct` gets the `Problem` (what
    the server knows: the model, the state the client started from, its training recipe; what
    it observed: the upload; how many images and classes; the labels where known) and returns
    a `Reconstruction` (images normalized like the model's inputs, their labels, the final
    loss). `self.cfg` is the attack section (iterations, lr, ...), `self.seed` the run's."""

    def __init__(self, cfg: AttackConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def reconstruct(self, problem: Problem, bar=None) -> Reconstruction:
        """The reconstruction; `bar` (hpcfl.progress), if given, counts attack.iterations."""
        raise NotImplementedError


def attack_class(name: str) -> type[Attack]:
    """The user's class attack.name=module:Class names (ConfigError, one line, if it is not an
    Attack)."""
    return load_class("attack.name", name, Attack)
