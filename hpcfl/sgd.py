"""torch.optim.SGD with clip_grad_norm_ per parameter group, as functions on lists of tensors:
one client's, or a group's stacked along dim 0 (`stacked`, each client clipped by its own norm).

And the same update for the weight W of a Linear layer applied to ONE vector h per client (the
heads of HyperFL's hypernetwork, 13.7M entries on CIFAR-10): its gradient is the outer product
d hᵀ of the layer's output gradient d (which is also its bias's gradient) and h, and is never
formed. Its norm is |d|·|h|; momentum and the step take it through `addr_` / `baddbmm_`:
m = mu*m + d hᵀ + wd*W, W -= lr*m reads and writes W and m a few times per step instead of
writing a dense gradient and passing over it for the clip, the weight decay, the momentum and the
step (docs/performance.md).
"""
from __future__ import annotations

import torch

from .algorithms import Phase


def per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (clients,) vector shaped to broadcast against a stacked (clients, ...) tensor."""
    return v.view(-1, *[1] * (like.dim() - 1))


def clip_(grads: list[torch.Tensor], max_norm: float, stacked: bool = False,
          extra_sq: torch.Tensor | float = 0.0) -> None:
    """torch.nn.utils.clip_grad_norm_ on one group of gradients, in place; `stacked`: dim 0
    indexes clients, each clipped by its own norm. `extra_sq`: the squared norm of gradients of
    the group that are not in `grads` (rank-one ones), per client when stacked."""
    if stacked:
        sq = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0) + extra_sq
        scale = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(per_client(scale, g))
    else:
        sq = torch.stack(torch._foreach_norm(grads)).pow(2).sum() + extra_sq
        torch._foreach_mul_(grads, torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0))


def sgd_(params: list[torch.Tensor], grads: list[torch.Tensor],
         momentum_buf: list[torch.Tensor], phase: Phase, lrs: list[float],
         active: torch.Tensor | None = None) -> None:
    """torch.optim.SGD's update (dampening 0, no Nesterov), in place on params and grads; an
    empty `momentum_buf` is filled from the first gradient, as torch does. `lrs`: one per
    tensor. `active`: per-client 0/1 for stacked params; a client at 0 does not move (its
    schedule has ended)."""
    if phase.weight_decay:
        torch._foreach_add_(grads, params, alpha=phase.weight_decay)
    if phase.momentum:
        if not momentum_buf:
            momentum_buf.extend(torch._foreach_mul(grads, 1.0))
        else:
            torch._foreach_mul_(momentum_buf, phase.momentum)
            torch._foreach_add_(momentum_buf, grads)
        grads = momentum_buf
    if active is not None:
        grads = [g * per_client(active, g) for g in grads]
    if len(set(lrs)) > 1:
        for p, g, lr in zip(params, grads, lrs):
            p.add_(g, alpha=-lr)
    elif params:
        torch._foreach_add_(params, grads, alpha=-lrs[0])


def rank_one_sgd_(weight: torch.Tensor, momentum: torch.Tensor | None, d: torch.Tensor,
                  h: torch.Tensor, phase: Phase, lr: float,
                  active: torch.Tensor | None = None) -> torch.Tensor | None:
    """sgd_ for one weight whose (already clipped) gradient is d hᵀ: weight (out, in), d (out,),
    h (in,); stacked: (clients, out, in), (clients, out), (clients, in). Returns the momentum
    buffer to pass to the next step (None without momentum)."""
    stacked = weight.dim() == 3
    if momentum is None or not phase.momentum:  # torch: the first buffer is the gradient
        momentum = weight * phase.weight_decay if phase.weight_decay else torch.zeros_like(weight)
        beta = 1.0
    else:
        if phase.weight_decay:
            momentum.add_(weight, alpha=phase.weight_decay / phase.momentum)
        beta = phase.momentum
    if stacked:
        momentum.baddbmm_(d.unsqueeze(2), h.unsqueeze(1), beta=beta)
    else:
        momentum.addr_(d, h, beta=beta)
    if active is None:
        weight.add_(momentum, alpha=-lr)
    else:
        weight.addcmul_(momentum, per_client(active * -lr, weight))
    return momentum if phase.momentum else None


class PhaseSGD:
    """One phase's optimizer for one client, or a group stacked along dim 0 (`stacked`):
    clip_grad_norm_ per group, then SGD; the phase's rank-one weights (Phase.rank_one) train
    from their bias's gradient d and the layer input h, never from a formed gradient."""

    def __init__(self, phase: Phase, stacked: bool = False):
        self.phase, self.stacked = phase, stacked
        self.rank_one = dict(phase.rank_one)  # weight -> its bias, whose gradient is d
        self.dense = [n for n in phase.names if n not in self.rank_one]  # gradients formed
        self.lr = dict(zip(phase.names, phase.lrs))
        self.momentum: list[torch.Tensor] = []
        self.rank_one_momentum: dict[str, torch.Tensor | None] = dict.fromkeys(self.rank_one)

    def _sq(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).pow(2).sum(1) if self.stacked else t.pow(2).sum()

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             h: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """Update `params` in place from `grads` (of the dense tensors) and, for rank-one
        weights, `h`; `active`: per-client 0/1 when stacked."""
        p = self.phase
        if p.grad_clip > 0:
            for group in p.param_groups:
                d_sq = sum(self._sq(grads[self.rank_one[n]]) for n in group if n in self.rank_one)
                clip_([grads[n] for n in group if n not in self.rank_one], p.grad_clip,
                      self.stacked, extra_sq=d_sq * self._sq(h) if h is not None else 0.0)
        for n, bias in self.rank_one.items():  # before sgd_, which adds weight decay to grads
            self.rank_one_momentum[n] = rank_one_sgd_(params[n], self.rank_one_momentum[n],
                                                      grads[bias], h, p, self.lr[n], active)
        sgd_([params[n] for n in self.dense], [grads[n] for n in self.dense], self.momentum, p,
             [self.lr[n] for n in self.dense], active)
