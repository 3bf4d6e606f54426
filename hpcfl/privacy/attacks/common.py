"""What every optimization attack shares: the attacker's knowledge, the gradient a candidate
batch would produce, the distances between gradients, total variation, iDLG's label.

References: breaching (github JonasGeiping/breaching) and the original repositories of DLG
(mit-han-lab/dlg), iDLG and Inverting Gradients (JonasGeiping/invertinggradients).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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
    # The client's local training (the algorithm's phases), for attacks on a whole update.
    phases: tuple = ()
    batch_size: int = 0  # 0: every step on all images

    def batches(self, num_images: int, steps: int) -> list[slice]:
        """Which candidate images each of `steps` local steps uses: as breaching's multi-step
        user, step i takes the i-th slice of batch_size images, cyclically (the client's real
        shuffling is unknown to the server)."""
        bs = self.batch_size or num_images
        per_epoch = -(-num_images // bs)
        return [slice((i % per_epoch) * bs, (i % per_epoch + 1) * bs) for i in range(steps)]

    def steps(self, phase, num_images: int) -> int:
        """The local steps `phase` takes on `num_images` images (the server knows the recipe)."""
        bs = self.batch_size or num_images
        return phase.steps or phase.epochs * -(-num_images // bs)

    def trained(self, x: torch.Tensor, y: torch.Tensor, guess: Params | None = None,
                phases=None) -> Params:
        """The client's state after its local training (`phases`, default all) on candidate
        batch (x, y), differentiable in x: every phase's steps with its parameter groups,
        learning rates, per-group gradient clipping, momentum and weight decay
        (torch.optim.SGD), as the engine trains."""
        phases = self.phases if phases is None else phases
        p = {k: v.detach() for k, v in self.params.items()}
        for k in {k for phase in phases for k in phase.names}:
            p[k] = p[k].clone().requires_grad_()
        p.update(guess or {})
        for phase in phases:
            names = phase.names
            # New nodes: a phase differentiates with respect to its tensors as they are now,
            # not through what earlier phases made of them (the head trained in HyperFL's first
            # phase is a constant in its second, as in the client's real training).
            p.update({k: p[k] * 1 for k in names})
            buf: dict[str, torch.Tensor] = {}
            for i, b in enumerate(self.batches(len(x), self.steps(phase, len(x)))):
                loss = label_loss(self.forward(p, x[b]), y[b])
                grads = dict(zip(names, torch.autograd.grad(loss, [p[k] for k in names],
                                                            create_graph=True)))
                if phase.grad_clip > 0:
                    for group in phase.param_groups:
                        norm = torch.sqrt(sum(grads[k].pow(2).sum() for k in group))
                        scale = torch.clamp(phase.grad_clip / (norm + 1e-6), max=1.0)
                        grads.update({k: grads[k] * scale for k in group})
                for k, lr in zip(names, phase.lrs):
                    d = grads[k] + phase.weight_decay * p[k]
                    buf[k] = d if i == 0 or not phase.momentum else phase.momentum * buf[k] + d
                    p[k] = p[k] - lr * buf[k]
        return p

    def update(self, x: torch.Tensor, y: torch.Tensor,
               guess: Params | None = None) -> list[torch.Tensor]:
        """The change of the uploaded tensors after the client's local training on candidate
        batch (x, y) (`trained`), differentiable in x."""
        start = {**self.params, **(guess or {})}
        p = self.trained(x, y, guess)
        return [p[k] - start[k] for k in self.uploaded]

    def gradient(self, x: torch.Tensor, y: torch.Tensor,
                 guess: Params | None = None) -> list[torch.Tensor]:
        """The gradient of the uploaded tensors that batch (x, y) gives, differentiable in x (and
        in y when y holds soft labels, as DLG optimizes them, and in `guess`: the attacker's
        current estimate of tensors it does not know, e.g. HyperFL's private head)."""
        params = {k: v.detach().requires_grad_(k in self.uploaded) for k, v in self.params.items()}
        params.update(guess or {})
        loss = label_loss(self.forward(params, x), y)
        return list(torch.autograd.grad(loss, [params[k] for k in self.uploaded],
                                        create_graph=True))


@dataclass
class Problem:
    """One inversion: what the server knows, what it observed of the client's round (`target`:
    the whole local update with `multi_step`, else one gradient), the client's number of
    images and classes, the labels where they are known (iDLG's), and the tensors the server
    does not know, which it optimizes from `guess` (e.g. HyperFL's private head under the
    server threat)."""
    know: Knowledge
    target: list[torch.Tensor]
    num_images: int
    num_classes: int
    labels: torch.Tensor | None = None
    guess: Params = field(default_factory=dict)
    multi_step: bool = True
    # What the upload says of the images' features in closed form (analytic.FeatureHint): a
    # term of every attack's loss, 0 where the candidate's features are the recovered ones.
    hint: object | None = None

    def penalty(self, x: torch.Tensor) -> torch.Tensor | float:
        """The feature term of the loss at candidate images x (0 without a hint)."""
        return self.hint.loss(x) if self.hint is not None else 0.0

    def observe(self, x: torch.Tensor, y: torch.Tensor, unknown: Params) -> list[torch.Tensor]:
        """What the client would have uploaded (or its gradient) for candidate batch (x, y)."""
        return (self.know.update if self.multi_step else self.know.gradient)(x, y, unknown)

    def distance(self, x: torch.Tensor, y: torch.Tensor, unknown: Params,
                 kind: str = "cosine") -> torch.Tensor:
        """How far candidate batch (x, y) is from explaining the target: 1 - cosine (Inverting
        Gradients, GIFD) or the squared distance (DLG)."""
        got, want = self.observe(x, y, unknown), [t.detach() for t in self.target]
        return (cosine_distance if kind == "cosine" else euclidean)(got, want)

    def unknowns(self, frozen: bool = False) -> Params:
        """Fresh leaves for the unknown tensors, starting from the guess (constants if
        `frozen`)."""
        return {k: v.detach().clone().requires_grad_(not frozen) for k, v in self.guess.items()}


@dataclass
class Reconstruction:
    """An attack's answer: images (normalized, like the model's inputs), their labels, the
    loss at which they were found, and the unknown tensors' values there."""
    x: torch.Tensor | None
    labels: torch.Tensor | None
    loss: float
    unknown: Params = field(default_factory=dict)

    def keep(self, x: torch.Tensor, y: torch.Tensor, loss: float,
             unknown: Params | None = None) -> "Reconstruction":
        """This reconstruction, or (x, y) if its loss is lower (y: labels, or soft labels).
        A non-finite loss counts as infinite, so an attack whose every loss was NaN (a diverged
        upload) still returns its first candidate instead of none."""
        loss = loss if math.isfinite(loss) else float("inf")
        if self.x is not None and not loss < self.loss:
            return self
        labels = y.detach().argmax(-1) if y.dtype.is_floating_point else y
        return Reconstruction(x.detach().clone(), labels, loss,
                              {k: v.detach().clone() for k, v in (unknown or {}).items()})


def label_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; with float y, against softmax(y): labels the attacker optimizes (DLG)."""
    if y.dtype.is_floating_point:
        return torch.mean(torch.sum(-F.softmax(y, -1) * F.log_softmax(logits, -1), -1))
    return F.cross_entropy(logits, y)


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


def idlg_label(gradient: Params, last: str = "head") -> torch.Tensor:
    """iDLG (Zhao et al. 2020) for one image, without its assumption that the last layer's
    inputs f are non-negative (every model here uses leaky ReLU): the layer's gradients are
    db = p - e_y and dW = (p - e_y) f^T, so the true class is the one entry of db below 0;
    without a bias, the row of dW with the largest norm (|p_y - 1| = sum of the other p_c)."""
    if f"{last}.bias" in gradient:
        return gradient[f"{last}.bias"].argmin().view(1)
    return gradient[f"{last}.weight"].norm(dim=1).argmax().view(1)


def optimizer(a, images: list[torch.Tensor], labels: list[torch.Tensor], unknown: Params,
              images_factor) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the candidate images and soft labels (step size a.lr, schedule images_factor
    of the iteration) and the unknown tensors (their own step size a.unknowns_lr and schedule
    a.unknowns_schedule: constant, or the images'; none with a.unknowns_lr = 0: frozen). The
    unknowns start exactly where the upload put them (HyperFL's embedding) or from a public
    guess; at the images' step size Adam moves each of their entries by ~a.lr per iteration,
    and a recovery of 1e-7 would be lost in the first iterations."""
    groups = [{"params": images + labels, "lr": a.lr}]
    factors = [images_factor]
    if unknown and a.unknowns_lr > 0:
        groups.append({"params": list(unknown.values()), "lr": a.unknowns_lr})
        factors.append(images_factor if a.unknowns_schedule == "images" else (lambda i: 1.0))
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factors)


def step_schedule(iterations: int):
    """Inverting Gradients' schedule: x0.1 at 3/8, 5/8 and 7/8 of the iterations."""
    marks = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    return lambda i: 0.1 ** sum(i >= m for m in marks)
