"""FedAvg (McMahan et al. 2017, https://arxiv.org/abs/1602.05629): every client trains the global
model with local SGD; the server replaces it by the sample-weighted mean of the clients' models."""
from __future__ import annotations

import torch
from torch.func import functional_call

from ..config import LPM_MODELS, RunConfig
from ..models import build_model
from ..models.lpm import build_lpm
from .base import Algorithm, Params, Phase, clone, rest_of


class FedAvg(Algorithm):
    """On a frozen pretrained backbone (model.name vit_adapter, resnet18_adapter): the linear
    probe (only the head trains), or with `adapters` the adapters and the head (the official
    FedAvg-Adapter); the backbone is constant."""
    name = "fedavg"
    adapters = False

    def __init__(self, cfg: RunConfig, shape, num_classes: int, num_train=()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model, trained = self.build(cfg, shape, num_classes)
        params = dict(model.named_parameters())
        self.initial = clone({k: params[k] for k in trained})
        if cfg.algorithm.fedavg_init == "hyperfl":
            self.initial.update(hyperfl_weights(cfg, shape, num_classes, self.initial))
        self.constants = rest_of(model, self.initial)
        self.model = model.to("meta")  # only its structure is used, through functional_call
        t = cfg.train
        self._phases = [Phase(param_groups=(tuple(self.initial),), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, epochs=t.local_epochs,
                              steps=t.local_steps)]

    def build(self, cfg: RunConfig, shape, num_classes: int) -> tuple[torch.nn.Module, list[str]]:
        """The model (seeded by the caller) and the names of the parameters that train."""
        if cfg.model.name in LPM_MODELS:
            model = build_lpm(cfg.model.name, num_classes, cfg.model.backbone,
                              cfg.model.pretrained, adapters=self.adapters)
            roles = model.names()
            return model, roles["adapters"] + roles["head"]
        model = build_model(cfg.model.name, shape, num_classes)
        return model, [k for k, _ in model.named_parameters()]

    def init_shared(self) -> Params:
        return clone(self.initial)

    def init_client(self, cid: int) -> Params:
        return {}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.constants, **params}, (x,))

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The representation the head classifies (Soteria's defended layer's input)."""
        inner = {k.removeprefix("extractor."): v for k, v in params.items()
                 if k.startswith("extractor.")}
        return functional_call(self.model.extractor, inner, (x,))

    def phases(self) -> list[Phase]:
        return self._phases


def hyperfl_weights(cfg: RunConfig, shape, num_classes: int, names) -> Params:
    """The weights HyperFL starts a client with, for those of `names` it has: the extractor its
    hypernetwork generates from the common initial embedding, and its head (FedAvg on them is
    the weight-scale control: HyperFL's generated weights are far larger than a default init)."""
    from dataclasses import replace

    from .hyperfl import HyperFL
    hyper = HyperFL(replace(cfg, algorithm=replace(cfg.algorithm, name="hyperfl")), shape,
                    num_classes)
    state = {**hyper.init_shared(), **hyper.init_client(0)}
    weights = {**hyper.extractor_weights(state), **state}
    return {k: weights[k].detach().clone() for k in names if k in weights}


class FedAvgAdapter(FedAvg):
    """The official FedAvg-Adapter: adapters and head of a frozen backbone, averaged."""
    name = "fedavg_adapter"
    adapters = True
