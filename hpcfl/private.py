"""The private state of the clients a rank hosts, as tables: one tensor per private key with a
client axis (row = client id - the first hosted id), read and written by the cohort's ids; no
per-client object (docs/ARCHITECTURE.md, "Invariants": it never enters a collective, and moves
only as rows to the rank that trains a client and back)."""
from __future__ import annotations

import numpy as np
import torch

Params = dict[str, torch.Tensor]


class PrivateTable:
    """Rows of `hosted` client ids, every client starting from `start` (every method gives all
    its clients the same initial private state, as the official code's deep copies)."""

    def __init__(self, start: Params, hosted: range, device):
        self.hosted, self.names = hosted, list(start)
        self.shapes = {k: tuple(v.shape) for k, v in start.items()}
        self.tensors = {k: v.to(device).expand(len(hosted), *v.shape).clone()
                        for k, v in start.items()}
        self.width = sum(int(np.prod(s)) for s in self.shapes.values())

    def _rows(self, cids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(cids, dtype=np.int64) - self.hosted.start)

    def get(self, cids) -> Params:
        """The rows of `cids` (hosted here), stacked along dim 0."""
        rows = self._rows(cids).to(self.device)
        return {k: v[rows] for k, v in self.tensors.items()}

    def put(self, cids, values: Params) -> None:
        rows = self._rows(cids).to(self.device)
        for k, v in values.items():
            self.tensors[k][rows] = torch.as_tensor(v).to(self.tensors[k])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def flat(self, values: Params) -> np.ndarray:
        """Stacked rows as one (clients, width) float32 array (what travels between ranks and
        into the checkpoint)."""
        if not self.names:
            return np.zeros((0, 0), np.float32)
        return torch.cat([values[k].flatten(1) for k in self.names], 1).float().cpu().numpy()

    def unflat(self, rows: np.ndarray) -> Params:
        out, i = {}, 0
        t = torch.from_numpy(np.ascontiguousarray(rows))
        for k in self.names:
            n = int(np.prod(self.shapes[k]))
            out[k] = t[:, i:i + n].reshape(len(rows), *self.shapes[k])
            i += n
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())
