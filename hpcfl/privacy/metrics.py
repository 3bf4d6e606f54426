"""How much an attack recovered: PSNR and SSIM (scikit-image's implementations) on [0, 1] images,
each reconstruction matched to its best true image of the batch, and label accuracy.

Images are compared after undoing the normalization (x * std + mean, clamped to [0, 1]), as
breaching and GIFD do: PSNR = 10 log10(1 / MSE) per image over C x H x W, data range 1; SSIM is
the standard Gaussian-window SSIM (sigma 1.5, Wang et al. 2004), not breaching's CW-SSIM. The
batch order of a reconstruction is arbitrary, so reconstructions are assigned to true images by
the Hungarian algorithm on PSNR. LPIPS needs network weights that cannot be downloaded here; it
is not computed.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

LPIPS_NOTE = "LPIPS not computed: its network weights are not available offline"


def to_unit(x: torch.Tensor, mean: torch.Tensor | None = None,
            std: torch.Tensor | None = None) -> np.ndarray:
    """Model inputs (N, C, H, W) back to [0, 1] pixels as float64 numpy."""
    if mean is not None:
        x = x * std.to(x.device) + mean.to(x.device)
    return x.detach().clamp(0, 1).double().cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    # The Gaussian window reaches 3.5 sigma (11 pixels); images smaller than that (8x8 digits)
    # get the widest window that fits.
    radius = min(5, (min(a.shape[1:]) - 1) // 2)
    return float(structural_similarity(b, a, data_range=1.0, channel_axis=0,
                                       gaussian_weights=True, sigma=1.5, truncate=radius / 1.5,
                                       win_size=2 * radius + 1, use_sample_covariance=False))


def match(rec: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """order[i]: the true image assigned to reconstruction i (maximal total PSNR)."""
    scores = np.array([[psnr(r, t) for t in truth] for r in rec])
    rows, cols = linear_sum_assignment(np.nan_to_num(scores, posinf=1e3), maximize=True)
    return cols[np.argsort(rows)]


def label_accuracy(rec: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of the labels recovered, as multisets (order-free, as breaching counts it)."""
    c = int(max(rec.max(), truth.max())) + 1
    diff = (torch.bincount(rec.cpu(), minlength=c) - torch.bincount(truth.cpu(), minlength=c))
    return 1.0 - 0.5 * float(diff.abs().sum()) / len(truth)


def image_scores(rec: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per reconstruction: PSNR and SSIM against its matched true image, and that image's
    index."""
    order = match(rec, truth)
    return dict(psnr=np.array([psnr(r, truth[j]) for r, j in zip(rec, order)]),
                ssim=np.array([ssim(r, truth[j]) for r, j in zip(rec, order)]),
                matched=order)
