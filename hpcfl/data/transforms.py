"""A batch as the model sees it: pixels turned into floats and normalized with the dataset's
mean and std, and the official CIFAR/CINIC training augmentation (random crop with padding 4,
then horizontal flip) on the device, its draws given (streams.Stream.AUGMENT)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from . import ClientData

CROP_PAD = 4  # official CIFAR/CINIC transform: RandomCrop(32, padding=4) + RandomHorizontalFlip


def crop_flip_draws(gen: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3): crop offsets dy, dx in [0, 2 * CROP_PAD] and a flip bit, for n samples."""
    return torch.cat([torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=gen),
                      torch.randint(0, 2, (n, 1), generator=gen)], dim=1)


def crop_flip(x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Random crop with zero padding, then horizontal flip, of a batch (N, C, H, W) on its
    device. The data is already normalized, so padding is the mean colour (torchvision pads the
    raw image with black before normalizing)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (CROP_PAD,) * 4)
    draws = draws.to(x.device)
    rows = (draws[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (draws[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(draws[:, 2].bool().view(n, 1, 1, 1), out.flip(-1), out)


def model_inputs(data: ClientData, x: torch.Tensor,
                 draws: torch.Tensor | None = None) -> torch.Tensor:
    """A batch as the model sees it. Pixels (uint8 become floats in [0, 1]) are cropped/flipped
    (padding black, as torchvision) and normalized with the dataset's mean and std, as the
    official transforms; synthetic data is normalized already (crop pads its mean). On a CPU
    the images come channels-last (NHWC): oneDNN's convolutions and max-pooling then run 1.45x
    faster on the CIFAR CNN (docs/performance.md); the same math, rounded in another order."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if draws is not None:
        x = crop_flip(x, draws)
    x = x if data.mean is None else (x - data.mean) / data.std
    if x.dim() == 4 and x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
