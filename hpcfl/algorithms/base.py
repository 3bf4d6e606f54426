"""What every federated method is made of, as data the engine can run.

A method says what state it has (shared by all clients, or private to one), how a model is
evaluated from that state, which local training phases a client runs, what it uploads and what
the server does with the sum of uploads. It never sees ranks, files or devices: the engine runs
its phases, the round sums its uploads with one Allreduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) on some of a phase's tensors,
    as the official HyperFL baselines do it: each sample's gradient of `names` is clipped to
    L2 norm `clip` (jointly over `names`, as clip_grad_norm_), the clipped gradients are summed,
    N(0, (noise_multiplier * clip)^2) noise is added to every coordinate, and the sum is divided
    by the batch size. The phase's other tensors get the plain (non-private) batch gradient."""
    names: tuple[str, ...]
    clip: float
    noise_multiplier: float


@dataclass(frozen=True)
class Phase:
    """One stage of a client's local training: which tensors move, and the SGD that moves them.

    Each parameter group is gradient-norm clipped separately (grad_clip > 0), as the official
    code calls clip_grad_norm_ once per parameter group. SGD follows torch.optim.SGD: weight
    decay added to the clipped gradient, momentum buffer started from the first gradient, a
    fresh optimizer (zero momentum) every round.
    """
    param_groups: tuple[tuple[str, ...], ...]
    lr: float
    momentum: float
    weight_decay: float
    epochs: int = 1
    steps: int = 0          # > 0: this many minibatch steps instead of epochs
    grad_clip: float = 0.0  # clip_grad_norm_'s max norm per parameter group; 0: no clipping
    param_group_lrs: tuple[float, ...] = ()  # one learning rate per group; () = lr for every group
    dp: DPSGD | None = None
    # (weight, bias) of Linear layers applied to the one vector Algorithm.rank_one_input gives
    # per client: the weight's gradient is rank one, trained without forming it (hpcfl.sgd)
    rank_one: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.dp and self.rank_one:
            raise ValueError("a phase with DP-SGD needs every gradient per sample: no rank_one")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for g in self.param_groups for n in g)

    @property
    def lrs(self) -> list[float]:
        """The learning rate of every tensor, in `names` order."""
        per_group = self.param_group_lrs or (self.lr,) * len(self.param_groups)
        return [lr for g, lr in zip(self.param_groups, per_group) for _ in g]


class Algorithm:
    """Base of every method: shared state averaged by sample count, private state per client."""

    name = "base"
    budget = None  # the DP baselines' algorithms.dp.Budget
    # Tensors every client reads and none trains (a frozen backbone): the run puts them on its
    # device once per rank; they are in no upload, round buffer or checkpoint.
    constants: Params = {}

    def init_shared(self) -> Params:
        """The initial shared state (identical on every rank: built from the run's seed)."""
        raise NotImplementedError

    def init_client(self, cid: int) -> Params:
        """The initial private state of client `cid`."""
        raise NotImplementedError

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits of the model that `params` (shared + one client's private state) describe."""
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def rank_one_input(self, params: Params) -> torch.Tensor:
        """The input vector of the phases' rank_one layers (see Phase), from a client's state."""
        raise NotImplementedError

    def precompute(self, phase: Phase):
        """A function of the tensors that `phase` does not train, returning what the forward
        needs of them (the same keys, or fewer tensors that stand for them), computed once
        before the phase's steps rather than at every step; None: nothing to precompute."""
        return None

    def upload(self, shared: Params, trained: Params) -> Params:
        """What a client sends to the server: the change of the shared state."""
        return {k: trained[k] - v for k, v in shared.items()}

    def epsilon(self, rounds: int) -> float | None:
        """The DP epsilon a client has spent after `rounds` rounds; None without DP."""
        return None if self.budget is None else self.budget.epsilon(rounds)

    def attrs(self) -> dict:
        """Facts of the method to record in the results file (e.g. the DP noise multiplier)."""
        return {} if self.budget is None else self.budget.attrs()

    def server_step(self, shared: Params, upload_sum: Params, weight: float) -> None:
        """Apply the sample-weighted mean of the cohort's uploads (FedAvg aggregation)."""
        for k, v in shared.items():
            v.add_(upload_sum[k], alpha=1.0 / weight)


def rest_of(model: torch.nn.Module, taken) -> Params:
    """The model's parameters and buffers not in `taken`: what no client trains (a frozen
    backbone, BatchNorm statistics), the Algorithm's constants."""
    return {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]
            if k not in taken}


def clone(params: Params) -> Params:
    return {k: v.detach().clone() for k, v in params.items()}
