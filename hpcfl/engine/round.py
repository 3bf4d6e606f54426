"""A round as the engine runs it: what it trains (`RoundSpec`), and the one buffer the round's
Allreduce sums (`RoundBuffer`, its last entries named by `Slot`)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from ..placement import stacks

# float64: the sum must not depend on how clients are spread over ranks (docs/cluster.md, MPI).
ROUND_DTYPE = torch.float64
CHUNK = 1 << 18  # entries per add_into: its float64 copy of them stays in the CPU's cache


def add_into(total: torch.Tensor, part: torch.Tensor, alpha: float = 1.0) -> None:
    """total += alpha * part, total float64 and part float32, a chunk at a time: torch makes a
    float64 copy of `part` first, which written whole and read back costs 8x the add itself on
    a CPU (250 ms against 32 ms for 15M entries on a 2-core VM). Each entry is exact: part's
    value times an integer weight fits in float64."""
    total, part = total.view(-1), part.reshape(-1)
    for i in range(0, total.numel(), CHUNK):
        total[i:i + CHUNK].add_(part[i:i + CHUNK], alpha=alpha)


@dataclass(frozen=True)
class RoundSpec:
    """One round's local training as every client of it runs it: the round, the run's seed,
    the batch size and augmentation; how this rank trains (engine.mode and engine.stack_size);
    this rank's members of the cohort, in the order their uploads are added, with their
    aggregation weights (training-set sizes); the stacks they train in (None: cut from the
    members by stack_size, placement.stacks); and whether the local step is compiled
    (engine.compile, engine.compiled)."""
    round: int
    seed: int
    batch_size: int
    augment: bool = False
    mode: str = "sequential"
    stack_size: int = 0
    cohort: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    stacks: tuple[tuple[int, ...], ...] | None = None
    compile: bool = False

    def trained_together(self) -> list[tuple[int, ...]]:
        """The members' stacks (placement.stacks)."""
        if self.stacks is not None:
            return list(self.stacks)
        return stacks(list(self.cohort), self.stack_size, self.mode)


class Slot(IntEnum):
    """The round buffer's last entries, after the summed uploads."""
    LOSS = 0     # sum of the members' training losses (mean minibatch loss of the last phase)
    CLIENTS = 1  # how many clients trained
    STOP = 2     # stop votes: ranks that got SIGTERM / SIGUSR1 / SIGUSR2 (set by the loop)
    WEIGHT = 3   # sum of the aggregation weights


@dataclass
class RoundBuffer:
    """The one buffer of a round's Allreduce, float64 on the device:
    [sum of weight * upload | Slot.LOSS, CLIENTS, STOP, WEIGHT]."""
    data: torch.Tensor

    @classmethod
    def zeros(cls, numel: int, device) -> "RoundBuffer":
        return cls(torch.zeros(numel + len(Slot), dtype=ROUND_DTYPE, device=device))

    @property
    def upload(self) -> torch.Tensor:
        """The summed weighted uploads (a view)."""
        return self.data[:-len(Slot)]

    @property
    def slots(self) -> torch.Tensor:
        return self.data[-len(Slot):]

    def __getitem__(self, slot: Slot) -> float:
        return float(self.slots[slot])

    def __setitem__(self, slot: Slot, value: float) -> None:
        self.slots[slot] = value

    def add(self, upload: torch.Tensor, weight: float, loss: float | torch.Tensor) -> None:
        """One client's upload (flat), added with its weight. Scalars are added in place: a
        tensor built from them would be a host-to-device copy, which waits for the device."""
        add_into(self.upload, upload, weight)
        self.count(weight, loss)

    def count(self, weight: float, loss: float | torch.Tensor) -> None:
        """One client's slots (its upload added otherwise)."""
        self.slots[Slot.LOSS].add_(loss)
        self.slots[Slot.CLIENTS].add_(1.0)
        self.slots[Slot.WEIGHT].add_(weight)
