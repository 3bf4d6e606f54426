"""The processes of a run: mpi4py COMM_WORLD, or a single process with the same interface.

The world knows ranks, devices and buffers; it never sees a model. Collectives take contiguous
host buffers (numpy, or CPU tensors copied from the device), never pickled objects.
"""
from __future__ import annotations

import logging
import socket

import numpy as np
import torch

from .config import ConfigError

log = logging.getLogger("hpcfl")


def _import_mpi():
    """mpi4py's MPI module, or None (with the reason) when no MPI library can be loaded."""
    try:
        import mpi4py
        mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
        from mpi4py import MPI
        return MPI, ""
    except (ImportError, RuntimeError, OSError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


class World:
    """rank / size / node-local rank / device of this process, and the run's collectives."""

    def __init__(self, device: str = "auto"):
        self.MPI, why = _import_mpi()
        if self.MPI is None:
            log.info("MPI unavailable (%s): running as a single process", why)
            self.comm, self.rank, self.size, self.local_rank = None, 0, 1, 0
        else:
            self.comm = self.MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
            self.local_rank = local.Get_rank()
            local.Free()
        self.device = self._pick_device(device)

    def _pick_device(self, want: str) -> torch.device:
        if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {want} asked for, but CUDA is not available")
        if want.startswith("cuda:"):
            dev = torch.device(want)
        else:  # several ranks may share one GPU
            dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def allreduce_sum_(self, buf: torch.Tensor) -> None:
        """Sum `buf` (float32, contiguous) over all ranks, in place. The one collective of a
        round. Staged through host memory: the pip MPI wheels are not CUDA-aware and segfault on
        device pointers."""
        if self.comm is None:
            return
        host = buf.detach().cpu() if buf.is_cuda else buf.detach()
        self.comm.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self.MPI.SUM)
        if buf.is_cuda:
            buf.copy_(host)

    def reduce_sum_to_main(self, arr: np.ndarray) -> np.ndarray:
        """Elementwise sum of `arr` over ranks, valid on rank 0 (ranks fill disjoint entries)."""
        if self.comm is None:
            return arr
        out = np.empty_like(arr) if self.is_main else None
        self.comm.Reduce(np.ascontiguousarray(arr), out, op=self.MPI.SUM, root=0)
        return out

    def hostnames(self) -> list[str]:
        name = socket.gethostname()
        return [name] if self.comm is None else sorted(set(self.comm.allgather(name)))

    def mpi_version(self) -> str:
        return "none" if self.MPI is None else self.MPI.Get_library_version().splitlines()[0]


def balanced_blocks(sizes: list[int], parts: int) -> list[range]:
    """Split client ids 0..n-1 into `parts` contiguous blocks of about equal total sample count
    (block r ends where the running total first reaches (r+1)/parts of the whole)."""
    total = np.cumsum(sizes)
    bounds = [0]
    for r in range(1, parts):
        bounds.append(max(bounds[-1], int(np.searchsorted(total, total[-1] * r / parts)) + 1))
    bounds.append(len(sizes))
    bounds = [min(b, len(sizes)) for b in bounds]
    return [range(bounds[r], bounds[r + 1]) for r in range(parts)]

