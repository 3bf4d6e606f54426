"""Where clients live: which rank hosts which client ids (docs/ARCHITECTURE.md, "The round").

A rank hosts a contiguous block of client ids, balanced by sample count; the vectorized engine's
stacks are cut from fixed blocks of ids, so ranks host whole such blocks and the stacks do not
depend on the rank count.
"""
from __future__ import annotations

import numpy as np


def balanced_blocks(sizes: list[int], parts: int, unit: int = 1) -> list[range]:
    """Split client ids 0..n-1 into `parts` contiguous blocks of about equal total sample count
    (block r ends where the running total first reaches (r+1)/parts of the whole), each made of
    whole units of `unit` consecutive ids (the vectorized engine's blocks)."""
    unit = max(unit, 1)
    n = len(sizes)
    total = np.cumsum([sum(sizes[i:i + unit]) for i in range(0, n, unit)])
    bounds = [0]
    for r in range(1, parts):
        bounds.append(max(bounds[-1], int(np.searchsorted(total, total[-1] * r / parts)) + 1))
    bounds.append(len(total))
    bounds = [min(b * unit, n) for b in bounds]
    return [range(bounds[r], bounds[r + 1]) for r in range(parts)]
