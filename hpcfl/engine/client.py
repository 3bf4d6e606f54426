"""One client's local training (the sequential path) and what both paths share: minibatches,
per-sample gradients, DP-SGD's clip and noise. Every random choice comes from the run's streams
(hpcfl.streams) keyed by (seed, round, client, phase), never from the rank or from which clients
trained before."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from ..algorithms import DPSGD, Algorithm, Params, Phase
from ..algorithms.base import Heads
from ..algorithms import factored
from ..data import ClientData
from ..data.transforms import crop_flip_draws, model_inputs
from ..sgd import THETA, PhaseSGD, Record
from ..streams import Stream, torch_stream
from .compiled import local_step
from .round import RoundSpec


def num_steps(n: int, batch_size: int, phase: Phase) -> int:
    """How many minibatches `minibatches` gives."""
    return phase.steps or phase.epochs * math.ceil(n / batch_size)


def minibatches(n: int, batch_size: int, phase: Phase,
                gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches: reshuffled every epoch, last batch of an epoch possibly smaller (as a
    DataLoader with shuffle=True); `phase.steps` batches if set, else `phase.epochs` epochs."""
    steps = num_steps(n, batch_size, phase)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]
            done += 1
            if done == steps:
                return


def privatize(grads: Params, w: torch.Tensor, dp: DPSGD | None, noise: Params | None) -> Params:
    """DP-SGD's gradient (see algorithms.DPSGD) from per-sample gradients; without `dp` their
    plain mean. grads[n] has the samples on the dim after w's leading dims: (B, ...) with w
    (B,), or (clients, B, ...) with w (clients, B); w is 1 for a real sample and 0 for padding.
    noise[n] is the summed gradient's noise, already scaled."""
    lead = w.dim()
    private = dp.names if dp is not None else ()
    if private:
        norms = torch.stack([grads[n].flatten(lead).norm(dim=-1) for n in private]).norm(dim=0)
        clipped = torch.clamp(dp.clip / (norms + 1e-6), max=1.0) * w  # clip_grad_norm_'s factor
    count = w.sum(-1).clamp(min=1)
    out = {}
    for n, g in grads.items():
        scale = clipped if n in private else w
        total = (g * scale.view(*scale.shape, *[1] * (g.dim() - lead))).sum(lead - 1)
        if n in private:
            total += noise[n]
        out[n] = total / count.view(*count.shape, *[1] * (total.dim() - count.dim()))
    return out


def dp_noise(dp: DPSGD, like: Params, gen: torch.Generator) -> Params:
    """One step's noise of one client: N(0, (sigma * C)^2) per coordinate of every DP tensor."""
    return {n: torch.randn(like[n].shape, generator=gen, device=like[n].device)
            * (dp.noise_multiplier * dp.clip) for n in dp.names}


def per_sample_step(algo: Algorithm):
    """(trainable, frozen, x, y) -> (per-sample gradients (B, ...), per-sample losses (B,))."""
    def sample_loss(trainable, frozen, x, y):
        return F.cross_entropy(algo.forward({**frozen, **trainable}, x[None]), y[None])
    return vmap(grad_and_value(sample_loss), in_dims=(None, None, 0, 0))


def per_sample_phase(phase: Phase, clip: SampleTransform | None) -> Phase | None:
    """The phase as trained from per-sample gradients (DP-SGD, or a defense's per-sample clip
    of tensors it trains), its layers dense, not factored; None if it needs none."""
    if phase.dp is None and (clip is None or not clip.touches(phase.names)):
        return None
    return replace(phase, factored=None)


class SampleTransform:
    """What a defense does to per-sample gradients at every local step (the interface the
    engine calls; privacy.defenses.Defense.per_sample makes one): `touches(names)` says whether
    it transforms any of those tensors; calling it with gradients of `lead` leading dims (1: one
    client's (B, ...), 2: a stack's (clients, B, ...)) returns them transformed."""

    def touches(self, names) -> bool:
        raise NotImplementedError

    def __call__(self, grads: Params, lead: int) -> Params:
        raise NotImplementedError


def phase_batches(data: ClientData, spec: RoundSpec, phase: Phase, cid: int, k: int,
                  device) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Phase k's batches of client `cid`, drawn up front (batch order, then crop/flip draws,
    from their own streams: the draws of a loop that drew them step by step) and moved to the
    device at once: batch sizes, the indices end to end, the draws end to end (or None). A copy
    to the device waits for it, so one per phase, not one per step."""
    gen = torch_stream(spec.seed, Stream.BATCH_ORDER, spec.round, cid, k)
    batches = list(minibatches(data.num_train, spec.batch_size, phase, gen))
    sizes = [len(b) for b in batches]
    draws = None
    if spec.augment:
        aug = torch_stream(spec.seed, Stream.AUGMENT, spec.round, cid, k)
        draws = torch.cat([crop_flip_draws(aug, n) for n in sizes]).to(device)
    return sizes, torch.cat(batches).to(device), draws


class Trained(NamedTuple):
    """A client's (or a stack's) local training: its state (stacked along dim 0 for a stack;
    the factored layers as they were, untrained), its last phase's mean loss (a stack's: per
    client), and the record of its factored phase (hpcfl.sgd.Record; None without one)."""
    state: Params
    loss: float | torch.Tensor
    record: Record | None


def model_params(algo: Algorithm, heads: Heads | None):
    """(trainable, frozen, factors) -> the forward's parameters; with a factored phase (heads),
    the layers' outputs read from the record's factors (algorithms.factored.theta) plus THETA's
    zero, whose gradient is their output gradient g."""
    def params(trainable: Params, frozen: Params, factors: Params) -> Params:
        out = {**frozen, **trainable}
        if heads is not None:
            f = factors
            flat = factored.theta(f["W0"], f.get("b0"), f["a"], [(f["G"], f["H"], f["w"])],
                         algo.rank_one_input(out))
            out.update(heads.split(flat + trainable[THETA]))
        return out
    return params


def run_client(algo: Algorithm, params: Params, data: ClientData, spec: RoundSpec, cid: int,
               clip: SampleTransform | None = None, bases: dict | None = None) -> Trained:
    """Run every phase of client `cid`'s local training in round spec.round (see Trained).
    `clip`: a defense's transform of per-sample gradients; `bases`: Heads.base of the shared
    state by phase index, made once per round (else here). No step reads a number back from
    the device (tests/test_host_syncs): the loss is read once, at the end."""
    dev = data.y_train.device
    dp_step = per_sample_step(algo)  # eager, compiled or not (engine.compiled)
    params = dict(params)
    losses: list[torch.Tensor] = []
    record = None
    for k, phase in enumerate(algo.phases()):
        per_sample = per_sample_phase(phase, clip)
        phase = per_sample or phase
        heads = phase.factored
        # Copies, updated in place below; the caller's tensors (the shared state) stay intact.
        # The factored layers are not copied: the record stands for them.
        trainable = {n: params[n].detach().clone() for n in phase.names
                     if heads is None or n not in heads.names}
        frozen = {n: v for n, v in params.items() if n not in trainable}
        if (pre := algo.precompute(phase)) is not None:
            frozen = pre(frozen)
        sizes, order, draws = phase_batches(data, spec, phase, cid, k, dev)
        if heads is not None:
            record = Record(heads, (bases or {}).get(k) or heads.base(params), phase,
                            [len(sizes)])
            trainable[THETA] = record.W0.new_zeros(record.W0.shape[0])
        opt = PhaseSGD(phase, record=record if heads is not None else None)
        model = model_params(algo, heads)

        def loss_fn(trainable, frozen, factors, x, y):
            return F.cross_entropy(algo.forward(model(trainable, frozen, factors), x), y)
        step = local_step(algo, ("client", heads is not None), lambda: grad_and_value(loss_fn),
                          spec.compile, dev)
        losses = []
        noise = (torch_stream(spec.seed, Stream.DP_NOISE, spec.round, cid, k, device=dev)
                 if phase.dp else None)
        end = 0
        for size in sizes:
            idx, end = order[end:end + size], end + size
            xb = model_inputs(data, data.x_train[idx],
                              draws[end - size:end] if draws is not None else None)
            if per_sample:
                grads, loss = dp_step(trainable, frozen, xb, data.y_train[idx])
                if clip is not None:
                    grads = clip(grads, lead=1)
                grads = privatize(grads, torch.ones(size, device=dev), phase.dp,
                                  dp_noise(phase.dp, trainable, noise) if phase.dp else None)
                loss = loss.mean()
            else:
                factors = opt.record.factors(spec.compile) if heads else {}
                grads, loss = step(trainable, frozen, factors,
                                   xb, data.y_train[idx])
            opt.step(trainable, grads,
                     algo.rank_one_input({**frozen, **trainable}) if heads else None)
            losses.append(loss.detach())
        trainable.pop(THETA, None)
        params.update(trainable)
    return Trained(params, torch.stack(losses).mean().item(), record)


def train_client(algo: Algorithm, params: Params, data: ClientData, spec: RoundSpec, cid: int,
                 clip: SampleTransform | None = None) -> tuple[Params, float]:
    """run_client, with the factored layers' trained values formed (the dense state: an
    attack's upload, tests); returns the trained state and the last phase's mean loss."""
    state, loss, record = run_client(algo, params, data, spec, cid, clip)
    return ({**state, **record.trained()} if record is not None else state), loss
