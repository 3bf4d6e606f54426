"""Rounds of hpcfl's Allreduce under the watchdog, and nothing else (tests/test_testbed.py cuts a
node's link, or freezes a rank, while it runs): `python allreduce_loop.py TIMEOUT_S` prints
"round N" on rank 0 after each round, forever."""
import sys
import time

import torch

from hpcfl.world import World

world = World("cpu")
world.watch_collectives(float(sys.argv[1]))
buf = torch.ones(1000, dtype=torch.float64)
for rnd in range(1, 10 ** 9):
    world.allreduce_sum_(buf, rnd)
    if world.is_main:
        print(f"round {rnd}", flush=True)
    time.sleep(0.05)
