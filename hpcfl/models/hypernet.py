"""The hypernetwork of HyperFL: a client embedding -> every weight of a target network."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HyperNetwork(nn.Module):
    """Linear(embed_dim -> hidden_dim) + ReLU, then one Linear(hidden_dim -> numel) head per target
    tensor, reshaped to the tensor's shape (official Hypernetwork_CifarCNN).

    Default PyTorch init on purpose: it is what the official code uses, and it makes the generated
    weights far too large at first (round-1 loss ~1e4 on CIFAR-10), a transient the paper's
    numbers include. `bias=False`: heads without biases (algorithm.hypernet_bias), a variant
    whose upload does not carry the generated tensors' gradients as such.
    """

    def __init__(self, targets: dict[str, torch.Size], embed_dim: int = 64, hidden_dim: int = 128,
                 bias: bool = True):
        super().__init__()
        self.shapes = {name: torch.Size(s) for name, s in targets.items()}
        self.trunk = nn.Linear(embed_dim, hidden_dim)
        # ModuleDict keys may not contain '.', target names do.
        self.heads = nn.ModuleDict({name.replace(".", "_"): nn.Linear(hidden_dim, s.numel(),
                                                                      bias=bias)
                                    for name, s in self.shapes.items()})

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.trunk(embedding))
        return {name: self.heads[name.replace(".", "_")](h).view(shape)
                for name, shape in self.shapes.items()}
