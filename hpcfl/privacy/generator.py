"""A small class-conditional DCGAN for GAN-prior attacks (GIFD), trained by hpcfl itself.

GIFD (Fang et al., ICCV 2023) searches a pretrained generator's latent and then its intermediate
feature maps; no GAN weights can be downloaded here, so the attacker trains its own on public
data (GIFD's own code: ffhibnese/GIFD_Gradient_Inversion_Attack). The generator is split into
stages so that an attack can start from any intermediate feature map: `features(z, classes, k)`
runs the first k stages, `finish(h, k)` the rest. Images come out in [-1, 1].
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..oneline import one_line


class Generator(nn.Module):
    """(latent z, class weights) -> image. Stage 0 maps [z, embedding of the class weights] to
    a 4x4 feature map; each following stage doubles the resolution; the last makes the image.
    Class weights are one-hot for a known class, or any mixture (GIFD's label mapping when the
    generator's classes are not the target's)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, latent: int = 64,
                 width: int = 32):
        super().__init__()
        c, h, w = shape
        ups = round(math.log2(h)) - 2
        if h != w or ups < 1 or 4 * 2 ** ups != h:
            raise ValueError(f"the generator makes square images of 8, 16, 32... pixels, not "
                             f"{h}x{w}")
        self.shape, self.num_classes, self.latent, self.width = shape, num_classes, latent, width
        chans = [width * 2 ** (ups - i) for i in range(ups + 1)]  # 4x4 ... full size
        self.embed = nn.Linear(num_classes, latent, bias=False)
        self.stem = nn.Linear(2 * latent, chans[0] * 16)
        self.stem_norm = nn.Sequential(nn.BatchNorm2d(chans[0]), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 3, padding=1),
                          nn.BatchNorm2d(b), nn.ReLU()) for a, b in zip(chans, chans[1:]))
        self.to_image = nn.Sequential(nn.Conv2d(chans[-1], c, 3, padding=1), nn.Tanh())

    @property
    def num_stages(self) -> int:
        """Feature maps an attack can search, after the latent: the 4x4 one and each block's."""
        return len(self.blocks) + 1

    def features(self, z: torch.Tensor, classes: torch.Tensor, k: int) -> torch.Tensor:
        """The feature map after stage k (k = 1: the 4x4 map; k = num_stages: full size)."""
        h = self.stem(torch.cat([z, self.embed(classes)], 1))
        h = self.stem_norm(h.view(len(z), -1, 4, 4))
        for block in self.blocks[:k - 1]:
            h = block(h)
        return h

    def advance(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The feature map after stage k from the one after stage k - 1 (k >= 2)."""
        return self.blocks[k - 2](h)

    def finish(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The image from the feature map after stage k."""
        for block in self.blocks[k - 1:]:
            h = block(h)
        return self.to_image(h)

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.finish(self.features(z, classes, 1), 1)

    def spec(self) -> dict:
        return dict(shape=list(self.shape), num_classes=self.num_classes, latent=self.latent,
                    width=self.width)


class Discriminator(nn.Module):
    """Spectrally normalized strided convolutions to 4x4, a linear score plus a projection of
    the class embedding (Miyato & Koyama 2018)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, _ = shape
        downs = round(math.log2(h)) - 2
        chans = [width * 2 ** i for i in range(downs + 1)]
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(c, width, 3, padding=1)), nn.LeakyReLU(0.2),
            *[m for a, b in zip(chans, chans[1:]) for m in (
                spectral_norm(nn.Conv2d(a, b, 4, 2, 1)), nn.LeakyReLU(0.2))])
        feat = chans[-1] * 16
        self.score = spectral_norm(nn.Linear(feat, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, feat))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x).flatten(1)
        return self.score(h).squeeze(1) + (self.embed(y) * h).sum(1)


def load_generator(path: str, device: torch.device | str = "cpu") -> tuple[Generator, dict]:
    """The generator in a file written by hpcfl.privacy.train_generator, in eval mode, and the
    file's record of how it was trained. Raises ValueError with one line when the file is not
    one."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        gen = Generator(tuple(saved["spec"]["shape"]), saved["spec"]["num_classes"],
                        saved["spec"]["latent"], saved["spec"]["width"])
        gen.load_state_dict(saved["state"])
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (write one with python -m "
                         f"hpcfl.privacy.train_generator)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing line
        raise ValueError(f"{path}: not a generator written by python -m "
                         f"hpcfl.privacy.train_generator ({type(e).__name__}: "
                         f"{one_line(e)})") from None
    return gen.to(device).eval().requires_grad_(False), saved["record"]
