"""What hpcfl's per-host paths see on this rank, as one line of JSON (tests/test_testbed.py runs it
on ranks spread over the testbed's nodes): rank, node-local rank and size, host, all hosts, and
the memory this rank may take (its node's, shared by the node's ranks)."""
import json
import socket

from hpcfl.population import rank_memory
from hpcfl.world import World

world = World("cpu")
have, shared = rank_memory(world)
print(json.dumps(dict(rank=world.rank, size=world.size, local_rank=world.local_rank,
                      local_size=world.local_size, host=socket.gethostname(),
                      hosts=world.hostnames(), memory=have, shared=shared)), flush=True)
