"""HyperFL (Guo et al., "A New Federated Learning Framework Against Gradient Inversion Attacks",
AAAI 2025, https://arxiv.org/abs/2412.07187; official code github.com/Pengxin-Guo/HyperFL, cnn/).

Client i keeps a private embedding v_i and a private classifier head; the shared hypernetwork
h(.; phi) generates its feature extractor theta_i = h(v_i; phi). Per round a client
  1. trains only its head for `head_epochs` epoch(s) (SGD, lr = head_lr),
  2. trains its copy of phi together with v_i for `local_epochs` epochs (SGD, lr = train.lr,
     gradient norms of phi and of v_i clipped to grad_clip separately), theta_i regenerated from
     h(v_i; phi) at every step (phi's heads in factored form: algorithms.factored; no client
     holds a copy of them),
and uploads only the change of phi; the server averages it weighted by training-set size.
v_i, the head and theta_i never leave the client.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import RunConfig
from ..models import HyperNetwork, build_model
from .base import Algorithm, Heads, Params, Phase, clone, rest_of

HYPER, EXTRACTOR = "hypernet.", "extractor."
HEADS = HYPER + "heads."


@dataclass(frozen=True)
class Layout:
    """Which shared tensors generate which extractor tensor: target -> (its head's weight, its
    bias or None), each target's shape, and the trunk's (weight, bias), fed the client's
    embedding."""
    heads: dict[str, tuple[str, str | None]]
    shapes: dict[str, torch.Size]
    trunk: tuple[str, str]
    embedding: str = "embedding"

    @property
    def biased(self) -> bool:
        return all(b is not None for _, b in self.heads.values())

    def factored(self) -> Heads:
        """The heads as the phase trains them, in factored form (Phase.factored)."""
        return Heads(tuple((t, tuple(s)) for t, s in self.shapes.items()),
                     tuple(w for w, _ in self.heads.values()),
                     tuple(b for _, b in self.heads.values()) if self.biased else ())


class HyperFL(Algorithm):
    name = "hyperfl"

    def __init__(self, cfg: RunConfig, shape, num_classes: int, num_train=()):
        a, t = cfg.algorithm, cfg.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model, generated = self.build(cfg, shape, num_classes)
            params = dict(model.named_parameters())
            hypernet = HyperNetwork({k: params[k].shape for k in generated}, a.embed_dim,
                                    a.hidden_dim, bias=a.hypernet_bias)
            # Every client starts from the same embedding (nn.Embedding init, N(0, 1)) and the
            # same head, as the official code deep-copies one model for all clients.
            embedding = torch.randn(a.embed_dim)
        self.generated = frozenset(generated)
        self.initial_shared = {HYPER + k: v.detach().clone()
                               for k, v in hypernet.named_parameters()}
        self.initial_private = {"embedding": embedding,
                                **clone({k: v for k, v in params.items() if k.startswith("head.")})}
        # What is neither generated nor private (a frozen backbone) is read by every client.
        self.constants = rest_of(model, {*self.generated, *self.initial_private})
        self.model, self.hypernet = model.to("meta"), hypernet.to("meta")
        head = tuple(k for k in self.initial_private if k.startswith("head."))
        self._phases = [
            Phase(param_groups=(head,), lr=a.head_lr, momentum=t.momentum,
                  weight_decay=t.weight_decay, epochs=a.head_epochs),
            Phase(param_groups=(tuple(self.initial_shared), ("embedding",)), lr=t.lr,
                  momentum=t.momentum, weight_decay=t.weight_decay, epochs=t.local_epochs,
                  steps=t.local_steps, grad_clip=a.grad_clip,
                  factored=self.layout().factored()),
        ]
        if a.head_epochs == 0:
            self._phases.pop(0)

    def build(self, cfg: RunConfig, shape, num_classes: int) -> tuple[torch.nn.Module, list[str]]:
        """The client model (seeded by the caller) and the names of its parameters that the
        hypernetwork generates: the paper's CNN and its feature extractor."""
        model = build_model(cfg.model.name, shape, num_classes)
        return model, [k for k, _ in model.named_parameters() if k.startswith(EXTRACTOR)]

    def layout(self) -> Layout:
        """Which hypernetwork tensors generate which extractor tensor (the adaptive attack's
        map of the upload): theta_k = W_k h + b_k, h = relu(trunk(v))."""
        heads = {}
        for target in self.hypernet.shapes:
            head = f"{HEADS}{target.replace('.', '_')}."
            bias = head + "bias"
            heads[target] = (head + "weight", bias if bias in self.initial_shared else None)
        return Layout(heads, dict(self.hypernet.shapes), (HYPER + "trunk.weight",
                                                          HYPER + "trunk.bias"))

    def init_shared(self) -> Params:
        return clone(self.initial_shared)

    def init_client(self, cid: int) -> Params:
        return clone(self.initial_private)

    def extractor_weights(self, params: Params) -> Params:
        """theta = h(v; phi): the client's generated feature-extractor weights."""
        phi = {k[len(HYPER):]: v for k, v in params.items() if k.startswith(HYPER)}
        return functional_call(self.hypernet, phi, (params["embedding"],))

    def rank_one_input(self, params: Params) -> torch.Tensor:
        """h = relu(trunk(v)): the one input of every head of the hypernetwork, whose weight
        gradients are therefore rank one (see hpcfl.sgd)."""
        return torch.relu(F.linear(params["embedding"], params[HYPER + "trunk.weight"],
                                   params[HYPER + "trunk.bias"]))

    def precompute(self, phase: Phase):
        """The head phase trains neither phi nor v: theta = h(v; phi) is generated once for it
        (the same numbers as at every step, without the heads' 13.7M-entry products)."""
        if set(phase.names) & {*self.initial_shared, "embedding"}:
            return None
        return self.generate_extractor

    def generate_extractor(self, frozen: Params) -> Params:
        rest = {k: v for k, v in frozen.items() if not k.startswith(HYPER) and k != "embedding"}
        return {**rest, **self.extractor_weights(frozen)}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        weights = ({k: v for k, v in params.items() if k in self.generated}
                   or self.extractor_weights(params))  # given: see precompute
        head = {k: v for k, v in params.items() if k.startswith("head.")}
        return functional_call(self.model, {**self.constants, **weights, **head}, (x,))

    def phases(self) -> list[Phase]:
        return self._phases
