"""The vectorized path: clients trained together, their parameters stacked along a client axis,
one torch.func.vmap(grad) per step. Clients train for different numbers of steps and their last
batch of an epoch is smaller, exactly as in the sequential path (engine.client): every client's
batch schedule is padded to the stack's longest, padded samples carry zero weight in the loss,
and a client whose schedule has ended takes zero-size steps. So the two paths compute the same
updates (tested to agree within float32 rounding)."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from ..algorithms import DPSGD, Algorithm, Params, Phase
from ..data import ClientData
from ..data.transforms import crop_flip_draws, model_inputs
from ..sgd import THETA, PhaseSGD, Record
from ..streams import Stream, torch_stream
from .compiled import local_step
from .round import RoundSpec
from .client import (SampleTransform, Trained, dp_noise, minibatches, model_params, num_steps,
                     per_sample_phase, per_sample_step, privatize)


def schedules(data: dict[int, ClientData] | list[ClientData], cids: list[int], spec: RoundSpec,
              phase: Phase, k: int, device) -> tuple[torch.Tensor, ...]:
    """The sequential path's batches of phase k of every client, padded to a common shape:
    index (clients, steps, batch), sample weight (same, 0 for padding), active (clients, steps),
    and with spec.augment the crop/flip draws (clients, steps, batch, 3) in the sequential path's
    order (else None). `data`: by client id, or the clients of `cids` in their order."""
    seed, rnd, batch_size = spec.seed, spec.round, spec.batch_size
    sizes = [d.num_train for d in (data if isinstance(data, list) else (data[c] for c in cids))]
    lists = [list(minibatches(n, batch_size, phase,
                              torch_stream(seed, Stream.BATCH_ORDER, rnd, c, k)))
             for n, c in zip(sizes, cids)]
    steps = max(len(b) for b in lists)
    idx = torch.zeros(len(cids), steps, batch_size, dtype=torch.long)
    weight = torch.zeros(len(cids), steps, batch_size)
    active = torch.zeros(len(cids), steps)
    draws = (torch.zeros(len(cids), steps, batch_size, 3, dtype=torch.long) if spec.augment
             else None)
    for i, (c, batches) in enumerate(zip(cids, lists)):
        active[i, :len(batches)] = 1
        aug = torch_stream(seed, Stream.AUGMENT, rnd, c, k) if spec.augment else None
        for s, b in enumerate(batches):
            idx[i, s, :len(b)], weight[i, s, :len(b)] = b, 1
            if aug is not None:
                draws[i, s, :len(b)] = crop_flip_draws(aug, len(b))
    return (idx.to(device), weight.to(device), active.to(device),
            draws.to(device) if draws is not None else None)


def stack_noise(dp: DPSGD, stacked: Params, gens: list[torch.Generator],
                active: list[float]) -> Params:
    """One step's DP noise of a stack, each client's drawn from its own generator in the
    sequential path's order (a client whose schedule has ended draws nothing). `active`: this
    step's column of the schedule, on the host (reading it from the device would wait)."""
    one = {n: stacked[n][0] for n in dp.names}
    draws = [dp_noise(dp, one, g) if a else {n: torch.zeros_like(v) for n, v in one.items()}
             for g, a in zip(gens, active)]
    return {n: torch.stack([d[n] for d in draws]) for n in dp.names}


def run_stack(algo: Algorithm, shared: Params, private: dict[int, Params],
              data: dict[int, ClientData], cids: list[int], spec: RoundSpec,
              clip: SampleTransform | None = None, bases: dict | None = None) -> Trained:
    """Train clients `cids` together in round spec.round: their trained state stacked along
    dim 0 (every tensor that training changed, the factored layers aside: see Trained), each
    client's last-phase mean loss, the factored phase's record. `bases` as for run_client.
    No step reads a number back from the device (tests/test_host_syncs)."""
    clients = [data[c] for c in cids]  # gathered once (data may gather a client when asked)
    x = torch.cat([c.x_train for c in clients])
    y = torch.cat([c.y_train for c in clients])
    # only the stack's copy of the images stays: the clients' own and their test images go
    # before training (53 MiB of a 20-client CIFAR-10 stack, whose peak is ~1 GB)
    clients = [replace(c, x_train=x[:0], x_test=x[:0]) for c in clients]
    offsets = torch.tensor([0] + [c.num_train for c in clients[:-1]],
                           device=y.device).cumsum(0)
    stacked = {n: torch.stack([private[c][n] for c in cids]) for n in private[cids[0]]}

    def weighted(heads):
        model = model_params(algo, heads)

        def loss_fn(trainable, frozen, factors, x, y, w):
            ce = F.cross_entropy(algo.forward(model(trainable, frozen, factors), x), y,
                                 reduction="none")
            # The mean over the batch's real samples (a finished client's padded step has none).
            return (ce * w).sum() / w.sum().clamp(min=1)
        return loss_fn

    record = None
    for k, phase in enumerate(algo.phases()):
        per_sample = per_sample_phase(phase, clip)
        phase = per_sample or phase
        heads = phase.factored
        idx, weight, active, draws = schedules(clients, cids, spec, phase, k, y.device)
        # the schedule's columns on the host, for the DP noise of each step (read back once)
        active_rows = active.T.tolist() if phase.dp else None
        # A shared tensor gets one copy per client once it is trained; until then all clients
        # read the same one (vmap in_dims None). The factored layers get none: the record
        # stands for them.
        trainable = {n: (stacked[n] if n in stacked else
                         shared[n].expand(len(cids), *shared[n].shape)).clone()
                     for n in phase.names if heads is None or n not in heads.names}
        frozen = {n: v for n, v in {**shared, **stacked}.items() if n not in trainable}
        frozen_dims = {n: 0 if n in stacked else None for n in frozen}
        if (pre := algo.precompute(phase)) is not None:
            frozen = vmap(pre, in_dims=(frozen_dims,))(frozen)
            frozen_dims = {n: 0 for n in frozen}
        factor_dims = {}
        if heads is not None:
            steps = [num_steps(c.num_train, spec.batch_size, phase) for c in clients]
            record = Record(heads, (bases or {}).get(k) or heads.base(shared), phase, steps,
                            stacked=True)
            trainable[THETA] = record.W0.new_zeros(len(cids), record.W0.shape[0])
            factor_dims = {n: Record.DIMS[n] for n in record.factors()}  # in the same order
        opt = PhaseSGD(phase, stacked=True, record=record if heads is not None else None)
        step = local_step(algo, ("stacked", tuple(sorted(frozen_dims.items())), heads is not None),
                          lambda: vmap(grad_and_value(weighted(heads)),
                                       in_dims=(0, frozen_dims, factor_dims, 0, 0, 0)),
                          spec.compile, y.device)
        # eager, compiled or not (engine.compiled)
        dp_step = vmap(per_sample_step(algo), in_dims=(0, frozen_dims, 0, 0))
        rank_one_input = vmap(algo.rank_one_input,
                              in_dims=({**frozen_dims, **dict.fromkeys(trainable, 0)},))
        noise = [torch_stream(spec.seed, Stream.DP_NOISE, spec.round, c, k, device=y.device)
                 for c in cids]
        losses = torch.zeros(len(cids), device=y.device)
        for s in range(idx.shape[1]):
            rows = offsets[:, None] + idx[:, s]
            xb = model_inputs(clients[0], x[rows].flatten(0, 1),
                              draws[:, s].flatten(0, 1) if draws is not None else None)
            xb = xb.view(*rows.shape, *xb.shape[1:])
            if per_sample:
                grads, loss = dp_step(trainable, frozen, xb, y[rows])
                if clip is not None:
                    grads = clip(grads, lead=2)
                grads = privatize(grads, weight[:, s], phase.dp, stack_noise(
                    phase.dp, trainable, noise, active_rows[s]) if phase.dp else None)
                loss = (loss * weight[:, s]).sum(1) / weight[:, s].sum(1).clamp(min=1)
            else:
                factors = opt.record.factors(spec.compile) if heads else {}
                grads, loss = step(trainable, frozen, factors,
                                   xb, y[rows], weight[:, s])
            opt.step(trainable, grads,
                     rank_one_input({**frozen, **trainable}) if heads else None, active[:, s])
            losses += loss.detach() * active[:, s]
            del xb, grads  # not beside the next step's (24 MB of a 20-client CIFAR-10 stack)
        losses /= active.sum(1)
        trainable.pop(THETA, None)
        stacked.update(trainable)
    return Trained(stacked, losses, record)


def train_stacked(algo: Algorithm, shared: Params, private: dict[int, Params],
                  data: dict[int, ClientData], cids: list[int], spec: RoundSpec,
                  clip: SampleTransform | None = None) -> tuple[Params, torch.Tensor]:
    """run_stack, with every client's factored layers formed and stacked (tests); returns the
    stacked trained state and each client's last-phase mean loss."""
    stacked, losses, record = run_stack(algo, shared, private, data, cids, spec, clip)
    if record is not None:
        formed = [record.trained(i) for i in range(len(cids))]
        stacked.update({n: torch.stack([f[n] for f in formed]) for n in formed[0]})
    return stacked, losses
