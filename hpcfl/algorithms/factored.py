"""SGD on Linear layers that all read one vector h per client (a hypernetwork's heads,
Phase.factored), in factored form: the math, in one place, for the engine (hpcfl.sgd.Record)
and for the adaptive attack's simulation of a client (privacy.attacks.hypernet).

torch.optim.SGD (learning rate lr, momentum mu, weight decay wd) acts linearly on a weight W_0
that receives gradients X_0, X_1, ...:

    W_t = a_t W_0 + sum_{s<t} w_ts X_s,      momentum buffer m_t = c_t W_0 + sum_{s<t} q_ts X_s,

with scalars from (lr, mu, wd) alone (`coefficients`, `buffer_coefficients`). For a Linear layer
theta = W h + b the step's gradients are X_s = G_s h_s^T for W and G_s for b, G_s the clipped
gradient of the loss in theta. So a client never needs its own W:

    theta_t  = a_t (W_0 h_t + b_0) + sum_s w_ts G_s (h_s . h_t + beta)   (`theta`; beta = 1 with
                                                                           biases, 0 without)
    dL/dh_t  = a_t W_0^T g + sum_s w_ts h_s (G_s . g)                      (`pull_back`: the
                                                                           transpose of theta)
    |grad of (W, b)|^2 = |g|^2 (|h|^2 + beta)                              (`sq_norm`, the clip)
    W_T - W_0 = (a_T - 1) W_0 + sum_s w_Ts G_s h_s^T, b likewise           (`combine`)

and the sum of clients' uploads weighted by n_i is one matrix product, [G] diag(n w) [H]^T.
Exact in exact arithmetic (tests/test_factored.py: equal to dense SGD to float32 rounding).
A step reads W_0 twice (theta and the pull-back) and the recorded G twice: cheaper than the
dense update (W and m read and written every step) while the steps are fewer than a few times
the hidden width, and smaller in memory (steps x outputs instead of 2 x hidden x outputs per
client) while they are fewer than twice the hidden width (docs/factored.md).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import Phase

Tensor = torch.Tensor
# (G (s, outputs), H (s, hidden), w (s,)): recorded steps and their coefficients; a list of
# such blocks stands for their concatenation along s
History = list[tuple[Tensor, Tensor, Tensor]]


def _recurrence(phase: Phase, lr: float, steps: int):
    """(a, w, c, q) for t = 0 .. steps: see the module docstring."""
    return _scalars(phase.momentum, phase.weight_decay, lr, steps)


@functools.lru_cache(maxsize=64)  # every client of a round asks for the same; read only
def _scalars(mu: float, wd: float, lr: float, steps: int):
    a, w, c, q = [1.0], [[]], [0.0], [[]]
    for t in range(steps):
        # torch: the first buffer is the gradient itself (+ wd W); later mu m + gradient
        c.append(mu * c[t] + wd * a[t])
        q.append([mu * qs + wd * ws for qs, ws in zip(q[t], w[t])] + [1.0])
        a.append(a[t] - lr * c[t + 1])
        w.append([ws - lr * qs for ws, qs in zip(w[t] + [0.0], q[t + 1])])
    return a, w, c, q


def coefficients(phase: Phase, lr: float, steps: int) -> tuple[list[float], list[list[float]]]:
    """W_t = a[t] W_0 + sum_{s<t} w[t][s] X_s under SGD with the phase's momentum and weight
    decay at learning rate lr, for t = 0 .. steps."""
    a, w, _, _ = _recurrence(phase, lr, steps)
    return a, w


def buffer_coefficients(phase: Phase, lr: float,
                        steps: int) -> tuple[list[float], list[list[float]]]:
    """The momentum buffer's: m_t = c[t] W_0 + sum_{s<t} q[t][s] X_s (m_0 = 0)."""
    _, _, c, q = _recurrence(phase, lr, steps)
    return c, q


def theta(W0: Tensor, b0: Tensor | None, a: Tensor | float, history: History,
          h: Tensor) -> Tensor:
    """The layers' outputs end to end at step t, from W_0 (outputs, hidden), b_0 (None without
    biases), a = a_t, the steps recorded so far with w = w_t's and the input h. Differentiable
    in h and in the history; under vmap with W_0 shared, W_0 h is one product for the stack."""
    beta = float(b0 is not None)
    # F.linear, not W0 @ h: under vmap its backward, g @ W0 for the stack, is one well-shaped
    # product (W0^T @ g^T took 35x longer on a CPU)
    out = a * F.linear(h, W0, b0)
    for G, H, w in history:
        out = out + (w * (H @ h + beta)) @ G
    return out


def pull_back(W0: Tensor, a: Tensor | float, history: History, g: Tensor) -> Tensor:
    """dL/dh from g = dL/dtheta: theta's transpose (what autograd computes through theta)."""
    out = a * (g @ W0)
    for G, H, w in history:
        out = out + (w * (G @ g)) @ H
    return out


def sq_norm(g: Tensor, h: Tensor, biased: bool) -> Tensor:
    """The squared norm of the layers' gradients (weights g h^T, biases g) for clip_grad_norm_;
    leading dims (a stack's clients) kept."""
    return g.pow(2).sum(-1) * (h.pow(2).sum(-1) + float(biased))


def combine(W0: Tensor, b0: Tensor | None, scale: float, G: Tensor, H: Tensor, w: Tensor,
            out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """scale W_0 + sum_s w_s G_s h_s^T and scale b_0 + sum_s w_s G_s: a client's weights
    (scale a_T, w its w_T), its upload (a_T - 1), its momentum buffer (c_T, q_T); or, with the
    rows of several clients and w_s times each one's aggregation weight, their weighted sum.
    G (s, outputs), H (s, hidden), w (s,): one product (the weights' into `out` if given)."""
    weight = torch.addmm(W0, G.T, w[:, None] * H, beta=scale, out=out)
    bias = torch.addmv(b0, G.T, w, beta=scale) if b0 is not None else None
    return weight, bias
