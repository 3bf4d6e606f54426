"""FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629): every client trains the global
model with local SGD; the server replaces it by the sample-weighted mean of the clients' models."""
from __future__ import annotations

import torch
from torch.func import functional_call

from ..config import RunConfig
from ..models import build_model
from .base import Algorithm, Params, Phase, clone


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, cfg: RunConfig, shape, num_classes: int, num_train=()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg.model.name, shape, num_classes)
        self.initial = clone(dict(model.named_parameters()))
        self.model = model.to("meta")  # only its structure is used, through functional_call
        t = cfg.train
        self._phases = [Phase(groups=(tuple(self.initial),), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, epochs=t.local_epochs,
                              steps=t.local_steps)]

    def init_shared(self) -> Params:
        return clone(self.initial)

    def init_client(self, cid: int) -> Params:
        return {}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (x,))

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The representation the head classifies (Soteria's defended layer's input)."""
        inner = {k.removeprefix("extractor."): v for k, v in params.items()
                 if k.startswith("extractor.")}
        return functional_call(self.model.extractor, inner, (x,))

    def phases(self) -> list[Phase]:
        return self._phases
