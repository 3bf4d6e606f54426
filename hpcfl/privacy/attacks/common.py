"""What every optimization attack shares: the attacker's knowledge, the gradient a candidate
batch would produce, the distances between gradients, total variation, iDLG's label.

References: breaching (github JonasGeiping/breaching) and the original repositories of DLG
(mit-han-lab/dlg), iDLG and Inverting Gradients (JonasGeiping/invertinggradients); digest in
shared/research/privacy.md.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


@dataclass
class Knowledge:
    """What an honest-but-curious server knows of one client's round: the model (`forward` of
    params and inputs), the state the client started from, which tensors it uploads, the input
    shape and the range of valid (normalized) pixels, per channel."""
    forward: Callable[[Params, torch.Tensor], torch.Tensor]
    params: Params
    uploaded: tuple[str, ...]
    shape: tuple[int, int, int]
    low: torch.Tensor   # (1, C, 1, 1): the normalized value of pixel 0
    high: torch.Tensor  # (1, C, 1, 1): the normalized value of pixel 1
    # The client's local training, for attacks on a whole local update (multi-step).
    steps: int = 1
    batch_size: int = 0  # 0: every step on all images
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The change of the uploaded tensors after the client's local SGD steps (momentum and
        weight decay as torch.optim.SGD) on candidate batch (x, y), differentiable in x, as
        breaching's multi-step user: step i uses the i-th slice of batch_size images,
        cyclically (the client's real shuffling is unknown to the server)."""
        p = {k: v.detach() for k, v in self.params.items()}
        for k in self.uploaded:
            p[k] = p[k].clone().requires_grad_()
        start = {k: p[k] for k in self.uploaded}
        bs = self.batch_size or len(x)
        per_epoch = -(-len(x) // bs)
        buf: dict[str, torch.Tensor] = {}
        for i in range(self.steps):
            j = i % per_epoch
            loss = F.cross_entropy(self.forward(p, x[j * bs:(j + 1) * bs]), y[j * bs:(j + 1) * bs])
            grads = torch.autograd.grad(loss, [p[k] for k in self.uploaded], create_graph=True)
            for k, g in zip(self.uploaded, grads):
                d = g + self.weight_decay * p[k]
                buf[k] = d if i == 0 or not self.momentum else self.momentum * buf[k] + d
                p[k] = p[k] - self.lr * buf[k]
        return [p[k] - start[k] for k in self.uploaded]

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of the uploaded tensors that batch (x, y) gives, differentiable in x (and
        in y when y holds soft labels, as DLG optimizes them)."""
        params = {k: v.detach().requires_grad_(k in self.uploaded) for k, v in self.params.items()}
        logits = self.forward(params, x)
        if y.dtype.is_floating_point:  # soft labels (DLG): cross-entropy against softmax(y)
            loss = torch.mean(torch.sum(-F.softmax(y, -1) * F.log_softmax(logits, -1), -1))
        else:
            loss = F.cross_entropy(logits, y)
        return list(torch.autograd.grad(loss, [params[k] for k in self.uploaded],
                                        create_graph=True))


def gradient_from_update(update: Params, params: Params, lr: float,
                         weight_decay: float = 0.0) -> Params:
    """The single-gradient shortcut: one SGD step moved theta by -lr * (g + wd * theta), so
    g = -update / lr - wd * theta (for several steps it is only an approximation)."""
    return {k: -u / lr - weight_decay * params[k] for k, u in update.items()}


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """1 - cos of the two gradients, all tensors concatenated (Inverting Gradients)."""
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = torch.sqrt(sum(x.pow(2).sum() for x in a))
    nb = torch.sqrt(sum(y.pow(2).sum() for y in b))
    return 1 - dot / (na * nb + 1e-12)


def euclidean(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences (DLG)."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV, as the Inverting Gradients repository: mean |dx| + mean |dy|."""
    return ((x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())


def idlg_label(gradient: Params, last_weight: str = "head.weight") -> torch.Tensor:
    """iDLG (Zhao et al. 2020): for one image, the true class is the row of the last layer's
    weight gradient with the smallest (the only negative) sum, since the layer's inputs are
    non-negative after a ReLU-type activation."""
    return gradient[last_weight].sum(dim=1).argmin().view(1)
