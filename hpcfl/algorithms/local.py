"""Local training: every client trains its own model on its own data; nothing is communicated."""
from __future__ import annotations

from .base import Params
from .fedavg import FedAvg


class Local(FedAvg):
    """FedAvg's model and local SGD, with the whole model private (all clients start from the
    same initialization, as in the official code)."""
    name = "local"

    def init_shared(self) -> Params:
        return {}

    def init_client(self, cid: int) -> Params:
        return {k: v.clone() for k, v in self.initial.items()}


class LocalAdapter(Local):
    """The official Local-Adapter: adapters and head of a frozen backbone, each client alone."""
    name = "local_adapter"
    adapters = True
