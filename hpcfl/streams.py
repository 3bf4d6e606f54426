"""Every random stream of a run, in one place (docs/ARCHITECTURE.md, "Invariants").

A stream's key is (seed, tag, *ids): its draws depend on the run's seed and the ids named below
(a round, a client, a local phase), never on the rank or the number of ranks, so every rank
computes the same partition, cohort, batch order and noise. The number of ids is part of what
a stream is: PUBLIC and AUGMENT share tag 105 with keys of different lengths, which makes them
distinct streams (kept, so that results stay what they were).
"""
from __future__ import annotations

from enum import Enum

import numpy as np
import torch


class Stream(Enum):
    """(tag, the ids that follow the seed and the tag in its key)."""
    DEFENSE = 7, "round, client"
    PARTITION = 101, "none; noniid_s: split (0 train, 1 test), class"
    SPLIT = 102, "client (its train/test split)"
    BATCH_ORDER = 103, "round, client, phase"
    COHORT = 104, "round"
    PUBLIC = 105, "none (the public split)"
    AUGMENT = 105, "round, client, phase (crop/flip draws)"
    DP_NOISE = 106, "round, client, phase"
    EVALUATED = 107, "none (the clients train.eval_clients evaluates)"
    SAMPLED = 108, "client (its images, data.partition=sampled)"

    def __init__(self, tag: int, ids: str):
        self.tag, self.ids = tag, ids


def seed_of(seed: int, stream: Stream, *ids: int) -> int:
    """One 32-bit seed for the key (seed, tag, *ids)."""
    return int(np.random.SeedSequence([seed, stream.tag, *ids]).generate_state(1)[0])


def numpy_stream(seed: int, stream: Stream, *ids: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in
                                                         (seed, stream.tag, *ids)]))


def torch_stream(seed: int, stream: Stream, *ids: int,
                 device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed_of(seed, stream, *ids))
