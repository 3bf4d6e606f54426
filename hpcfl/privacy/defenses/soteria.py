"""Soteria (Sun et al., CVPR 2021, github jeremy313/Soteria): the columns of the update of the
layer fed by the representation (head.weight) zeroed for the privacy.soteria_rate percent of
representation units with the smallest score sum over the client's images of
||d r_f / d x|| / |r_f|, at the state the client started the round from.
attack.mute_defended_layer=true leaves that layer out of the attack (the attack that breaks it).
"""
from __future__ import annotations

import torch

from ...algorithms import Params
from ...config import ConfigError, DataConfig
from ...engine import ClientUpload
from .base import Defense

REPRESENTATION_LAYER = "head.weight"  # its input is the representation


def soteria_mask(algo, start: Params, x: torch.Tensor, rate: float) -> torch.Tensor:
    """Soteria's mask over the representation units: 0 for the `rate` percent of units with the
    smallest score sum over images x of ||d r_f / d x|| / |r_f| (the reference code adds 0.1 to
    r_f; we take |r_f| + 1e-10, as its GIFD/GGL port), 1 for the others."""
    params = {k: v.detach() for k, v in start.items()}

    def rep(img):  # one image -> its representation
        return algo.features(params, img[None])[0]

    r = torch.stack([rep(img) for img in x]).detach()  # (B, F)
    jac = torch.func.vmap(torch.func.jacrev(rep))(x)  # (B, F, C, H, W)
    score = (jac.flatten(2).norm(dim=2) / (r.abs() + 1e-10)).sum(0)
    cut = torch.quantile(score, rate / 100)
    return (score > cut).to(r.dtype)


class Soteria(Defense):
    name = "soteria"
    defended = (REPRESENTATION_LAYER,)

    def check(self, data: DataConfig, algo) -> None:
        if REPRESENTATION_LAYER not in algo.init_shared() or not hasattr(algo, "features"):
            raise ConfigError(f"privacy.defense=soteria prunes the upload of "
                              f"{REPRESENTATION_LAYER} (the layer fed by the representation); "
                              f"{algo.name} does not upload it")

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        mask = soteria_mask(self.algo, client.start, client.inputs, self.cfg.soteria_rate)
        return {**upload, REPRESENTATION_LAYER: upload[REPRESENTATION_LAYER] * mask[None, :]}
