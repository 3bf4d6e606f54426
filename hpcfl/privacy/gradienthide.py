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

import torch
import torch.nn.functional as F

from ..models import build_model

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
