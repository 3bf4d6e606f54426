"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019, https://arxiv.org/abs/1906.08935):
L-BFGS on dummy images and dummy soft labels jointly, minimizing the squared distance between
their gradient and the uploaded one."""
from __future__ import annotations

import torch

from ...config import AttackConfig
from .common import Problem, Reconstruction


def dlg(p: Problem, a: AttackConfig, seed: int = 0, bar=None) -> Reconstruction:
    """Matches p.target as one gradient (DLG's setting). Returns the images (normalized, like
    the model's inputs), their labels (argmax of the soft labels) and the gradient distance of
    the best candidate L-BFGS evaluated (`a.lr`: L-BFGS's step size)."""
    dev = p.know.low.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(p.num_images, *p.know.shape, generator=gen).to(dev).requires_grad_()
    y = torch.randn(p.num_images, p.num_classes, generator=gen).to(dev).requires_grad_()
    # L-BFGS has one step size: the unknowns take it, or stay frozen (attack.unknowns_lr=0)
    unknown = p.unknowns(frozen=a.unknowns_lr == 0)
    opt = torch.optim.LBFGS([x, y, *[t for t in unknown.values() if t.requires_grad]], lr=a.lr)
    best = Reconstruction(None, None, float("inf"))

    def closure():
        nonlocal best
        opt.zero_grad()
        loss = p.distance(x, y, unknown, "euclidean") + p.penalty(x)
        loss.backward()
        best = best.keep(x, y, loss.item(), unknown)  # where this loss was
        return loss

    for _ in range(a.iterations):
        loss = opt.step(closure)
        if bar is not None:
            bar.update()
        if not torch.isfinite(loss):  # L-BFGS diverged: keep the best it had
            break
    return best
