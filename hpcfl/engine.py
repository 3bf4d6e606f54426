"""Trains a cohort of clients and evaluates clients, for any Algorithm.

Sequential path: one client after another, each a plain loop of functional SGD steps
(torch.func.grad on the algorithm's forward), with its data already on the device. Every random
choice (batch order) comes from (seed, round, client, phase), never from the rank or from which
clients trained before, so results do not depend on how clients are spread over ranks.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad_and_value

from .algorithms import Algorithm, Params, Phase
from .data import ClientData

BATCH_ORDER = 103  # stream tag, see data.partition.rng
# The round's buffer ends with: loss sum, client count, stop votes (set by the caller), weights.
EXTRA_SLOTS, STOP_SLOT = 4, -2
# float64: the sum must not depend on how clients are spread over ranks (see README, MPI).
ROUND_DTYPE = torch.float64


def client_generator(seed: int, rnd: int, cid: int, phase: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, BATCH_ORDER, rnd, cid, phase]).generate_state(1)
    return torch.Generator().manual_seed(int(state[0]))


def minibatches(n: int, batch_size: int, phase: Phase,
                gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches: reshuffled every epoch, last batch of an epoch possibly smaller (as a
    DataLoader with shuffle=True); `phase.steps` batches if set, else `phase.epochs` epochs."""
    steps = phase.steps or phase.epochs * math.ceil(n / batch_size)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]
            done += 1
            if done == steps:
                return


def clip_(grads: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ on one group of gradients, in place."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def sgd_(params: list[torch.Tensor], grads: list[torch.Tensor],
         momentum_buf: list[torch.Tensor], phase: Phase) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov), in place on params and grads; an
    empty `momentum_buf` is filled from the first gradient, as torch does."""
    if phase.weight_decay:
        torch._foreach_add_(grads, params, alpha=phase.weight_decay)
    if phase.momentum:
        if not momentum_buf:
            momentum_buf.extend(torch._foreach_mul(grads, 1.0))
        else:
            torch._foreach_mul_(momentum_buf, phase.momentum)
            torch._foreach_add_(momentum_buf, grads)
        grads = momentum_buf
    torch._foreach_add_(params, grads, alpha=-phase.lr)


def train_client(algo: Algorithm, params: Params, data: ClientData, batch_size: int,
                 seed: int, rnd: int, cid: int) -> tuple[Params, float]:
    """Run every phase of local training; returns the trained state and the mean minibatch loss
    of the last phase."""
    def loss_fn(trainable, frozen, x, y):
        return F.cross_entropy(algo.forward({**frozen, **trainable}, x), y)

    step = grad_and_value(loss_fn)
    params = dict(params)
    losses: list[torch.Tensor] = []
    for k, phase in enumerate(algo.phases()):
        # Copies, updated in place below; the caller's tensors (the shared state) stay intact.
        trainable = {n: params[n].detach().clone() for n in phase.names}
        frozen = {n: v for n, v in params.items() if n not in trainable}
        momentum: list[torch.Tensor] = []
        losses = []
        gen = client_generator(seed, rnd, cid, k)
        for idx in minibatches(data.num_train, batch_size, phase, gen):
            idx = idx.to(data.y_train.device)
            grads, loss = step(trainable, frozen, data.x_train[idx], data.y_train[idx])
            if phase.clip_norm > 0:
                for group in phase.groups:
                    clip_([grads[n] for n in group], phase.clip_norm)
            sgd_(list(trainable.values()), [grads[n] for n in trainable], momentum, phase)
            losses.append(loss.detach())
        params.update(trainable)
    return params, torch.stack(losses).mean().item()


def flatten(params: Params, names) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in names]) if names else torch.zeros(0)


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    """Views into `flat` shaped like `like` (same order)."""
    out, i = {}, 0
    for n, v in like.items():
        out[n] = flat[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def train_cohort(algo: Algorithm, shared: Params, private: dict[int, Params],
                 data: dict[int, ClientData], cohort: list[int], weights: list[float],
                 batch_size: int, seed: int, rnd: int, device: torch.device) -> torch.Tensor:
    """Train `cohort` (clients hosted here) from `shared`; update their private state in place.

    Returns ONE flat float64 buffer, ready for the round's Allreduce:
    [sum of weight * upload | sum of training losses | number of clients | 0 | sum of weights].
    """
    numel = sum(v.numel() for v in shared.values())
    buf = torch.zeros(numel + EXTRA_SLOTS, dtype=ROUND_DTYPE, device=device)
    for cid, w in zip(cohort, weights):
        trained, loss = train_client(algo, {**shared, **private[cid]}, data[cid],
                                            batch_size, seed, rnd, cid)
        private[cid] = {n: trained[n].detach() for n in private[cid]}
        up = algo.upload(shared, trained)
        buf[:numel].add_(flatten(up, shared.keys()).detach(), alpha=w)
        buf[-EXTRA_SLOTS:] += torch.tensor([loss, 1.0, 0.0, w], device=device)
    return buf


@torch.no_grad()
def evaluate_client(algo: Algorithm, params: Params, x: torch.Tensor, y: torch.Tensor,
                    batch: int = 4096) -> tuple[int, float]:
    """(number correct, summed cross-entropy) of the client's model on (x, y)."""
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = algo.forward(params, x[i:i + batch])
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
    return correct, loss
