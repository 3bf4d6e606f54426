"""Defenses against gradient inversion: transforms of one client's upload, applied on the
client's device after its local training and before the round's sum (DESIGN §8), so that the
server, and every attack, sees only defended uploads. Each draws its randomness from (seed,
round, client) and sees nothing but its own client's upload, model state and data.

References (shared/research/privacy.md §6): breaching's and GIFD's DP-style noise (absolute
scale, what attack papers call DP-G / DP-L), top-k compression, Soteria (Sun et al., CVPR 2021,
github jeremy313/Soteria).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ConfigError, PrivacyConfig, RunConfig
from ..engine import model_inputs
from . import gradienthide, random_slice
from .gradienthide import PublicSet

Params = dict[str, torch.Tensor]
DEFENSE_STREAM = 7  # the defenses' random stream: (seed, 7, round, client), see generator()
REPRESENTATION_LAYER = "head.weight"  # Soteria's layer: its input is the representation


@dataclass
class ClientView:
    """What a defense may see of the client it defends: who it is (for its random stream), the
    state it started the round from, its algorithm (model, phases) and its images, and what the
    defense computed once for the run (random_slice's slices, gradienthide's public set)."""
    seed: int
    round: int
    client: int
    start: Params                   # the client's state before local training
    trained: Params                 # and after it
    algo: object                    # the client's Algorithm
    inputs: torch.Tensor | None     # the client's training images, normalized
    once: Slicing | PublicSet | None = None  # computed once per run (defense_context)


def defense_stream(seed: int, rnd: int, cid: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed, DEFENSE_STREAM, rnd, cid]).generate_state(1)
    return torch.Generator(device=device).manual_seed(int(state[0]))


def generator(view: ClientView, device: torch.device) -> torch.Generator:
    return defense_stream(view.seed, view.round, view.client, device)


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
        return view.algo.features(params, img[None])[0]

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


@dataclass
class Slicing:
    """random_slice's slices of the flattened upload (tensors in `names` order)."""
    names: list[str]
    sizes: list[int]
    bounds: np.ndarray
    # the slice of every entry of each tensor, on this rank's device: made on first use (after
    # rank 0 sent the rest), then reused by every client and round
    _ids: Params | None = field(default=None, repr=False, compare=False)

    def attrs(self) -> dict:
        return dict(random_slice_bounds=self.bounds)

    def entry_ids(self, device: torch.device) -> Params:
        if self._ids is None:
            flat = torch.from_numpy(random_slice.slice_ids(self.bounds)).to(device)
            self._ids = dict(zip(self.names, flat.split(self.sizes)))
        return self._ids


ROOT_PER_CLASS = 5  # GradDefense's root set: 5 images per class


def slicing(cfg: RunConfig, algo, device: torch.device) -> Slicing:
    """The slices of random_slice, from the sensitivities of the uploaded tensors (at the
    initial state) on a root set of ROOT_PER_CLASS public images per class."""
    x, y, _ = gradienthide.public_images(cfg, device)
    idx = torch.cat([torch.nonzero(y == c)[:ROOT_PER_CLASS, 0] for c in torch.unique(y)])
    shared = algo.init_shared()
    names = list(shared)
    params = {k: v.to(device) for k, v in {**shared, **algo.init_client(0)}.items()}
    sens = random_slice.sensitivities(algo.forward, params, names, x[idx], y[idx])
    sizes = [params[k].numel() for k in names]
    return Slicing(names, sizes, random_slice.slice_bounds(sizes, sens, cfg.privacy.slices))


def chosen_slices(cfg: PrivacyConfig, gen: torch.Generator) -> torch.Tensor:
    """The client's perturbed slices this round: the first draw of its defense stream."""
    return torch.randperm(cfg.slices, generator=gen, device=gen.device)[:cfg.slices_perturbed]


def slice_noise(upload: Params, view: ClientView, cfg: PrivacyConfig) -> Params:
    gen = generator(view, next(iter(upload.values())).device)
    chosen = chosen_slices(cfg, gen)
    s = view.once
    return random_slice.perturb(upload, s.names, s.bounds, chosen.cpu(), cfg.slice_noise, gen)


def slice_clip(cfg: RunConfig, once: Slicing, rnd: int, cids: list[int],
               device: torch.device) -> random_slice.SliceClip:
    """random_slice's per-sample clipping (privacy.slice_clip) of clients `cids` in round
    `rnd`, on the slices slice_noise perturbs after their training."""
    p = cfg.privacy
    chosen = torch.zeros(len(cids), p.slices, dtype=torch.bool, device=device)
    for i, cid in enumerate(cids):
        chosen[i, chosen_slices(p, defense_stream(cfg.train.seed, rnd, cid, device))] = True
    return random_slice.SliceClip(once.entry_ids(device), chosen, p.slice_clip)


def compensate_(cfg: PrivacyConfig, upload_sum: torch.Tensor, weights: list[float]) -> None:
    """The server's side of random_slice, in place: the round's sum of uploads weighted by
    `weights` (flat) with the noise bulk of its mean projected out (unchanged without
    compensation)."""
    if not cfg.compensate or not weights:
        return
    total = sum(weights)
    var = (cfg.slices_perturbed / cfg.slices * cfg.slice_noise ** 2
           * sum(w * w for w in weights) / total ** 2)
    upload_sum.copy_(random_slice.denoise(upload_sum / total, var) * total)


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
    if cfg.defense == "random_slice":
        return slice_noise(upload, view, cfg)
    if cfg.defense == "gradienthide":
        lrs = dict(zip(view.algo.phases()[-1].names, view.algo.phases()[-1].lrs))
        gen = generator(view, view.once.x.device)
        return gradienthide.hide(upload, view.trained, view.algo.forward, lrs, view.once,
                                 cfg.hide_batch, gen)
    raise ValueError(f"unknown defense {cfg.defense!r}")


class ClientDefense:
    """The engine's hook for one round: called with (upload, client id, its state before and
    after local training) it gives the upload the server receives; `per_sample(cids)` is what
    a defense does to per-sample gradients at every local step of those clients (None: it
    does nothing there, and training needs no per-sample gradients)."""

    def __init__(self, cfg: RunConfig, algo, clients: dict, rnd: int,
                 once: Slicing | PublicSet | None):
        self.cfg, self.algo, self.clients, self.rnd, self.once = cfg, algo, clients, rnd, once

    def __call__(self, upload: Params, cid: int, start: Params, trained: Params) -> Params:
        p, c = self.cfg.privacy, self.clients[cid]
        inputs = model_inputs(c, c.x_train) if p.defense == "soteria" else None
        view = ClientView(self.cfg.train.seed, self.rnd, cid, start, trained, self.algo,
                          inputs, self.once)
        return defend(upload, view, p)

    def per_sample(self, cids: list[int]) -> random_slice.SliceClip | None:
        p = self.cfg.privacy
        if p.defense != "random_slice" or p.slice_clip <= 0:
            return None
        return slice_clip(self.cfg, self.once, self.rnd, cids,
                          self.clients[cids[0]].y_train.device)


def client_defense(cfg: RunConfig, algo, clients: dict, rnd: int,
                   once: Slicing | PublicSet | None = None) -> ClientDefense | None:
    """The engine's hook for round `rnd`; None without a defense."""
    return None if cfg.privacy.defense == "none" else ClientDefense(cfg, algo, clients, rnd,
                                                                      once)
