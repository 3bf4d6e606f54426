"""A GAN-prior attack in the spirit of GIFD (Fang et al., ICCV 2023; github
ffhibnese/GIFD_Gradient_Inversion_Attack): the candidate images are a generator's outputs. Stage 0
optimizes the latent (kept on the sphere of its initial norm); stage k then optimizes the
feature map after the generator's k-th stage, starting from stage k - 1's optimized one carried
one stage forward, projected after every step onto an l1 ball around
where it started, of radius `radius * k * ||h_k||_1` (the reference code's absolute radii 1000,
2000, ... were tuned for BigGAN/StyleGAN feature sizes; this scales them to any generator). The
loss is Inverting Gradients' (cosine gradient distance + TV) with Adam and the ILO learning-rate
ramp of the reference code; the lowest-loss image over all stages and restarts is kept (the
reference code's stage-wise best-of). The iterations are shared evenly by the stages, so the
budget is that of `inverting_gradients` with the same iterations.

Label mapping: with as many classes as the target, the generator's class input is the
(recovered or optimized) label; otherwise it is a free mixture of the generator's classes,
optimized with the latent.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import AttackConfig
from ..generator import Generator
from .common import Problem, Reconstruction, optimizer, total_variation


def project_l1(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Each sample's row of `delta` projected onto the l1 ball of its radius (Duchi et al.
    2008, the sort-based projection of the reference code)."""
    flat = delta.flatten(1)
    mag = flat.abs()
    inside = mag.sum(1) <= radius
    u = mag.sort(1, descending=True).values
    css = u.cumsum(1)
    j = torch.arange(1, u.shape[1] + 1, device=u.device)
    rho = ((u - (css - radius[:, None]) / j) > 0).sum(1, keepdim=True)
    theta = (css.gather(1, rho - 1) - radius[:, None]) / rho
    out = torch.sign(flat) * (mag - theta).clamp(min=0)
    return torch.where(inside[:, None], flat, out).view_as(delta)


def ramp(t: float) -> float:
    """The ILO/PULSE schedule of the reference code: warm up over 5 %, cosine down over the
    last 75 % (t: the fraction of the stage done)."""
    down = min(1.0, (1 - t) / 0.75)
    return (0.5 - 0.5 * math.cos(math.pi * down)) * min(1.0, t / 0.05)


def gifd(p: Problem, a: AttackConfig, generator: Generator, seed: int = 0,
         bar=None) -> Reconstruction:
    """Reconstruct the client's images from p.target (as inverting_gradients) with the
    generator as the prior; `a.iterations` are shared by its stages. Stage k starts from the
    features stage k - 1 optimized (its latent's for k = 1), carried one stage forward."""
    dev = p.know.low.device
    labels, num_classes = p.labels, p.num_classes
    n = p.num_images if labels is None else len(labels)
    same_classes = generator.num_classes == num_classes
    stages = generator.num_stages + 1
    per_stage = max(a.iterations // stages, 1)
    gen = torch.Generator().manual_seed(seed)
    know = p.know

    def to_inputs(img: torch.Tensor) -> torch.Tensor:  # tanh output -> normalized pixels
        return know.low + (img + 1) / 2 * (know.high - know.low)

    best = Reconstruction(None, None, float("inf"))
    for _ in range(a.restarts):
        z = torch.randn(n, generator.latent, generator=gen).to(dev).requires_grad_()
        z_norm = z.detach().norm(dim=1, keepdim=True)
        y = (torch.randn(n, num_classes, generator=gen).to(dev).requires_grad_()
             if labels is None else labels)
        mix = torch.zeros(n, generator.num_classes, device=dev, requires_grad=not same_classes)
        unknown = p.unknowns(frozen=a.unknowns_lr == 0)
        soft = [y] if labels is None else []

        def classes() -> torch.Tensor:
            if not same_classes:
                return F.softmax(mix, -1)
            return (F.one_hot(labels, num_classes).float() if labels is not None
                    else F.softmax(y, -1))

        var = z
        for k in range(stages):
            if k == 0:
                start = None
                image = lambda: generator(z, classes())  # noqa: E731
            else:
                with torch.no_grad():
                    start = (generator.features(z, classes(), 1) if k == 1
                             else generator.advance(var, k))
                var = start.clone().requires_grad_()
                r = a.radius * k * start.flatten(1).abs().sum(1)
                image = lambda: generator.finish(var, k)  # noqa: E731,B023
            images = [var, *([mix] if k == 0 and not same_classes else [])]
            opt, sched = optimizer(a, images, soft, unknown,
                                   lambda i: ramp(i / per_stage))  # noqa: B023
            for _ in range(per_stage):
                x = to_inputs(image())
                loss = p.distance(x, y, unknown) + a.tv * total_variation(x) + p.penalty(x)
                best = best.keep(x, y, loss.item(), unknown)  # before the step
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    if k == 0:  # the reference code's spherical projection of the latent
                        z.mul_(z_norm / z.norm(dim=1, keepdim=True))
                    else:
                        var.copy_(start + project_l1(var - start, r))
                if bar is not None:
                    bar.update()
            if k == 0:
                z = z.detach()
            var = var.detach()
    return best
