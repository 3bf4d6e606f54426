"""Gradient compression: per tensor, the ceil(privacy.topk_ratio x size) largest-magnitude
entries of the upload kept, the rest zeroed."""
from __future__ import annotations

import numpy as np
import torch

from ...algorithms import Params
from ...engine import ClientUpload
from .base import Defense


def topk(upload: Params, ratio: float) -> Params:
    """Keep the ceil(ratio * numel) largest-magnitude entries of each tensor, zero the rest."""
    out = {}
    for k, v in upload.items():
        keep = max(1, int(np.ceil(ratio * v.numel())))
        flat = v.flatten()
        idx = flat.abs().topk(keep).indices
        out[k] = torch.zeros_like(flat).index_copy_(0, idx, flat[idx]).view_as(v)
    return out


class TopK(Defense):
    name = "topk"

    def upload(self, upload: Params, client: ClientUpload) -> Params:
        return topk(upload, self.cfg.topk_ratio)
