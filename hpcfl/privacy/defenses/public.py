"""The public split as the defenses that need it see it (random_slice's root set, gradienthide's
public batch): data.public_fraction of the training split, held out from every client."""
from __future__ import annotations

import torch

from ...config import DataConfig
from ...data import load_public


def public_images(data: DataConfig, seed: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The public split normalized as the model's inputs, its true labels, and its pixels in
    [0, 1] (what CLIP is given; the synthetic images, normalized already, stand for both)."""
    x, y, mean, std, _ = load_public(data, seed, device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return (x if mean is None else (x - mean) / std), y, x
