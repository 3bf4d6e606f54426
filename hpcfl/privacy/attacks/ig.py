"""Inverting Gradients (Geiping et al., NeurIPS 2020, https://arxiv.org/abs/2003.14053): find
images whose gradient points where the uploaded one does: 1 - cosine similarity over all
uploaded tensors, plus total variation; Adam, the step schedule of the paper (x0.1 at 3/8, 5/8
and 7/8 of the iterations), signed gradients, pixels boxed to the data range; restarts keep the
candidate with the lowest loss."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .common import Knowledge, cosine_distance, total_variation


def inverting_gradients(know: Knowledge, target: list[torch.Tensor], labels: torch.Tensor,
                        iterations: int = 4800, lr: float = 0.1, tv: float = 1e-4,
                        restarts: int = 1, signed: bool = True, seed: int = 0,
                        multi_step: bool = False,
                        progress: bool = False) -> tuple[torch.Tensor, float]:
    """Reconstruct len(labels) images (normalized, like the model's inputs); returns them and
    their loss. `target`: the uploaded update with `multi_step` (matched by simulating the
    client's local steps, Knowledge.update), else a gradient (e.g. gradient_from_update)."""
    observe = know.update if multi_step else know.gradient
    target = [t.detach() for t in target]
    dev = target[0].device
    best, best_loss = None, float("inf")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        x = torch.randn(len(labels), *know.shape, generator=gen).to(dev).requires_grad_()
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        trial, trial_loss = x.detach().clone(), float("inf")
        for _ in tqdm(range(iterations), disable=not progress, unit="it", leave=False):
            opt.zero_grad()
            loss = cosine_distance(observe(x, labels), target) + tv * total_variation(x)
            loss.backward()
            if signed:
                x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, know.high), know.low)
            if loss.item() < trial_loss:
                trial, trial_loss = x.detach().clone(), loss.item()
        if trial_loss < best_loss:
            best, best_loss = trial, trial_loss
    return best, best_loss
