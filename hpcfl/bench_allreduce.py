"""`python -m hpcfl.bench allreduce [WORKLOAD] [--repeat R] [key=value ...]`

The round's Allreduce alone, at the size of a workload's round buffer (its shared state plus the
round's slots, float64, as hpcfl.loop reduces it): seconds per Allreduce on the ranks this is
started on, to compare ranks within one node with ranks across nodes (docs/testbed.md runs it
on the testbed's nodes). R Allreduces after two warm-up ones, back to back: after the first the
ranks are in step, so each one's time is the collective's, not a wait for a late rank. Prints
one line (rank 0): the workload, bytes, ranks and their hosts, median and fastest seconds, and
the algorithm bandwidth (bytes / median).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .config import ConfigError, load_config
from .data import load_federated
from .engine import ROUND_DTYPE, Slot
from .loop import build
from .world import World


def main(argv: list[str], workloads: dict[str, list[str]]) -> int:
    """`workloads`: hpcfl.bench.WORKLOADS (passed in: hpcfl.bench imports this module)."""
    p = argparse.ArgumentParser(prog="python -m hpcfl.bench allreduce",
                                description="Time the round's Allreduce at a workload's size.")
    p.add_argument("workload", nargs="?", default="digits-hyperfl",
                   help=f"one of {', '.join(workloads)} (default digits-hyperfl)")
    p.add_argument("--repeat", type=int, default=50, help="timed Allreduces (default 50)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for hpcfl.main")
    a = p.parse_intermixed_args(argv)
    try:
        if a.workload not in workloads:
            raise ConfigError(f"workload {a.workload!r} is not one of {', '.join(workloads)}")
        if a.repeat < 1:
            raise ConfigError("--repeat: must be >= 1")
        cfg = load_config(None, [*workloads[a.workload], "train.device=cpu", *a.overrides])
        world = World(cfg.train.device, cfg.engine.threads)
        data = load_federated(cfg.data, cfg.train.seed, world.device)
        numel = sum(v.numel() for v in build(cfg, data, world.device).init_shared().values())
    except ConfigError as e:
        print(f"hpcfl.bench: error: {e}", file=sys.stderr)
        return 2
    buf = torch.ones(numel + len(Slot), dtype=ROUND_DTYPE)
    times = []
    for i in range(a.repeat + 2):
        t0 = time.perf_counter()
        world.allreduce_sum_(buf, i + 1)
        times.append(time.perf_counter() - t0)
    times, hosts = times[2:], ",".join(world.hostnames())  # (a collective: every rank)
    if world.is_main:
        size, median = buf.numel() * buf.element_size(), statistics.median(times)
        print(f"{a.workload}: {size / 1e6:.2f} MB, {world.size} rank(s) on "
              f"{hosts}: median {median * 1e3:.2f} ms, fastest "
              f"{min(times) * 1e3:.2f} ms, {size / median / 1e9:.2f} GB/s", flush=True)
    return 0
