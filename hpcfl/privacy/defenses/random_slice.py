"""Random-slice perturbation with global compensation: GradDefense (Wang, Guo, Xie, Qi, "Protect
Privacy from Gradient Leakage Attack in Federated Learning", INFOCOM 2022; official code github
wangjunxiao/GradDefense at ffc37d4: sensitivity.py, perturb.py, compensate.py).

1. Once, on a root set (5 public images per class): each uploaded tensor's sensitivity, the mean
   over images of ||d(sum of the tensor's gradient)/d image||, and from it M slices of the
   flattened upload holding about equal total sensitivity (each entry of a tensor carries its
   tensor's sensitivity / its size; the official code packs gcd-sized atoms greedily, which
   gives the same boundaries up to an atom).
2. Per client and round: m of the M slices drawn at random get i.i.d. N(0, sigma^2) noise.
   Optionally (the official clip.py, privacy.slice_sample_clip), at every local step each
   sample's gradient restricted to each of those m slices is first clipped to L2 norm C
   (clip_slices).
3. The server denoises the aggregate (random-matrix theory): the mean update as a V x W matrix
   (W = round(sqrt(length / Q)), V = ceil(length / W), the last row padded with < W zeros),
   the eigenvectors of its W x W
   covariance inside the Marchenko-Pastur bulk of the noise, [(1 - 1/sqrt Q)^2, (1 + 1/sqrt Q)^2]
   * sigma_agg^2, projected out. sigma_agg^2 is the variance of the noise in an entry of the
   weighted mean, (m / M) * sigma^2 * sum_k w_k^2 / (sum_k w_k)^2. The official demo uses
   K * (m / M) * sigma^2 (K^2 times more for equal weights): its window then lies above every
   eigenvalue of our CNNs' updates and compensation never removes anything (measured; docs/defenses.md).
   The official V is the smallest factor of the length >= sqrt(Q * length): for a length with a
   large prime factor (pfl_cnn's 1,626,442 = 2 x 813,221) that is an 813,221 x 2 matrix, whose
   2 x 2 covariance has no noise bulk to find, and the search is O(length) per round. Padding
   keeps V / W = Q for every length at O(1) cost; the < W padded zeros are dropped after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...algorithms import Params
from ...config import ConfigError, DataConfig
from ...engine import ClientUpload, SampleTransform
from .base import Defense, Setup, device_of
from .public import public_images

ROOT_PER_CLASS = 5  # GradDefense's root set: 5 images per class


def sensitivities(forward, params: Params, names: list[str], x: torch.Tensor,
                  y: torch.Tensor) -> np.ndarray:
    """Per tensor in `names`: mean over the images of ||d (sum of its gradient) / d x_i||."""
    p = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
    x = x.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(forward(p, x), y)
    grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=True)
    out = []
    for g in grads:
        (jac,) = torch.autograd.grad(g.sum(), x, retain_graph=True)
        out.append(jac.flatten(1).norm(dim=1).mean().item())
    return np.array(out)


def slice_bounds(sizes: list[int], sens: np.ndarray, num_slices: int) -> np.ndarray:
    """num_slices + 1 offsets into the flattened upload: slice j is [b[j], b[j+1]), each holding
    about 1/num_slices of the total sensitivity."""
    per_entry = np.repeat(sens / np.array(sizes), sizes)
    cum = np.cumsum(per_entry)
    # (1 - 1e-9): a share reached up to rounding counts as reached
    inner = np.searchsorted(cum, cum[-1] * np.arange(1, num_slices) / num_slices * (1 - 1e-9))
    return np.concatenate([[0], np.maximum.accumulate(inner + 1), [sum(sizes)]])


def slice_ids(bounds: np.ndarray) -> np.ndarray:
    """The slice of every entry of the flattened upload (slices may be empty)."""
    return np.searchsorted(bounds, np.arange(bounds[-1]), side="right") - 1


def clip_slices(grads: Params, ids: Params, chosen: torch.Tensor, bound: float,
                lead: int) -> Params:
    """Per-sample gradients with each sample's part of each chosen slice clipped to L2 norm
    `bound`. grads[n]: (*lead dims, *shape), the samples the last lead dim ((B,) for a client,
    (clients, B) for a group); ids[n]: the slice of each entry of n (flat), for the uploaded
    tensors; chosen: (M,) or (clients, M) bool. Tensors outside `ids` are returned as given."""
    flat = {n: grads[n].flatten(lead) for n in ids}
    lead_shape = next(iter(flat.values())).shape[:-1]
    sq = torch.zeros(*lead_shape, chosen.shape[-1], dtype=torch.float64,
                     device=chosen.device)
    for n, g in flat.items():
        sq.index_add_(lead, ids[n], g.double().pow(2))
    factor = torch.where(chosen.unsqueeze(-2), (bound / (sq.sqrt() + 1e-12)).clamp(max=1.0),
                         torch.ones_like(sq)).to(next(iter(flat.values())).dtype)
    out = dict(grads)
    for n, g in flat.items():
        out[n] = (g * factor.index_select(lead, ids[n])).view_as(grads[n])
    return out


@dataclass
class SliceClip(SampleTransform):
    """clip_slices for given clients: the slice of each entry of the uploaded tensors, each
    client's chosen slices (clients, M) and the bound."""
    ids: Params
    chosen: torch.Tensor
    bound: float

    def touches(self, names) -> bool:
        return any(n in self.ids for n in names)

    def __call__(self, grads: Params, lead: int) -> Params:
        """lead 1: one client's (B, ...) gradients; 2: a group's (clients, B, ...)."""
        chosen = self.chosen[0] if lead == 1 else self.chosen
        return clip_slices(grads, self.ids, chosen, self.bound, lead)


def perturb(upload: Params, names: list[str], bounds: np.ndarray, chosen: torch.Tensor,
            sigma: float, gen: torch.Generator) -> Params:
    """N(0, sigma^2) on the entries of the `chosen` slices of the flattened upload."""
    flat = torch.cat([upload[k].flatten() for k in names])
    for j in chosen.tolist():
        a, b = int(bounds[j]), int(bounds[j + 1])
        flat[a:b] += sigma * torch.randn(b - a, device=flat.device, dtype=flat.dtype,
                                         generator=gen)
    out, start = {}, 0
    for k in names:
        n = upload[k].numel()
        out[k] = flat[start:start + n].view_as(upload[k])
        start += n
    return out


def matrix_shape(length: int, q: float) -> tuple[int, int]:
    """(V, W) with V / W about q and V * W >= length (the rest is padding, < W entries)."""
    w = max(1, round(math.sqrt(length / q)))
    return math.ceil(length / w), w


def denoise(mean: torch.Tensor, noise_var: float, q: float = 6.0) -> torch.Tensor:
    """The flat mean update with the eigen-directions inside the noise bulk projected out;
    `noise_var`: the variance of the noise in each entry of the mean."""
    n = mean.numel()
    v, w = matrix_shape(n, q)
    if w < 2:  # too short for a matrix to denoise
        return mean
    c = torch.nn.functional.pad(mean.double(), (0, v * w - n)).view(v, w)
    vals, vecs = torch.linalg.eigh(torch.cov(c.T))
    q = v / w  # the official code's real_Q
    low, high = (1 - 1 / math.sqrt(q)) ** 2 * noise_var, (1 + 1 / math.sqrt(q)) ** 2 * noise_var
    keep = vecs[:, (vals <= low) | (vals >= high)]
    return (c @ keep @ keep.T).view(-1)[:n].to(mean.dtype)


class RandomSlice(Defense):
    name = "random_slice"

    def check(self, data: DataConfig, algo) -> None:
        if self.cfg.slices_perturbed > self.cfg.slices:
            raise ConfigError(f"privacy.slices_perturbed={self.cfg.slices_perturbed} exceeds "
                              f"privacy.slices={self.cfg.slices}")
        if data.public_fraction <= 0:
            raise ConfigError("privacy.defense=random_slice needs public images for its root "
                              "set: set data.public_fraction (e.g. 0.1)")

    def prepare(self, setup: Setup) -> np.ndarray:
        """The slices' bounds, from the sensitivities of the uploaded tensors (at the initial
        state) on a root set of ROOT_PER_CLASS public images per class."""
        x, y, _ = public_images(setup.data, setup.seed, setup.device)
        idx = torch.cat([torch.nonzero(y == c)[:ROOT_PER_CLASS, 0] for c in torch.unique(y)])
        algo = setup.algo
        shared = algo.init_shared()
        names = list(shared)
        params = {k: v.to(setup.device) for k, v in {**shared, **algo.init_client(0)}.items()}
        sens = sensitivities(algo.forward, params, names, x[idx], y[idx])
        return slice_bounds([params[k].numel() for k in names], sens, self.cfg.slices)

    def install(self, state: np.ndarray, setup: Setup) -> None:
        super().install(state, setup)
        shared = setup.algo.init_shared()
        self.names, self.sizes = list(shared), [v.numel() for v in shared.values()]
        self.bounds, self._ids = state, None

    def entry_ids(self, device) -> Params:
        """The slice of every entry of each uploaded tensor, on the device: made once, used by
        every client and round."""
        if self._ids is None:
            flat = torch.from_numpy(slice_ids(self.bounds)).to(device)
            self._ids = dict(zip(self.names, flat.split(self.sizes)))
        return self._ids

    def attrs(self) -> dict:
        return dict(random_slice_bounds=self.bounds)

    def chosen(self, gen: torch.Generator) -> torch.Tensor:
        """The client's perturbed slices this round: the first draw of its defense stream."""
        return torch.randperm(self.cfg.slices, generator=gen,
                              device=gen.device)[:self.cfg.slices_perturbed]

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        gen = self.stream(client.round, client.client, device_of(upload))
        return perturb(upload, self.names, self.bounds, self.chosen(gen).cpu(),
                       self.cfg.slice_noise, gen)

    def per_sample(self, rnd: int, cids: list[int], device) -> SliceClip | None:
        """privacy.slice_sample_clip: the per-sample clip of clients `cids` in round `rnd`, on
        the slices `upload` perturbs after their training."""
        if self.cfg.slice_sample_clip <= 0:
            return None
        chosen = torch.zeros(len(cids), self.cfg.slices, dtype=torch.bool, device=device)
        for i, cid in enumerate(cids):
            chosen[i, self.chosen(self.stream(rnd, cid, device))] = True
        return SliceClip(self.entry_ids(device), chosen, self.cfg.slice_sample_clip)

    def server(self, upload_sum: torch.Tensor, weights: list[float]) -> None:
        """Global compensation: the noise bulk of the round's mean projected out."""
        if not self.cfg.compensate or not weights:
            return
        total = sum(weights)
        var = (self.cfg.slices_perturbed / self.cfg.slices * self.cfg.slice_noise ** 2
               * sum(w * w for w in weights) / total ** 2)
        upload_sum.copy_(denoise(upload_sum / total, var) * total)
