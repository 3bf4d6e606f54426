"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019, https://arxiv.org/abs/1906.08935):
L-BFGS on dummy images and dummy soft labels jointly, minimizing the squared distance between
their gradient and the uploaded one."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .common import Knowledge, Params, euclidean


def dlg(know: Knowledge, target: list[torch.Tensor], num_images: int, num_classes: int,
        guess: Params | None = None, iterations: int = 300, lr: float = 1.0, seed: int = 0,
        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns the images (normalized, like the model's inputs), their labels (argmax of the
    soft labels) and the final gradient distance. `guess`: tensors the attacker does not know,
    optimized jointly from these starting values."""
    target = [t.detach() for t in target]
    dev = target[0].device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, *know.shape, generator=gen).to(dev).requires_grad_()
    y = torch.randn(num_images, num_classes, generator=gen).to(dev).requires_grad_()
    unknown = {k: v.detach().clone().requires_grad_() for k, v in (guess or {}).items()}
    opt = torch.optim.LBFGS([x, y, *unknown.values()], lr=lr)

    def closure():
        opt.zero_grad()
        loss = euclidean(know.gradient(x, y, unknown), target)
        loss.backward()
        return loss

    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(iterations), disable=not progress, unit="it", leave=False):
        loss = opt.step(closure)
        if not torch.isfinite(loss):  # L-BFGS diverged: keep what it had
            break
    return x.detach(), y.detach().argmax(-1), loss.item()
