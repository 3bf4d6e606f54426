"""What a defense is (docs/ARCHITECTURE.md, "Defenses"): one object with the hooks the round
calls, each given only what it uses.

    check(data, algo)            before any work: refuse, with one line (ConfigError), what the
                                 defense cannot take
    prepare(setup) -> state      once per run, on rank 0 (e.g. slices, labels of public images);
                                 the loop broadcasts the state (picklable) to every rank
    install(state, setup)        on every rank, with rank 0's state
    per_sample(rnd, cids, dev)   a transform of per-sample gradients at every local step of
                                 those clients (None: none; training then needs no per-sample
                                 gradients)
    upload(upload, client)       the client's upload as the server receives it
    server(upload_sum, weights)  the server's side, in place on the round's reduced sum
    attrs()                      facts for the results file

Randomness comes from the defense's stream, keyed by (seed, round, client): every rank count
gives the same numbers. A defense sees its own client's upload, state and data, never a rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...algorithms import Algorithm, Params
from ...config import DataConfig, PrivacyConfig
from ...engine import DefenseHooks
from ...streams import Stream, torch_stream


@dataclass
class Setup:
    """What a defense may use to prepare itself once per run: the run's algorithm (model,
    shared and private state), its data section (the public split), model name, seed, number
    of classes and this rank's device."""
    algo: Algorithm
    data: DataConfig
    model: str
    seed: int
    num_classes: int
    device: torch.device


class Defense(DefenseHooks):
    """Does nothing: a defense overrides the hooks it needs (see the module docstring)."""

    name = ""
    # Uploaded tensors it hides; attack.mute_defended_layer leaves them out of the matching.
    defended: tuple[str, ...] = ()

    def __init__(self, cfg: PrivacyConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.state: Any = None
        self.algo: Algorithm | None = None

    def check(self, data: DataConfig, algo: Algorithm) -> None:
        """Raise ConfigError (one line) for a run this defense cannot take."""

    def prepare(self, setup: Setup) -> Any:
        """Computed once per run on rank 0; picklable (numpy arrays, numbers)."""
        return None

    def install(self, state: Any, setup: Setup) -> None:
        """On every rank: rank 0's `prepare` result."""
        self.state, self.algo = state, setup.algo

    def attrs(self) -> dict:
        return {}

    def server(self, upload_sum: torch.Tensor, weights: list[float]) -> None:
        """In place on the round's sum of weighted uploads (flat), `weights` the cohort's."""

    def stream(self, rnd: int, cid: int, device) -> torch.Generator:
        """The defense's random stream of client `cid` in round `rnd`."""
        return torch_stream(self.seed, Stream.DEFENSE, rnd, cid, device=device)


def device_of(upload: Params) -> torch.device:
    return next(iter(upload.values())).device
