"""What every federated method is made of, as data the engine can run.

A method says what state it has (shared by all clients, or private to one), how a model is
evaluated from that state, which local training phases a client runs, what it uploads and what
the server does with the sum of uploads. It never sees ranks, files or devices: the engine runs
its phases, the round sums its uploads with one Allreduce.
"""
from __future__ import annotations

import math
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
class Heads:
    """Linear layers that all read one vector h per client (Algorithm.rank_one_input) and
    whose outputs, end to end, are tensors of the model: a hypernetwork's heads. `targets`:
    each generated tensor's name and shape, in order; `weights`, `biases` (() without biases):
    each target's layer in the shared state. A phase trains them in factored form
    (hpcfl.algorithms.factored): no client holds a copy of them."""
    targets: tuple[tuple[str, tuple[int, ...]], ...]
    weights: tuple[str, ...]
    biases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.weights, *self.biases)

    @property
    def biased(self) -> bool:
        return bool(self.biases)

    def sizes(self) -> list[int]:
        return [math.prod(s) for _, s in self.targets]

    def base(self, shared: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_0 (all outputs, hidden) and b_0 (None without biases): the layers stacked. W_0 is
        stored column-major (a transposed view of a contiguous (hidden, outputs) matrix): its
        products with one h and one g per step, a dot product per long row, run 2.4x faster
        on a CPU than with W_0 row-major (MKL's gemv; docs/performance.md)."""
        return (torch.cat([shared[w].detach().T for w in self.weights], dim=1).T,
                torch.cat([shared[b].detach() for b in self.biases]) if self.biases else None)

    def split(self, flat: torch.Tensor) -> Params:
        """The generated tensors, named and shaped, from their values end to end (the last
        dim; views)."""
        lead = flat.shape[:-1]
        return {name: part.view(*lead, *shape) for (name, shape), part in
                zip(self.targets, flat.split(self.sizes(), dim=-1))}

    def layers(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Params:
        """Stacked (outputs, hidden) and (outputs,) tensors cut back into the layers' names."""
        out = dict(zip(self.weights, weight.split(self.sizes())))
        if bias is not None:
            out.update(zip(self.biases, bias.split(self.sizes())))
        return out


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
    # Linear layers fed one vector per client, trained in factored form (Heads): all in one
    # parameter group, at one learning rate
    factored: Heads | None = None

    def __post_init__(self):
        if self.dp and self.factored:
            raise ValueError("a phase with DP-SGD needs every gradient per sample: not factored")
        if self.factored:
            group = [g for g in self.param_groups if self.factored.names[0] in g]
            lrs = {lr for n, lr in zip(self.names, self.lrs) if n in self.factored.names}
            if len(group) != 1 or not set(self.factored.names) <= set(group[0]) or len(lrs) > 1:
                raise ValueError("factored layers: one parameter group, one learning rate")

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
        """The one input vector of the phases' factored layers (Phase.factored: each weight's
        gradient is rank one), from a client's state."""
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
