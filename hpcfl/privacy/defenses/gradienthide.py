"""GradientHide (ICLR 2026 submission, OpenReview hcL8wbKFB5; only its abstract is
public): after its local training a client takes one more local update on
public data before it uploads, hiding what its private images left in the update. The public
images get labels from a labeler; the paper uses CLIP zero-shot.

Our choices where the abstract is silent: the public data is the run's public split
(data.public_fraction, held out from every client); the extra update is one plain SGD step (the
last phase's learning rates, no momentum, no weight decay) of the uploaded tensors on a batch of
privacy.hide_batch public images drawn from (seed, round, client); the client's private state
is not changed by it. Labeler (privacy.hide_labeler): CLIP zero-shot as the paper
(privacy.zero_shot, weights already on this machine), or `public_model`, the run's CNN trained on
the public split for LABELER_EPOCHS epochs, then labelling it; `auto` takes CLIP where it can.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...algorithms import Params
from ...config import ConfigError, DataConfig, PrivacyConfig
from ...data import class_names
from ...engine import ClientUpload
from ...models import build_model
from .. import zero_shot
from .base import Defense, Setup
from .public import public_images

log = logging.getLogger("hpcfl")

LABELER_EPOCHS = 20


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


def hide(upload: Params, trained: Params, forward, lrs: dict[str, float], x: torch.Tensor,
         y: torch.Tensor, batch: int, gen: torch.Generator) -> Params:
    """The upload after one SGD step, from the client's trained state, of the uploaded tensors
    on `batch` of the public images x labelled y."""
    params = {k: v.detach().requires_grad_(k in upload and k in lrs) for k, v in trained.items()}
    idx = torch.randperm(len(y), generator=gen, device=gen.device)[:batch]
    idx = idx.to(y.device)
    loss = F.cross_entropy(forward(params, x[idx]), y[idx])
    names = [k for k in upload if k in lrs]
    grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))
    return {k: (upload[k] - lrs[k] * grads[k]) if k in grads else upload[k] for k in upload}


@dataclass
class Labeler:
    """gradienthide's labeler: CLIP (`clip` set, prompted with `class_names`) or the public
    model; `fell_back` says why privacy.hide_labeler=auto did not use CLIP."""
    clip: zero_shot.ClipWeights | None = None
    class_names: list[str] | None = None
    fell_back: str = ""

    @property
    def name(self) -> str:
        return self.clip.describe() if self.clip else "public_model"


def choose_labeler(p: PrivacyConfig, data: DataConfig) -> Labeler:
    """The labeler privacy.hide_labeler asks for; ConfigError if it cannot run."""
    if p.hide_labeler == "public_model":
        return Labeler()
    names = class_names(data)
    found = (zero_shot.find_clip(p) if names else
             f"data.name={data.name} has no class names to prompt CLIP with")
    if isinstance(found, zero_shot.ClipWeights):
        return Labeler(found, names)
    if p.hide_labeler == "clip":
        raise ConfigError(f"privacy.hide_labeler=clip: {found}; or "
                          "privacy.hide_labeler=public_model")
    return Labeler(fell_back=found)


@dataclass
class PublicLabels:
    """What rank 0 prepares for every rank: the public images' labels and who gave them."""
    labels: np.ndarray
    labeler: str
    fell_back: str


class GradientHide(Defense):
    name = "gradienthide"

    def check(self, data: DataConfig, algo) -> None:
        if data.public_fraction <= 0:
            raise ConfigError("privacy.defense=gradienthide needs public images: set "
                              "data.public_fraction (e.g. 0.1)")

    def prepare(self, setup: Setup) -> PublicLabels:
        labeler = choose_labeler(self.cfg, setup.data)
        if labeler.fell_back:
            log.warning("gradienthide: no CLIP (%s); the public images are labelled by "
                        "public_model", labeler.fell_back)
        x, y, pixels = public_images(setup.data, setup.seed, setup.device)
        if labeler.clip is None:
            labels = public_model_labels(x, y, setup.model, setup.num_classes, setup.seed)
        else:
            try:
                labels = zero_shot.zero_shot(pixels, labeler.class_names, labeler.clip)
            except ValueError as e:  # weights that do not load (zero_shot.load)
                raise ConfigError(f"privacy.hide_labeler: {labeler.name} could not label the "
                                  f"public images: {e}") from None
        return PublicLabels(labels.cpu().numpy(), labeler.name, labeler.fell_back)

    def install(self, state: PublicLabels, setup: Setup) -> None:
        super().install(state, setup)
        self.x, truth, _ = public_images(setup.data, setup.seed, setup.device)
        self.y = torch.from_numpy(state.labels).to(self.x.device)
        self.agreement = float((self.y == truth).float().mean())
        last = setup.algo.phases()[-1]
        self.lrs = dict(zip(last.names, last.lrs))

    def attrs(self) -> dict:
        return dict(gradienthide_labeler=self.state.labeler,
                    gradienthide_label_agreement=self.agreement,
                    gradienthide_public_images=len(self.y))

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        gen = self.stream(client.round, client.client, self.x.device)
        return hide(upload, client.trained, self.algo.forward, self.lrs, self.x, self.y,
                    self.cfg.hide_batch, gen)
