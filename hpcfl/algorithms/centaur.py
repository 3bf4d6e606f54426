"""CENTAUR (Shen et al., "Share your representation only", https://arxiv.org/abs/2206.05592) as
the HyperFL paper's baseline (official code cnn/methods/centaur.py, LocalUpdate_DPFedRep): the
feature extractor is shared, the head private. Per round a client first trains its head alone
for one epoch without privacy (SGD lr = algorithm.head_lr), then the extractor with DP-SGD
(head frozen) for local_epochs epochs, and uploads only the extractor's change."""
from __future__ import annotations

from ..config import RunConfig
from .base import DPSGD, Params, Phase
from .dp import Budget
from .fedavg import FedAvg


class SharedExtractor(FedAvg):
    """FedAvg's model with the extractor shared and the head private to each client (every
    client's head starts from the same init, as the official code deep-copies one model)."""

    def __init__(self, cfg: RunConfig, shape, num_classes: int, num_train=()):
        super().__init__(cfg, shape, num_classes)
        self.cfg = cfg
        self.extractor = tuple(k for k in self.initial if k.startswith("extractor."))
        self.head = tuple(k for k in self.initial if k.startswith("head."))
        self.budget = Budget(cfg, num_train)
        self.dp = DPSGD(self.extractor, cfg.privacy.sample_clip, self.budget.noise_multiplier)

    def init_shared(self) -> Params:
        return {k: self.initial[k].clone() for k in self.extractor}

    def init_client(self, cid: int) -> Params:
        return {k: self.initial[k].clone() for k in self.head}


class Centaur(SharedExtractor):
    name = "centaur"

    def phases(self) -> list[Phase]:
        a, t = self.cfg.algorithm, self.cfg.train
        body = Phase(param_groups=(self.extractor,), lr=t.lr, momentum=t.momentum,
                     weight_decay=t.weight_decay, epochs=t.local_epochs, steps=t.local_steps,
                     dp=self.dp)
        if not a.head_epochs:
            return [body]
        return [Phase(param_groups=(self.head,), lr=a.head_lr, momentum=t.momentum,
                      weight_decay=t.weight_decay, epochs=a.head_epochs), body]
