"""The attacked client's round as the simulation knows it (it knows everything the client does):
the images its upload depends on, its state when the uploaded phase starts, the upload itself,
and how much of the upload each image is.

The targets are the images of the attacked phase's batches: the last phase, the one that moves
the uploaded tensors (FedAvg's only phase; HyperFL's hypernetwork phase after its head epoch).
The server knows the batch size and the number of steps, so it knows how many images that is;
it does not know the client's shuffling, and simulates the steps on consecutive slices of its
candidate batch (`Knowledge.batches`). The targets are kept in the order the client first used
them, so that, for up to one epoch, the true images in that order reproduce the upload.

Earlier phases (HyperFL's and CENTAUR's head epochs) train on every image of the client: when
the targets are all of them, the attack simulates those phases too; otherwise it starts at the
attacked phase, whose starting private state is what white-box knows and what the server
threat guesses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from .algorithms import Params, Phase
from .data import ClientData
from .data.transforms import model_inputs
from .engine import ClientUpload, RoundSpec, train_client
from .engine.client import phase_batches

FLOAT32_EPS = 2.0 ** -24  # half an ulp of 1.0: what rounding leaves of a float32 update


@dataclass
class Target:
    """One attacked client: its round (the run's RoundSpec of attack.round), id, data and the
    dataset's number of classes."""
    spec: RoundSpec
    client: int
    data: ClientData
    num_classes: int


@dataclass
class Round:
    """What the simulation knows of the attacked client's round.

    upload: what the server received (after the run's defense); before: the client's whole
    state (shared and private) at the round's start; last: at the start of the attacked phase;
    index: the targets' indices in the client's training set; x, y: the targets as the model saw
    them (normalized, cropped and flipped as their first step did); share: each target's part
    of its step's gradient (its gradient's norm over the sum of the batch's norms); invisible: a
    target whose contribution to the update is below float32 resolution of the weights it
    moves (the update cannot carry it); covered: the targets are all the client's images."""
    upload: Params
    before: Params
    last: Params
    index: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    share: np.ndarray
    invisible: np.ndarray
    covered: bool

    @property
    def empty(self) -> bool:
        """No target is visible in the upload: nothing to invert."""
        return bool(self.invisible.all())


class FirstPhases:
    """An algorithm with only its first `n` phases (to train a client up to a phase with the
    engine's own code)."""

    def __init__(self, algo, n: int):
        self._algo, self._n = algo, n

    def __getattr__(self, name):
        return getattr(self._algo, name)

    def phases(self) -> list[Phase]:
        return self._algo.phases()[:self._n]


def target_count(phase: Phase, num_train: int, batch_size: int) -> int:
    """How many images a phase's batches hold (what the server can tell from the recipe)."""
    steps = phase.steps or phase.epochs * math.ceil(num_train / batch_size)
    return min(num_train, steps * batch_size)


def first_use(batches: torch.Tensor, sizes: list[int], steps: int) -> np.ndarray:
    """Positions in `batches` (the steps' indices end to end) of each image's first use within
    the first `steps` steps, in that order."""
    order = batches[:sum(sizes[:steps])].cpu().numpy()
    _, first = np.unique(order, return_index=True)
    return np.sort(first)


def simulate(algo, state: tuple[Params, Params], target: Target, defense=None) -> Round:
    """Train the target client in its round as the run does (the engine's own code) and read off
    what the attack is scored against. `state`: shared and private state at the round's start."""
    shared, private = state
    spec, cid, data = target.spec, target.client, target.data
    before = {**shared, **private}
    clip = defense.per_sample(spec.round, [cid], data.y_train.device) if defense else None
    trained, _ = train_client(algo, dict(before), data, spec, cid, clip)
    upload = algo.upload(shared, trained)
    if defense is not None:
        upload = defense.upload(upload, ClientUpload(cid, spec.round, data, before, trained))
    phases = list(algo.phases())
    k = len(phases) - 1
    sizes, batches, draws = phase_batches(data, spec, phases[k], cid, k, data.y_train.device)
    pos = first_use(batches, sizes, len(sizes))
    index = batches[torch.as_tensor(pos, device=batches.device)]
    x = model_inputs(data, data.x_train[index],
                     draws[torch.as_tensor(pos, device=draws.device)] if draws is not None
                     else None)
    y = data.y_train[index]
    # the state the attacked phase starts from (after the earlier phases, as the engine trains)
    last = (train_client(FirstPhases(algo, k), dict(before), data, spec, cid, clip)[0]
            if k else before)
    share, invisible = visibility(algo, last, phases[k], x, y, spec.batch_size)
    return Round(upload, before, dict(last), index.cpu().numpy(), x, y, share, invisible,
                 len(index) == data.num_train)


def visibility(algo, state: Params, phase: Phase, x: torch.Tensor, y: torch.Tensor,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each target's share of its step's gradient and whether its contribution to the upload is
    below float32 resolution, at the state the phase starts from (exact for its first step;
    later steps' states differ by what the phase has trained). HyperFL: the gradient of the
    generated extractor, times |(h, 1)| for the hypernetwork heads it reaches (theta_k = W_k h +
    b_k), against those heads' norm; the trunk's and the embedding's parts are left out."""
    lr = dict(zip(phase.names, phase.lrs))
    if hasattr(algo, "layout"):  # a hypernetwork: per-sample gradients of the extractor
        layout = algo.layout()
        theta = {k: v.detach() for k, v in algo.extractor_weights(state).items()}
        fixed = {k: v.detach() for k, v in state.items() if k not in theta}
        h = algo.rank_one_input(state).detach()
        reach = math.sqrt(float(h.pow(2).sum()) + float(layout.biased))
        moved = [state[n] for w, b in layout.heads.values() for n in (w, b) if n]
        rate = lr[layout.trunk[0]]
    else:
        theta = {k: state[k].detach() for k in phase.names}
        fixed = {k: v.detach() for k, v in state.items() if k not in theta}
        reach, moved, rate = 1.0, list(theta.values()), phase.lrs[0]

    def loss(params, xi, yi):
        return F.cross_entropy(algo.forward({**fixed, **params}, xi[None]), yi[None])

    share, contribution = np.zeros(len(y)), np.zeros(len(y))
    for lo in range(0, len(y), batch_size):
        xb, yb = x[lo:lo + batch_size].detach(), y[lo:lo + batch_size]
        g = vmap(grad(loss), in_dims=(None, 0, 0))(theta, xb, yb)
        norms = torch.sqrt(sum(t.flatten(1).double().pow(2).sum(1) for t in g.values()))
        mean = torch.sqrt(sum(t.double().mean(0).pow(2).sum() for t in g.values()))
        clip = (min(1.0, phase.grad_clip / (float(mean) * reach + 1e-6))
                if phase.grad_clip > 0 else 1.0)
        total = float(norms.sum())
        share[lo:lo + len(yb)] = (norms / total).cpu().numpy() if total > 0 else 0.0
        contribution[lo:lo + len(yb)] = (rate * clip * reach * norms / len(yb)).cpu().numpy()
    resolution = FLOAT32_EPS * math.sqrt(sum(float(t.double().pow(2).sum()) for t in moved))
    return share, contribution <= resolution
