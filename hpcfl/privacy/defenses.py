"""Defenses against gradient inversion: transforms of one client's upload, applied on the
client's device after its local training and before the round's sum (DESIGN §8), so that the
server, and every attack, sees only defended uploads. Each draws its randomness from (seed,
round, client) and sees nothing but its own client's upload, model state and data.

References (shared/research/privacy.md §6): breaching's and GIFD's DP-style noise (absolute
scale, what attack papers call DP-G / DP-L), top-k compression, Soteria (Sun et al., CVPR 2021,
github jeremy313/Soteria).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, PrivacyConfig, RunConfig
from ..engine import model_inputs

Params = dict[str, torch.Tensor]
DEFENSE_STREAM = 7  # engine.client_generator stream of the defenses' randomness
REPRESENTATION_LAYER = "head.weight"  # Soteria's layer: its input is the representation


@dataclass
class ClientView:
    """What a defense may see of the client it defends: who it is (for its random stream), the
    state it started the round from, its model's representation function and its images."""
    seed: int
    round: int
    client: int
    start: Params                   # the client's state before local training
    features: Callable | None       # (params, x) -> representation r; None if the model has none
    inputs: torch.Tensor | None     # the client's training images, normalized


def generator(view: ClientView, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([view.seed, DEFENSE_STREAM, view.round,
                                    view.client]).generate_state(1)
    return torch.Generator(device=device).manual_seed(int(state[0]))


def clip_update(upload: Params, bound: float) -> Params:
    """The whole update scaled to L2 norm at most `bound` (0: unclipped)."""
    if bound <= 0:
        return dict(upload)
    norm = torch.sqrt(sum(v.double().pow(2).sum() for v in upload.values()))
    scale = float(torch.clamp(bound / (norm + 1e-12), max=1.0))
    return {k: v * scale for k, v in upload.items()}


def dp_noise(upload: Params, view: ClientView, cfg: PrivacyConfig, laplace: bool) -> Params:
    """Clip to privacy.clip, then add i.i.d. Gaussian (std privacy.noise) or Laplacian (scale
    privacy.noise) noise to every entry."""
    out = clip_update(upload, cfg.clip)
    dev = next(iter(out.values())).device
    gen = generator(view, dev)
    for k, v in out.items():
        if laplace:  # Laplace(0, b) = b * (E1 - E2), E exponential(1): a seeded draw
            e = torch.empty((2, *v.shape), device=dev, dtype=v.dtype).exponential_(generator=gen)
            noise = e[0] - e[1]
        else:
            noise = torch.randn(v.shape, device=dev, dtype=v.dtype, generator=gen)
        out[k] = v + cfg.noise * noise
    return out


def topk(upload: Params, ratio: float) -> Params:
    """Keep the ceil(ratio * numel) largest-magnitude entries of each tensor, zero the rest."""
    out = {}
    for k, v in upload.items():
        keep = max(1, int(np.ceil(ratio * v.numel())))
        flat = v.flatten()
        idx = flat.abs().topk(keep).indices
        out[k] = torch.zeros_like(flat).index_copy_(0, idx, flat[idx]).view_as(v)
    return out


def soteria_mask(view: ClientView, rate: float) -> torch.Tensor:
    """Soteria's mask over the representation units: 0 for the `rate` percent of units with the
    smallest score sum over images of ||d r_f / d x|| / |r_f| (the reference code adds 0.1 to
    r_f; we take |r_f| + 1e-10, as its GIFD/GGL port), 1 for the others."""
    x = view.inputs
    params = {k: v.detach() for k, v in view.start.items()}

    def rep(img):  # one image -> its representation
        return view.features(params, img[None])[0]

    r = torch.stack([rep(img) for img in x]).detach()  # (B, F)
    jac = torch.func.vmap(torch.func.jacrev(rep))(x)  # (B, F, C, H, W)
    score = (jac.flatten(2).norm(dim=2) / (r.abs() + 1e-10)).sum(0)
    cut = torch.quantile(score, rate / 100)
    return (score > cut).to(r.dtype)


def soteria(upload: Params, view: ClientView, rate: float) -> Params:
    """Prune the columns of the representation layer's update (the units Soteria scores as
    most revealing); every other tensor unchanged."""
    out = dict(upload)
    out[REPRESENTATION_LAYER] = upload[REPRESENTATION_LAYER] * soteria_mask(view, rate)[None, :]
    return out


DEFENSES = ("none", "dp_gaussian", "dp_laplace", "topk", "soteria")


def check(cfg: RunConfig, algo) -> None:
    """Refuse, in one line, a defense the algorithm's upload cannot take."""
    if cfg.privacy.defense == "soteria" and (REPRESENTATION_LAYER not in algo.init_shared()
                                             or not hasattr(algo, "features")):
        raise ConfigError(f"privacy.defense=soteria prunes the upload of {REPRESENTATION_LAYER} "
                          f"(the layer fed by the representation); {cfg.algorithm.name} does "
                          "not upload it")


def defend(upload: Params, view: ClientView, cfg: PrivacyConfig) -> Params:
    """`upload` as the server receives it under privacy.defense."""
    if cfg.defense == "none" or not upload:
        return upload
    if cfg.defense in ("dp_gaussian", "dp_laplace"):
        return dp_noise(upload, view, cfg, laplace=cfg.defense == "dp_laplace")
    if cfg.defense == "topk":
        return topk(upload, cfg.topk_ratio)
    if cfg.defense == "soteria":
        return soteria(upload, view, cfg.soteria_rate)
    raise ValueError(f"unknown defense {cfg.defense!r}")


def client_defense(cfg: RunConfig, algo, clients: dict, rnd: int) -> Callable | None:
    """The engine's hook for round `rnd`: (upload, client id, its starting state) -> the upload
    the server receives; None without a defense."""
    p = cfg.privacy
    if p.defense == "none":
        return None
    features = getattr(algo, "features", None)

    def apply(upload: Params, cid: int, start: Params) -> Params:
        c = clients[cid]
        inputs = model_inputs(c, c.x_train) if p.defense == "soteria" else None
        return defend(upload, ClientView(cfg.train.seed, rnd, cid, start, features, inputs), p)
    return apply
