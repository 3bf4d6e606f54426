"""The privacy budget of the DP-SGD baselines (dpfedavg, ppsgd, centaur): the noise multiplier
that reaches a target (epsilon, delta) after the whole run, and the epsilon spent so far, both
from opacus's RDP accountant, which the official code calls (get_noise_multiplier).

The official code calibrates with sample_rate = batch / local training size and
epochs = rounds x local epochs. Here the step count is the one the run really takes (equal to the
official one when the batch size divides the training size) and the sample rate is that of the
smallest client (with the official split all clients are equal): no client spends more than the
target. As in the official code (and most DP-SGD code), batches are shuffled epochs, while the
accountant assumes Poisson sampling; and a client is charged for every round, sampled or not.
"""
from __future__ import annotations

import math

from ..config import ConfigError, RunConfig

ACCOUNTANT = "rdp"  # opacus's default, used by the official code


class Budget:
    """DP-SGD's schedule of one run: sample rate, steps per round, noise multiplier."""

    def __init__(self, cfg: RunConfig, num_train):
        if len(num_train) == 0:
            raise ValueError("the DP baselines need the clients' training-set sizes")
        t, p = cfg.train, cfg.privacy
        n = min(num_train)
        self.sample_rate = min(1.0, t.batch_size / n)
        self.steps_per_round = t.local_steps or t.local_epochs * math.ceil(n / t.batch_size)
        self.delta = p.dp_delta
        from opacus.accountants.utils import get_noise_multiplier  # slow import: only here

        try:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=p.dp_epsilon, target_delta=p.dp_delta,
                sample_rate=self.sample_rate, steps=t.rounds * self.steps_per_round,
                accountant=ACCOUNTANT)
        except ValueError as e:  # opacus: "The privacy budget is too low."
            raise ConfigError(f"privacy.dp_epsilon={p.dp_epsilon}: {e}") from None

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
