"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019, https://arxiv.org/abs/1906.08935):
L-BFGS on dummy images and dummy soft labels jointly, minimizing the squared distance between
their gradient and the uploaded one."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .common import Knowledge, euclidean


def dlg(know: Knowledge, target: list[torch.Tensor], num_images: int, num_classes: int,
        iterations: int = 300, lr: float = 1.0, seed: int = 0,
        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns the images (normalized, like the model's inputs), their labels (argmax of the
    soft labels) and the final gradient distance."""
    target = [t.detach() for t in target]
    dev = target[0].device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, *know.shape, generator=gen).to(dev).requires_grad_()
    y = torch.randn(num_images, num_classes, generator=gen).to(dev).requires_grad_()
    opt = torch.optim.LBFGS([x, y], lr=lr)

    def closure():
        opt.zero_grad()
        loss = euclidean(know.gradient(x, y), target)
        loss.backward()
        return loss

    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(iterations), disable=not progress, unit="it", leave=False):
        loss = opt.step(closure)
        if not torch.isfinite(loss):  # L-BFGS diverged: keep what it had
            break
    return x.detach(), y.detach().argmax(-1), loss.item()
