"""GradientHide (ICLR 2026 submission, OpenReview hcL8wbKFB5; only its abstract is public,
research/privacy.md §6.5): after its local training a client takes one more local update on
public data before it uploads, hiding what its private images left in the update. The public
images get labels from a labeler; the paper uses CLIP zero-shot.

Our choices where the abstract is silent: the public data is the run's public split
(data.public_fraction, held out from every client); the extra update is one plain SGD step (the
last phase's learning rates, no momentum, no weight decay) of the uploaded tensors on a batch of
privacy.hide_batch public images drawn from (seed, round, client); the client's private state
is not changed by it. Labeler (privacy.hide_labeler): CLIP zero-shot as the paper
(clip_labels.py, weights already on this machine), or `public_model`, the run's CNN trained on
the public split for LABELER_EPOCHS epochs, then labelling it; `auto` takes CLIP where it can.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import class_names, load_public
from ..models import build_model
from . import clip_labels

Params = dict[str, torch.Tensor]
LABELER_EPOCHS = 20


@dataclass
class PublicSet:
    """The public images (normalized, on the device) and the labels the labeler gave them."""
    x: torch.Tensor
    y: torch.Tensor
    labeler: str
    agreement: float  # share of labels equal to the public split's true ones

    def attrs(self) -> dict:
        return dict(gradienthide_labeler=self.labeler,
                    gradienthide_label_agreement=self.agreement,
                    gradienthide_public_images=len(self.y))


def public_model_labels(x: torch.Tensor, y: torch.Tensor, model_name: str, num_classes: int,
                        seed: int, batch_size: int = 50) -> torch.Tensor:
    """Labels from the run's CNN trained on (x, y) (SGD 0.05, momentum 0.9)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, tuple(x.shape[1:]), num_classes).to(x.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(LABELER_EPOCHS):
            for idx in torch.randperm(len(y)).split(batch_size):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    with torch.no_grad():
        return model(x).argmax(1)


def hide(upload: Params, trained: Params, forward, lrs: dict[str, float], public: PublicSet,
         batch: int, gen: torch.Generator) -> Params:
    """The upload after one SGD step, from the client's trained state, of the uploaded tensors
    on `batch` public images."""
    params = {k: v.detach().requires_grad_(k in upload and k in lrs) for k, v in trained.items()}
    idx = torch.randperm(len(public.y), generator=gen, device=gen.device)[:batch]
    idx = idx.to(public.y.device)
    loss = F.cross_entropy(forward(params, public.x[idx]), public.y[idx])
    names = [k for k in upload if k in lrs]
    grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))
    return {k: (upload[k] - lrs[k] * grads[k]) if k in grads else upload[k] for k in upload}


def public_images(cfg: RunConfig, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public split normalized as the model's inputs, its true labels, and its pixels in
    [0, 1] (what CLIP is given; the synthetic images, normalized already, stand for both)."""
    x, y, mean, std, _ = load_public(cfg.data, cfg.train.seed, device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x if mean is None else (x - mean) / std), y, x


@dataclass
class Labeler:
    """gradienthide's labeler: CLIP (`clip` set, prompted with `class_names`) or the public
    model; `fell_back` says why privacy.hide_labeler=auto did not use CLIP."""
    clip: clip_labels.ClipWeights | None = None
    class_names: list[str] | None = None
    fell_back: str = ""

    @property
    def name(self) -> str:
        return self.clip.describe() if self.clip else "public_model"


def choose_labeler(cfg: RunConfig) -> Labeler | str:
    """The labeler privacy.hide_labeler asks for, or the one line saying why it cannot run."""
    p = cfg.privacy
    if p.hide_labeler == "public_model":
        return Labeler()
    names = class_names(cfg.data)
    found = (clip_labels.find_clip(p) if names else
             f"data.name={cfg.data.name} has no class names to prompt CLIP with")
    if isinstance(found, clip_labels.ClipWeights):
        return Labeler(found, names)
    if p.hide_labeler == "clip":
        return f"privacy.hide_labeler=clip: {found}; or privacy.hide_labeler=public_model"
    return Labeler(fell_back=found)


def label_public(cfg: RunConfig, labeler: Labeler, x: torch.Tensor, y: torch.Tensor,
                 pixels: torch.Tensor, num_classes: int) -> np.ndarray | str:
    """gradienthide's labels of the public images (rank 0 computes them for every rank), or
    the line saying why CLIP could not label them."""
    if labeler.clip is None:
        return public_model_labels(x, y, cfg.model.name, num_classes,
                                   cfg.train.seed).cpu().numpy()
    try:
        return clip_labels.zero_shot(pixels, labeler.class_names, labeler.clip).cpu().numpy()
    except ValueError as e:  # weights that do not load (clip_labels.load)
        return f"privacy.hide_labeler: {labeler.name} could not label the public images: {e}"


def public_set(x: torch.Tensor, y: torch.Tensor, labels: np.ndarray, labeler: str) -> PublicSet:
    pseudo = torch.from_numpy(labels).to(x.device)
    return PublicSet(x, pseudo, labeler, float((pseudo == y).float().mean()))
