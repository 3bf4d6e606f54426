"""Trains a cohort of clients and evaluates clients, for any Algorithm.

Two paths with the same semantics (tested to agree within float32 rounding):
- sequential: one client after another, each a plain loop of functional SGD steps
  (torch.func.grad on the algorithm's forward), its data already on the device;
- vectorized: a group of clients at once: their parameters stacked along a client axis, one
  torch.func.vmap(grad) per step. Clients train for different numbers of steps and their last
  batch of an epoch is smaller, exactly as in the sequential path: every client's batch schedule
  is padded to the group's longest, padded samples carry zero weight in the loss, and a client
  whose schedule has ended takes zero-size steps.
Every random choice (batch order) comes from (seed, round, client, phase), never from the rank
or from which clients trained before, so results do not depend on how clients are spread over
ranks or groups.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from .algorithms import DPSGD, Algorithm, Params, Phase
from .data import ClientData
from .sgd import PhaseSGD

if TYPE_CHECKING:  # annotations only: defenses import the engine
    from .privacy.defenses import ClientDefense
    from .privacy.random_slice import SliceClip

BATCH_ORDER, AUGMENT, DP_NOISE = 103, 105, 106  # stream tags, see data.partition.rng
CROP_PAD = 4  # official CIFAR/CINIC transform: RandomCrop(32, padding=4) + RandomHorizontalFlip
# The round's buffer ends with: loss sum, client count, stop votes (set by the caller), weights.
EXTRA_SLOTS, STOP_SLOT = 4, -2
# float64: the sum must not depend on how clients are spread over ranks (see README, MPI).
ROUND_DTYPE = torch.float64
AUTO_MODE = {"cpu": "sequential", "cuda": "vectorized"}  # see resolve_mode


def client_generator(seed: int, rnd: int, cid: int, phase: int, stream: int = BATCH_ORDER,
                     device: torch.device | str = "cpu") -> torch.Generator:
    state = np.random.SeedSequence([seed, stream, rnd, cid, phase]).generate_state(1)
    return torch.Generator(device=device).manual_seed(int(state[0]))


def crop_flip_draws(gen: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3): crop offsets dy, dx in [0, 2 * CROP_PAD] and a flip bit, for n samples."""
    return torch.cat([torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=gen),
                      torch.randint(0, 2, (n, 1), generator=gen)], dim=1)


def crop_flip(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Random crop with zero padding, then horizontal flip, of a batch (N, C, H, W) on its
    device. The data is already normalized, so padding is the mean colour (torchvision pads the
    raw image with black before normalizing)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (CROP_PAD,) * 4)
    draws = draws.to(x.device)
    rows = (draws[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (draws[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(draws[:, 2].bool().view(n, 1, 1, 1), out.flip(-1), out)


def model_inputs(data: ClientData, x: torch.Tensor,
                 draws: torch.Tensor | None = None) -> torch.Tensor:
    """A batch as the model sees it. Pixels (uint8 become floats in [0, 1]) are cropped/flipped
    (padding black, as torchvision) and normalized with the dataset's mean and std, as the
    official transforms; synthetic data is normalized already (crop pads its mean)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if draws is not None:
        x = crop_flip(x, draws)
    return x if data.mean is None else (x - data.mean) / data.std


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


def per_sample_phase(phase: Phase, clip: SliceClip | None) -> Phase | None:
    """The phase as trained from per-sample gradients (DP-SGD, or a defense's per-sample clip
    of tensors it trains), without the rank-one shortcut; None if it needs none."""
    if phase.dp is None and (clip is None or not clip.touches(phase.names)):
        return None
    return replace(phase, rank_one=())


def train_client(algo: Algorithm, params: Params, data: ClientData, batch_size: int,
                 seed: int, rnd: int, cid: int, augment: bool = False,
                 clip: SliceClip | None = None) -> tuple[Params, float]:
    """Run every phase of local training; returns the trained state and the mean minibatch loss
    of the last phase. `clip`: a defense's transform of per-sample gradients."""
    def loss_fn(trainable, frozen, x, y):
        return F.cross_entropy(algo.forward({**frozen, **trainable}, x), y)

    step, dp_step = grad_and_value(loss_fn), per_sample_step(algo)
    params = dict(params)
    losses: list[torch.Tensor] = []
    for k, phase in enumerate(algo.phases()):
        per_sample = per_sample_phase(phase, clip)
        phase = per_sample or phase
        # Copies, updated in place below; the caller's tensors (the shared state) stay intact.
        trainable = {n: params[n].detach().clone() for n in phase.names}
        frozen = {n: v for n, v in params.items() if n not in trainable}
        if (pre := algo.precompute(phase)) is not None:
            frozen = pre(frozen)
        opt = PhaseSGD(phase)
        rank_one = {n: trainable[n] for n in opt.rank_one}
        losses = []
        gen = client_generator(seed, rnd, cid, k)
        aug = client_generator(seed, rnd, cid, k, AUGMENT) if augment else None
        dev = data.y_train.device
        noise = client_generator(seed, rnd, cid, k, DP_NOISE, dev) if phase.dp else None
        for idx in minibatches(data.num_train, batch_size, phase, gen):
            idx = idx.to(dev)
            xb = model_inputs(data, data.x_train[idx],
                              crop_flip_draws(aug, len(idx)) if augment else None)
            if per_sample:
                grads, loss = dp_step(trainable, frozen, xb, data.y_train[idx])
                if clip is not None:
                    grads = clip(grads, lead=1)
                grads = privatize(grads, torch.ones(len(idx), device=dev), phase.dp,
                                  dp_noise(phase.dp, trainable, noise) if phase.dp else None)
                loss = loss.mean()
            else:  # rank-one weights enter as constants: no gradient of theirs is formed
                grads, loss = step({n: trainable[n] for n in opt.dense}, {**frozen, **rank_one},
                                   xb, data.y_train[idx])
            opt.step(trainable, grads,
                     algo.rank_one_input({**frozen, **trainable}) if rank_one else None)
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


def schedules(data: dict[int, ClientData], cids: list[int], batch_size: int, phase: Phase,
              seed: int, rnd: int, k: int, device,
              augment: bool = False) -> tuple[torch.Tensor, ...]:
    """The sequential path's batches of every client, padded to a common shape: index
    (clients, steps, batch), sample weight (same, 0 for padding), active (clients, steps), and
    with `augment` the crop/flip draws (clients, steps, batch, 3) in the sequential path's order
    (else None)."""
    lists = [list(minibatches(data[c].num_train, batch_size, phase,
                              client_generator(seed, rnd, c, k))) for c in cids]
    steps = max(len(b) for b in lists)
    idx = torch.zeros(len(cids), steps, batch_size, dtype=torch.long)
    weight = torch.zeros(len(cids), steps, batch_size)
    active = torch.zeros(len(cids), steps)
    draws = torch.zeros(len(cids), steps, batch_size, 3, dtype=torch.long) if augment else None
    for i, (c, batches) in enumerate(zip(cids, lists)):
        active[i, :len(batches)] = 1
        aug = client_generator(seed, rnd, c, k, AUGMENT) if augment else None
        for s, b in enumerate(batches):
            idx[i, s, :len(b)], weight[i, s, :len(b)] = b, 1
            if augment:
                draws[i, s, :len(b)] = crop_flip_draws(aug, len(b))
    return idx.to(device), weight.to(device), active.to(device), draws


def stack_noise(dp: DPSGD, stacked: Params, gens: list[torch.Generator],
                active: torch.Tensor) -> Params:
    """One step's DP noise of a group, each client's drawn from its own generator in the
    sequential path's order (a client whose schedule has ended draws nothing)."""
    one = {n: stacked[n][0] for n in dp.names}
    draws = [dp_noise(dp, one, g) if a else {n: torch.zeros_like(v) for n, v in one.items()}
             for g, a in zip(gens, active.tolist())]
    return {n: torch.stack([d[n] for d in draws]) for n in dp.names}


def train_group(algo: Algorithm, shared: Params, private: dict[int, Params],
                data: dict[int, ClientData], cids: list[int], batch_size: int, seed: int,
                rnd: int, augment: bool = False,
                clip: SliceClip | None = None) -> tuple[Params, torch.Tensor]:
    """The vectorized path: train clients `cids` together. Returns their trained state stacked
    along dim 0 (every tensor that training changed) and each client's last-phase mean loss."""
    x = torch.cat([data[c].x_train for c in cids])
    y = torch.cat([data[c].y_train for c in cids])
    offsets = torch.tensor([0] + [data[c].num_train for c in cids[:-1]],
                           device=y.device).cumsum(0)
    stacked = {n: torch.stack([private[c][n] for c in cids]) for n in private[cids[0]]}

    def loss_fn(trainable, frozen, x, y, w):
        ce = F.cross_entropy(algo.forward({**frozen, **trainable}, x), y, reduction="none")
        # The mean over the batch's real samples (a finished client's padded step has none).
        return (ce * w).sum() / w.sum().clamp(min=1)

    for k, phase in enumerate(algo.phases()):
        per_sample = per_sample_phase(phase, clip)
        phase = per_sample or phase
        idx, weight, active, draws = schedules(data, cids, batch_size, phase, seed, rnd, k,
                                               y.device, augment)
        # A shared tensor gets one copy per client once it is trained; until then all clients
        # read the same one (vmap in_dims None).
        trainable = {n: (stacked[n] if n in stacked else
                         shared[n].expand(len(cids), *shared[n].shape)).clone()
                     for n in phase.names}
        frozen = {n: v for n, v in {**shared, **stacked}.items() if n not in trainable}
        frozen_dims = {n: 0 if n in stacked else None for n in frozen}
        if (pre := algo.precompute(phase)) is not None:
            frozen = vmap(pre, in_dims=(frozen_dims,))(frozen)
            frozen_dims = {n: 0 for n in frozen}
        opt = PhaseSGD(phase, stacked=True)
        rank_one = {n: trainable[n] for n in opt.rank_one}
        step = vmap(grad_and_value(loss_fn),
                    in_dims=(0, {**frozen_dims, **dict.fromkeys(rank_one, 0)}, 0, 0, 0))
        dp_step = vmap(per_sample_step(algo), in_dims=(0, frozen_dims, 0, 0))
        rank_one_input = vmap(algo.rank_one_input,
                              in_dims=({**frozen_dims, **dict.fromkeys(trainable, 0)},))
        noise = [client_generator(seed, rnd, c, k, DP_NOISE, y.device) for c in cids]
        losses = torch.zeros(len(cids), device=y.device)
        for s in range(idx.shape[1]):
            rows = offsets[:, None] + idx[:, s]
            xb = model_inputs(data[cids[0]], x[rows].flatten(0, 1),
                              draws[:, s].flatten(0, 1) if augment else None)
            xb = xb.view(*rows.shape, *xb.shape[1:])
            if per_sample:
                grads, loss = dp_step(trainable, frozen, xb, y[rows])
                if clip is not None:
                    grads = clip(grads, lead=2)
                grads = privatize(grads, weight[:, s], phase.dp, stack_noise(
                    phase.dp, trainable, noise, active[:, s]) if phase.dp else None)
                loss = (loss * weight[:, s]).sum(1) / weight[:, s].sum(1).clamp(min=1)
            else:
                grads, loss = step({n: trainable[n] for n in opt.dense}, {**frozen, **rank_one},
                                   xb, y[rows], weight[:, s])
            opt.step(trainable, grads,
                     rank_one_input({**frozen, **trainable}) if rank_one else None, active[:, s])
            losses += loss.detach() * active[:, s]
        losses /= active.sum(1)
        stacked.update(trainable)
    return stacked, losses


def precision(dtype: str, device: torch.device):
    """engine.dtype: fp32; tf32 (CUDA matmuls and convolutions in TF32); bf16 (autocast:
    matmuls and convolutions in bfloat16, on CUDA, or on the CPU where it is supported). The
    round's buffer and the optimizer state stay float32/float64 either way."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_mode(mode: str, device: torch.device) -> str:
    """engine.mode=auto: the path `python -m hpcfl.bench digits-hyperfl` measured faster on this
    device type (README, Performance)."""
    if mode != "auto":
        return mode
    return AUTO_MODE[torch.device(device).type]


def train_cohort(algo: Algorithm, shared: Params, private: dict[int, Params],
                 data: dict[int, ClientData], cohort: list[int], weights: list[float],
                 batch_size: int, seed: int, rnd: int, device: torch.device,
                 mode: str = "sequential", group_size: int = 0,
                 augment: bool = False, defense: ClientDefense | None = None) -> torch.Tensor:
    """Train `cohort` (clients hosted here, sorted) from `shared`; update their private state in
    place. mode "vectorized" trains together the members of each block of `group_size`
    consecutive client ids (0: all at once).

    Returns ONE flat float64 buffer, ready for the round's Allreduce:
    [sum of weight * upload | sum of training losses | number of clients | 0 | sum of weights].
    Uploads are added one client at a time in cohort order, whatever the mode, each first
    through `defense(upload, client id, its state before and after training)` when given, and
    trained with `defense.per_sample` (a transform of per-sample gradients) where it has one.
    """
    numel = sum(v.numel() for v in shared.values())
    buf = torch.zeros(numel + EXTRA_SLOTS, dtype=ROUND_DTYPE, device=device)

    def add(cid: int, w: float, trained: Params, loss: float) -> None:
        start = {**shared, **private[cid]} if defense is not None else None
        private[cid] = {n: trained[n].detach() for n in private[cid]}
        up = algo.upload(shared, trained)
        if defense is not None:
            up = defense(up, cid, start, trained)
        buf[:numel].add_(flatten(up, shared.keys()).detach(), alpha=w)
        buf[-EXTRA_SLOTS:] += torch.tensor([loss, 1.0, 0.0, w], device=device)

    if mode == "sequential":
        for cid, w in zip(cohort, weights):
            add(cid, w, *train_client(algo, {**shared, **private[cid]}, data[cid], batch_size,
                                      seed, rnd, cid, augment,
                                      defense.per_sample([cid]) if defense else None))
        return buf
    # A group: the members of the cohort among ids [k * group_size, (k + 1) * group_size), a
    # set that does not depend on which rank hosts them (ranks host whole blocks).
    block = (lambda c: c // group_size) if group_size else (lambda c: 0)
    for _, members in itertools.groupby(zip(cohort, weights), key=lambda cw: block(cw[0])):
        cids, ws = zip(*members)
        stacked, losses = train_group(algo, shared, private, data, list(cids), batch_size,
                                      seed, rnd, augment,
                                      defense.per_sample(list(cids)) if defense else None)
        for i, (cid, w) in enumerate(zip(cids, ws)):
            add(cid, w, {**shared, **{n: v[i] for n, v in stacked.items()}}, float(losses[i]))
    return buf


@torch.no_grad()
def evaluate_client(algo: Algorithm, params: Params, data: ClientData,
                    batch: int = 4096) -> tuple[int, float]:
    """(number correct, summed cross-entropy) of the client's model on its test split."""
    x, y = data.x_test, data.y_test
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = algo.forward(params, model_inputs(data, x[i:i + batch]))
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i:i + batch], reduction="sum"))
    return correct, loss
