"""DP-FedAvg as the HyperFL paper's baseline (official code cnn/methods/dp_fedavg.py): FedAvg
whose clients train the whole model with DP-SGD (per-sample clip C, Gaussian noise calibrated to
a target epsilon; see algorithms.dp), and the server averages their models."""
from __future__ import annotations

from ..config import RunConfig
from .base import DPSGD, Phase
from .dp import Budget
from .fedavg import FedAvg


class DPFedAvg(FedAvg):
    name = "dpfedavg"

    def __init__(self, cfg: RunConfig, shape, num_classes: int, num_train=()):
        super().__init__(cfg, shape, num_classes)
        self.budget = Budget(cfg, num_train)
        t, names = cfg.train, tuple(self.initial)
        self._phases = [Phase(param_groups=(names,), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, epochs=t.local_epochs,
                              steps=t.local_steps,
                              dp=DPSGD(names, cfg.privacy.sample_clip,
                                       self.budget.noise_multiplier))]
