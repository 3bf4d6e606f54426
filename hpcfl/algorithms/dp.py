"""The privacy budget of the DP-SGD baselines (dpfedavg, ppsgd, centaur): the noise multiplier
that reaches a target (epsilon, delta) after the whole run, and the epsilon spent so far, both
from opacus's RDP accountant, which the official code calls (get_noise_multiplier).

The official code calibrates with sample_rate = batch / local training size and
epochs = rounds x local epochs (with the official split all clients are equal). Here every
client's own schedule counts: its sample rate and the steps it really takes (equal to the
official ones when the batch size divides the training size), and the noise is the largest any
distinct (rate, steps) needs, so that no client spends more than the target. (The smallest
client alone is not enough: with batch 50, a client of 51 images takes two steps an epoch at
almost the rate of one of 50, and would spend epsilon 5.8 of a target of 4.) As in the
official code (and most DP-SGD code), batches are shuffled epochs, while the accountant assumes
Poisson sampling; and a client is charged for every round, sampled or not.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ConfigError, RunConfig

ACCOUNTANT = "rdp"  # opacus's default, used by the official code


def schedules(num_train, t) -> list[tuple[float, int]]:
    """The distinct (sample rate, steps per round) of the clients' local DP-SGD; of the clients
    taking the same number of steps only the smallest (the highest rate) counts."""
    worst: dict[int, float] = {}
    for n in np.unique(np.asarray(num_train)):  # ascending: the first of a step count is smallest
        steps = t.local_steps or t.local_epochs * math.ceil(int(n) / t.batch_size)
        worst.setdefault(steps, min(1.0, t.batch_size / int(n)))
    return sorted((q, s) for s, q in worst.items())


class Budget:
    """DP-SGD's schedule of one run: sample rate, steps per round, noise multiplier."""

    def __init__(self, cfg: RunConfig, num_train):
        if len(num_train) == 0:
            raise ValueError("the DP baselines need the clients' training-set sizes")
        t, p = cfg.train, cfg.privacy
        self.delta = p.dp_delta
        from opacus.accountants.utils import get_noise_multiplier  # slow import: only here

        def noise(rate_steps: tuple[float, int]) -> float:
            return get_noise_multiplier(target_epsilon=p.dp_epsilon, target_delta=p.dp_delta,
                                        sample_rate=rate_steps[0],
                                        steps=t.rounds * rate_steps[1], accountant=ACCOUNTANT)

        try:
            needed = {pair: noise(pair) for pair in schedules(num_train, t)}
        except ValueError as e:  # opacus: "The privacy budget is too low."
            raise ConfigError(f"privacy.dp_epsilon={p.dp_epsilon}: {e}") from None
        # the client schedule that needs the most noise: it spends exactly the target
        (self.sample_rate, self.steps_per_round), self.noise_multiplier = max(
            needed.items(), key=lambda kv: kv[1])

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after `rounds` rounds of local DP-SGD."""
        if rounds == 0:
            return 0.0
        from opacus.accountants import create_accountant

        acc = create_accountant(ACCOUNTANT)
        acc.history = [(self.noise_multiplier, self.sample_rate, rounds * self.steps_per_round)]
        return float(acc.get_epsilon(delta=self.delta))

    def attrs(self) -> dict:
        return dict(dp_noise_multiplier=self.noise_multiplier, dp_sample_rate=self.sample_rate,
                    dp_steps_per_round=self.steps_per_round, dp_accountant=ACCOUNTANT)
