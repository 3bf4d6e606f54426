"""Inverting Gradients (Geiping et al., NeurIPS 2020, https://arxiv.org/abs/2003.14053): find
images whose gradient points where the uploaded one does: 1 - cosine similarity over all
uploaded tensors, plus total variation; Adam, the step schedule of the paper (x0.1 at 3/8, 5/8
and 7/8 of the iterations), signed gradients, pixels boxed to the data range; restarts keep the
candidate with the lowest loss. Unknown labels are optimized jointly as soft labels (as the
original repository does for several images), and so are tensors the attacker does not know
(`guess`, e.g. HyperFL's private embedding and head under the server threat model)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .common import Knowledge, Params, cosine_distance, total_variation


def inverting_gradients(know: Knowledge, target: list[torch.Tensor],
                        labels: torch.Tensor | None, num_images: int = 1, num_classes: int = 10,
                        guess: Params | None = None, iterations: int = 4800, lr: float = 0.1,
                        tv: float = 1e-4, restarts: int = 1, signed: bool = True, seed: int = 0,
                        multi_step: bool = False, progress: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Reconstruct the client's images (normalized, like the model's inputs); returns them,
    their labels (given, or recovered) and the loss. `target`: the uploaded update with
    `multi_step` (matched by simulating the client's local training, Knowledge.update), else a
    gradient (e.g. gradient_from_update)."""
    observe = know.update if multi_step else know.gradient
    target = [t.detach() for t in target]
    dev = target[0].device
    n = num_images if labels is None else len(labels)
    best, best_loss = None, float("inf")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(restarts):
        x = torch.randn(n, *know.shape, generator=gen).to(dev).requires_grad_()
        y = (torch.randn(n, num_classes, generator=gen).to(dev).requires_grad_()
             if labels is None else labels)
        unknown = {k: v.detach().clone().requires_grad_() for k, v in (guess or {}).items()}
        extra = list(unknown.values()) + ([y] if labels is None else [])
        opt = torch.optim.Adam([x, *extra], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        trial, trial_loss = None, float("inf")
        for _ in tqdm(range(iterations), disable=not progress, unit="it", leave=False):
            opt.zero_grad()
            loss = (cosine_distance(observe(x, y, unknown), target)
                    + tv * total_variation(x))
            loss.backward()
            if signed:
                x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, know.high), know.low)
            if loss.item() < trial_loss:
                trial, trial_loss = (x.detach().clone(), y.detach().argmax(-1)
                                     if labels is None else labels), loss.item()
        if trial_loss < best_loss:
            best, best_loss = trial, trial_loss
    return best[0], best[1], best_loss
