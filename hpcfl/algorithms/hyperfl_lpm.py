"""HyperFL-LPM (Guo et al., AAAI 2025, §"large pre-trained models"; official code vit/ and
resnet/): HyperFL whose hypernetwork generates only the adapters of a frozen pretrained backbone
(hpcfl.models.lpm: vit_adapter, resnet18_adapter); each client keeps its embedding and its head.
The backbone is one set of constants per rank, in no upload, buffer or checkpoint; only the
hypernetwork is uploaded. Training phases as HyperFL: the head, then the hypernetwork and the
embedding (the official LPM defaults are lr 0.1 for both and batch 16: see jobs/paper/lpm-*).
"""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..models.lpm import build_lpm
from .hyperfl import HyperFL


class HyperFLLPM(HyperFL):
    name = "hyperfl_lpm"

    def build(self, cfg: RunConfig, shape, num_classes: int) -> tuple[torch.nn.Module, list[str]]:
        model = build_lpm(cfg.model.name, num_classes, cfg.model.backbone, cfg.model.pretrained)
        return model, model.names()["adapters"]
