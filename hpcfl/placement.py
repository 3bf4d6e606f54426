"""Where clients live and where they train (docs/ARCHITECTURE.md, "The round").

- Hosting: rank r keeps the private state of a contiguous block of client ids, made of whole
  units of UNIT ids and balanced by count (`hosted`).
- Training: a round's cohort, sorted, is cut into stacks of at most engine.stack_size clients
  (`stacks`; auto: the cohort in 16 near-equal stacks; in sequential mode at least 16 and at
  most 8 clients each), a cut that depends on the cohort alone; the stacks are then dealt to
  ranks to balance their samples (`deal_stacks`). A member's private state travels from its host
  to the rank that trains it and back (loop.train_round): every rank works, whatever the
  population, and results do not depend on the rank count. An evaluation (population.evaluate)
  and an attack's targets (hpcfl.attack) are dealt the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

UNIT = 256  # client ids hosted together
AUTO_STACKS = 16  # engine.stack_size=0: the cohort in this many stacks
# sequential mode, engine.stack_size=0: at most this many clients per stack (and at least
# AUTO_STACKS stacks), whose factored uploads are summed as one product (docs/factored.md)
AUTO_SEQUENTIAL_STACK = 8


def balanced_blocks(sizes, parts: int, unit: int = 1) -> list[range]:
    """Split client ids 0..n-1 into `parts` contiguous blocks of about equal total size (block r
    ends where the running total first reaches (r+1)/parts of the whole), each made of whole
    units of `unit` consecutive ids."""
    unit = max(unit, 1)
    sizes = np.asarray(sizes, dtype=np.float64)
    n = len(sizes)
    if n == 0:
        return [range(0, 0) for _ in range(parts)]
    total = np.cumsum(np.add.reduceat(sizes, np.arange(0, n, unit)))
    bounds = [0]
    for r in range(1, parts):
        bounds.append(max(bounds[-1], int(np.searchsorted(total, total[-1] * r / parts)) + 1))
    bounds.append(len(total))
    bounds = [min(b * unit, n) for b in bounds]
    return [range(bounds[r], bounds[r + 1]) for r in range(parts)]


def hosted(num_clients: int, parts: int) -> list[range]:
    """Every rank's hosted client ids: contiguous, whole units, balanced by count."""
    return balanced_blocks(np.ones(num_clients), parts, UNIT)


def host_of(cids, blocks: list[range]) -> np.ndarray:
    """The rank hosting each of `cids`."""
    starts = np.array([b.start for b in blocks] + [blocks[-1].stop])
    return np.searchsorted(starts, np.asarray(cids), side="right") - 1


def stacks(cohort: list[int], stack_size: int, mode: str) -> list[tuple[int, ...]]:
    """The sorted cohort cut into contiguous stacks of near-equal size, at most `stack_size`
    (0: AUTO_STACKS stacks; in sequential mode at least AUTO_STACKS, of at most
    AUTO_SEQUENTIAL_STACK clients)."""
    m = len(cohort)
    if m == 0:
        return []
    if stack_size:
        count = math.ceil(m / stack_size)
    elif mode == "sequential":
        count = min(m, max(AUTO_STACKS, math.ceil(m / AUTO_SEQUENTIAL_STACK)))
    else:
        count = min(m, AUTO_STACKS)
    return [tuple(int(c) for c in part) for part in np.array_split(sorted(cohort), count)]


def deal(loads: list[float], parts: int) -> list[int]:
    """The rank of each stack: the heaviest first, each to the least loaded rank (the lowest
    rank on ties), a deterministic balance of `loads` over `parts` ranks."""
    total = [0.0] * parts
    rank = [0] * len(loads)
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        r = min(range(parts), key=lambda r: (total[r], r))
        rank[i], total[r] = r, total[r] + loads[i]
    return rank


@dataclass(frozen=True)
class Dealt:
    """Stacks of client ids and the rank that works on each (`owner`, one per stack)."""
    stacks: list[tuple[int, ...]]
    owner: list[int]

    def of(self, rank: int) -> list[tuple[int, ...]]:
        """The stacks dealt to `rank`, in order."""
        return [s for s, r in zip(self.stacks, self.owner) if r == rank]

    def members(self, ranks: int) -> list[list[int]]:
        """Every rank's clients, in its stacks' order."""
        out: list[list[int]] = [[] for _ in range(ranks)]
        for s, r in zip(self.stacks, self.owner):
            out[r].extend(s)
        return out


def deal_stacks(together: list[tuple[int, ...]], sizes, ranks: int) -> Dealt:
    """`together` (stacks cut from a sorted list of ids alone) dealt to `ranks`, each stack's
    load the summed `sizes` of its clients (their images: `deal`). The one way work on clients
    is shared among ranks: a round's training, an evaluation, an attack."""
    sizes = np.asarray(sizes)
    return Dealt(together, deal([float(sizes[list(s)].sum()) for s in together], ranks))
