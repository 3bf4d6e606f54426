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
    its clients the same initial private state, as the official code's deep copies). A row
    nobody has written yet is not stored: the tables are allocated empty and such rows read as
    `start`, so memory (on the CPU, where untouched pages cost nothing) and start-up follow the
    clients that have trained, not the population (a resumed run writes every row)."""

    def __init__(self, start: Params, hosted: range, device):
        self.hosted, self.names = hosted, list(start)
        self.shapes = {k: tuple(v.shape) for k, v in start.items()}
        self.start = {k: v.detach().to(device) for k, v in start.items()}
        self.tensors = {k: torch.empty(len(hosted), *v.shape, dtype=v.dtype, device=device)
                        for k, v in start.items()}
        self.written = torch.zeros(len(hosted), dtype=torch.bool, device=device)
        self.width = sum(int(np.prod(s)) for s in self.shapes.values())

    def _rows(self, cids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(cids, dtype=np.int64) - self.hosted.start)

    def get(self, cids, names=None) -> Params:
        """The rows of `cids` (hosted here), stacked along dim 0, of every tensor or `names`."""
        rows = self._rows(cids).to(self.device)
        unwritten = ~self.written[rows]
        out = {}
        for k in (self.names if names is None else names):
            v = self.tensors[k][rows]
            v[unwritten] = self.start[k]
            out[k] = v
        return out

    def put(self, cids, values: Params) -> None:
        rows = self._rows(cids).to(self.device)
        for k, v in values.items():
            self.tensors[k][rows] = torch.as_tensor(v).to(self.tensors[k])
        self.written[rows] = True

    def written_ids(self) -> np.ndarray:
        """The sorted ids of the hosted clients whose rows have been written."""
        return np.flatnonzero(self.written.cpu().numpy()) + self.hosted.start

    def copy(self) -> "PrivateTable":
        """An independent table with the same rows (hpcfl.bench starts every mode from one)."""
        other = PrivateTable(self.start, self.hosted, self.device)
        other.tensors = {k: v.clone() for k, v in self.tensors.items()}
        other.written = self.written.clone()
        return other

    @property
    def device(self) -> torch.device:
        return self.written.device

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

    @staticmethod
    def row_bytes(start: Params) -> int:
        """Bytes a hosted client costs once its row is written (its tensors and the flag that
        marks it written): what `PrivateTable(start, hosted)` reserves per client, known
        before it is allocated."""
        return sum(v.numel() * v.element_size() for v in start.values()) + 1

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())
