"""torch.optim.SGD with clip_grad_norm_ per parameter group, as functions on lists of tensors:
one client's, or a group's stacked along dim 0 (`stacked`, each client clipped by its own norm).

And the optimizer state of a phase's factored layers (Phase.factored: a hypernetwork's heads,
13.7M weights on CIFAR-10, whose math is hpcfl.algorithms.factored): no client trains a copy of
them. A `Record` keeps, beside the shared W_0 and b_0, what their training leaves per client
(or per stack): each step's clipped output gradient G_s and input h_s. A step's forward reads the
layers' outputs from it (`Record.factors`), and the upload is one product (`Record.upload`),
formed once per client or stack (docs/factored.md).
"""
from __future__ import annotations

import torch

from .algorithms import Params, Phase
from .algorithms.base import Heads
from .algorithms import factored

# The key, among a factored phase's trainable tensors, of a zero added to the layers' outputs:
# its gradient is g = dL/dtheta, the bias's gradient and the weight's left factor.
THETA = "<factored outputs>"


def per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (clients,) vector shaped to broadcast against a stacked (clients, ...) tensor."""
    return v.view(-1, *[1] * (like.dim() - 1))


def clip_(grads: list[torch.Tensor], max_norm: float, stacked: bool = False,
          extra_sq: torch.Tensor | float = 0.0) -> torch.Tensor | float:
    """torch.nn.utils.clip_grad_norm_ on one group of gradients, in place; `stacked`: dim 0
    indexes clients, each clipped by its own norm. `extra_sq`: the squared norm of gradients of
    the group that are not in `grads` (factored ones), per client when stacked. Returns the
    factor applied (per client when stacked), for those."""
    if not grads and not torch.is_tensor(extra_sq):
        return 1.0
    if stacked:
        sq = sum((g.flatten(1).pow(2).sum(1) for g in grads), extra_sq)
        scale = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(per_client(scale, g))
    else:
        sq = (torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else 0.0) + extra_sq
        scale = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
        torch._foreach_mul_(grads, scale)
    return scale


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




class Record:
    """A factored phase's layers (Phase.factored) for one client, or for a stack of clients
    along dim 0 of G and H: the shared base W_0, b_0 (Heads.base), room for `steps[i]` steps of
    client i (the stack runs the longest), each step's clipped output gradient G and input h
    (`add`), and the phase's SGD coefficients a_t, w_t as one device table (one copy per phase).
    A client whose schedule has ended takes steps of no sample in a stack: its G is 0 there
    and its upload reads its own coefficients, those of its own step count."""

    # vmap in_dims of `factors` for a stack
    DIMS = {"W0": None, "b0": None, "a": None, "w": None, "G": 0, "H": 0}

    def __init__(self, heads: Heads, base: tuple[torch.Tensor, torch.Tensor | None],
                 phase: Phase, steps: list[int], stacked: bool = False):
        self.heads, self.phase, self.steps, self.stacked = heads, phase, steps, stacked
        self.W0, self.b0 = base
        self.lr = dict(zip(phase.names, phase.lrs))[heads.weights[0]]
        total = max(steps)
        self.a, self.w = factored.coefficients(phase, self.lr, total)
        table = torch.zeros(total + 1, total + 1, dtype=torch.float64)  # row t: a_t, then w_t
        for t in range(total + 1):
            table[t, 0] = self.a[t]
            table[t, 1:t + 1] = torch.tensor(self.w[t], dtype=torch.float64)
        self.table = table.to(self.W0.device, self.W0.dtype)
        (outputs, hidden), n = self.W0.shape, len(steps)
        self.G = self.W0.new_zeros(n, total, outputs)
        self.H = self.W0.new_zeros(n, total, hidden)
        self.t = 0

    def factors(self, whole: bool = False) -> dict[str, torch.Tensor]:
        """What algorithms.factored.theta reads at this step (keys of DIMS): the steps so far,
        or with `whole` the room for all of them, the rest at coefficient 0 (the same shapes at
        every step, for a compiled step: CUDA graphs record one per shape)."""
        t = self.t
        end = self.G.shape[1] if whole else t
        G, H = self.G[:, :end], self.H[:, :end]
        out = {"W0": self.W0, "a": self.table[t, 0], "w": self.table[t, 1:end + 1],
               "G": G if self.stacked else G[0], "H": H if self.stacked else H[0]}
        if self.b0 is not None:
            out["b0"] = self.b0
        return out

    def sq_norm(self, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return factored.sq_norm(g, h, self.heads.biased)

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        """The step's clipped output gradient g and input h (a stack's: dim 0)."""
        self.G[:, self.t] = g
        self.H[:, self.t] = h
        self.t += 1

    def trained(self, member: int = 0) -> Params:
        """A client's layers after the phase, formed (tests, and what a defense sees)."""
        t = self.steps[member]
        return combined([(self, member, self.a[t], self.w[t])])

    def momentum(self, member: int = 0) -> Params:
        """A client's momentum buffers of the layers after the phase, formed (tests)."""
        c, q = factored.buffer_coefficients(self.phase, self.lr, self.steps[member])
        return combined([(self, member, c[-1], q[-1])])


def upload(parts: list[tuple[Record, int, float]], out: torch.Tensor | None = None) -> Params:
    """sum over (record, member, weight) of weight (W_T - W_0), W_T that client's layers after
    its own step count T, and the same for the biases, by name: one product (a stack's uploads:
    in sequential mode from one record per client, in vectorized mode from one record). `out`:
    where to write the weights' (reused, a fresh 55 MB tensor costs its page faults again)."""
    return combined([(r, m, n * (r.a[r.steps[m]] - 1), [n * x for x in r.w[r.steps[m]]])
                     for r, m, n in parts], out)


def combined(parts: list[tuple[Record, int, float, list[float]]],
             out: torch.Tensor | None = None) -> Params:
    """sum over (record, member, scale, w) of scale W_0 + sum_s w[s] G_s h_s^T, and the
    biases, by name (algorithms.factored.combine): the members' recorded steps end to end, one
    product. The records share W_0 and b_0 (the round's Heads.base)."""
    first = parts[0][0]
    if all(r is first for r, *_ in parts) and [m for _, m, *_ in parts] == list(
            range(first.G.shape[0])):  # a whole stack in its order: its rows as they are
        G, H = first.G.flatten(0, 1), first.H.flatten(0, 1)  # views: no copy
        w = torch.zeros(len(parts), first.G.shape[1], dtype=torch.float64)
        for i, (*_, row) in enumerate(parts):
            w[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
    else:  # each member's own steps only
        G = torch.cat([r.G[m, :r.steps[m]] for r, m, *_ in parts])
        H = torch.cat([r.H[m, :r.steps[m]] for r, m, *_ in parts])
        w = torch.tensor([x for *_, row in parts for x in row], dtype=torch.float64)
    W0, b0 = first.W0, first.b0
    with torch.autocast(W0.device.type, enabled=False):  # engine.dtype: not for the sum
        weight, bias = factored.combine(W0, b0, sum(p[2] for p in parts), G, H,
                                        w.flatten().to(W0.device, W0.dtype), out)
    return first.heads.layers(weight, bias)


class PhaseSGD:
    """One phase's optimizer for one client, or a group stacked along dim 0 (`stacked`):
    clip_grad_norm_ per group, then SGD; the phase's factored layers (with a `record`) train
    from their output gradient g (grads[THETA]) and input h, never from a formed gradient."""

    def __init__(self, phase: Phase, stacked: bool = False, record: Record | None = None):
        self.phase, self.stacked, self.record = phase, stacked, record
        layers = set(phase.factored.names) if record is not None else set()
        self.dense = [n for n in phase.names if n not in layers]  # gradients formed
        self.lr = dict(zip(phase.names, phase.lrs))
        self.momentum: list[torch.Tensor] = []

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             h: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """Update `params` in place from `grads` (of the dense tensors, and THETA's) and, for
        factored layers, their input `h`; `active`: per-client 0/1 when stacked."""
        p, rec = self.phase, self.record
        dense = set(self.dense)
        g = grads[THETA] if rec is not None else None
        if p.grad_clip > 0:
            for group in p.param_groups:
                with_layers = rec is not None and rec.heads.weights[0] in group
                scale = clip_([grads[n] for n in group if n in dense], p.grad_clip,
                              self.stacked, extra_sq=rec.sq_norm(g, h) if with_layers else 0.0)
                if with_layers:
                    g = g * (per_client(scale, g) if self.stacked else scale)
        if rec is not None:
            rec.add(g, h)
        sgd_([params[n] for n in self.dense], [grads[n] for n in self.dense], self.momentum, p,
             [self.lr[n] for n in self.dense], active)
