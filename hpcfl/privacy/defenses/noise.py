"""DP-G / DP-L as attack papers call them (breaching's and GIFD's noise defenses:
JonasGeiping/breaching, ffhibnese/GIFD_Gradient_Inversion_Attack): the whole update clipped to
L2 norm privacy.update_clip, then i.i.d. Gaussian (std privacy.noise) or Laplacian (scale
privacy.noise) noise on every entry. An absolute noise scale, not a DP guarantee (that is the
dpfedavg baseline)."""
from __future__ import annotations

import torch

from ...algorithms import Params
from ...engine import ClientUpload
from .base import Defense, device_of


def clip_update(upload: Params, bound: float) -> Params:
    """The whole update scaled to L2 norm at most `bound` (0: unclipped)."""
    if bound <= 0:
        return dict(upload)
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in upload.values()))
    scale = float(torch.clamp(bound / (norm + 1e-12), max=1.0))
    return {k: v * scale for k, v in upload.items()}


class DPGaussian(Defense):
    name = "dp_gaussian"

    def draw(self, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=gen)

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        out = clip_update(upload, self.cfg.update_clip)
        gen = self.stream(client.round, client.client, device_of(out))
        return {k: v + self.cfg.noise * self.draw(v, gen) for k, v in out.items()}


class DPLaplace(DPGaussian):
    name = "dp_laplace"

    def draw(self, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Laplace(0, 1) = E1 - E2, E exponential(1): a seeded draw
        e = torch.empty((2, *like.shape), device=like.device, dtype=like.dtype)
        e.exponential_(generator=gen)
        return e[0] - e[1]
