"""Inverting Gradients (Geiping et al., NeurIPS 2020, https://arxiv.org/abs/2003.14053): find
images whose gradient points where the uploaded one does: 1 - cosine similarity over all
uploaded tensors, plus total variation; Adam, the step schedule of the paper (x0.1 at 3/8, 5/8
and 7/8 of the iterations), signed gradients, pixels boxed to the data range; restarts keep the
candidate with the lowest loss. Unknown labels are optimized jointly as soft labels (as the
original repository does for several images), and so are tensors the attacker does not know
(Problem.guess, e.g. HyperFL's private head under the server threat model), with their own step
size and schedule (common.optimizer). A feature hint of the upload (analytic.FeatureHint) adds
its term to the loss."""
from __future__ import annotations

import torch

from ...config import AttackConfig
from .common import Problem, Reconstruction, optimizer, step_schedule, total_variation


def inverting_gradients(p: Problem, a: AttackConfig, seed: int = 0, bar=None,
                        signed: bool = True, start: torch.Tensor | None = None
                        ) -> Reconstruction:
    """Reconstruct the client's images (normalized, like the model's inputs) with
    `a.iterations` steps per restart; `bar` (progress.progress) counts iterations. The kept
    candidate is the one whose loss was lowest, at the point where that loss was measured.
    `start`: the images every restart starts from instead of random ones (the basin test)."""
    know = p.know
    dev = p.know.low.device
    n = p.num_images if p.labels is None else len(p.labels)
    best = Reconstruction(None, None, float("inf"))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(a.restarts):
        x = torch.randn(n, *know.shape, generator=gen).to(dev)
        x = (x if start is None else start.detach().clone()).requires_grad_()
        y = (torch.randn(n, p.num_classes, generator=gen).to(dev).requires_grad_()
             if p.labels is None else p.labels)
        unknown = p.unknowns(frozen=a.unknowns_lr == 0)
        opt, sched = optimizer(a, [x], [y] if p.labels is None else [], unknown,
                               step_schedule(a.iterations))
        for _ in range(a.iterations):
            opt.zero_grad()
            loss = p.distance(x, y, unknown) + a.tv * total_variation(x) + p.penalty(x)
            loss.backward()
            best = best.keep(x, y, loss.item(), unknown)
            if signed:
                x.grad.sign_()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, know.high), know.low)
            if bar is not None:
                bar.update()
    return best
