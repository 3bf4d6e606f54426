"""This rank's share of the clients (docs/ARCHITECTURE.md, "The round"): the ids it hosts and
their private state (a PrivateTable), the clients every evaluation covers, the moves of private
rows to the ranks that train them and back, and the evaluation in stacks dealt to every rank.
Every per-round cost here is set by the cohort and the evaluated clients, never by the
population."""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import TrainConfig
from .memory import available_memory, refuse_unless_fits
from .engine import evaluate_stack
from .placement import UNIT, Dealt, deal_stacks, host_of, hosted
from .private import Params, PrivateTable
from .streams import Stream, numpy_stream
from .world import World

EVAL_IMAGES = 4096  # test images evaluated in one stack
AUTO_EVALUATED = 1000  # train.eval_clients=auto: every client up to this many, else a sample


def evaluated_clients(t: TrainConfig, num_clients: int) -> np.ndarray:
    """The clients every evaluation covers (train.eval_clients), sorted: all, or a fixed sample
    drawn from the seed alone."""
    if t.eval_clients == "all" or (t.eval_clients == "auto" and num_clients <= AUTO_EVALUATED):
        return np.arange(num_clients)
    k = AUTO_EVALUATED if t.eval_clients == "auto" else int(t.eval_clients)
    if k >= num_clients:
        return np.arange(num_clients)
    return np.sort(numpy_stream(t.seed, Stream.EVALUATED).choice(num_clients, k, replace=False))


def rank_memory(world: World) -> tuple[float | None, str]:
    """Bytes this rank may take (None: unknown): its GPU's free memory, or its node's available
    memory (MemAvailable, or the job's cgroup limit) shared by the ranks on that node
    (world.local_size: ranks on other nodes do not count); and a note saying it is shared."""
    if world.device.type == "cuda":
        return torch.cuda.mem_get_info(world.device)[0], ""
    memory = available_memory()
    return (None if memory is None else memory / world.local_size,
            f" (this node's memory is shared by its {world.local_size} ranks)" * (
                world.local_size > 1))


def check_memory(world: World, start: Params, num_clients: int) -> None:
    """Refuse a population whose private state cannot fit in this rank's memory, before it is
    allocated: a row for every client the rank hosts, which PrivateTable reserves at once (a
    row costs memory on a CPU once its client trains, so a long run fills them; Linux refuses
    a reservation past the machine's memory, and CUDA allocates it all), and 8 bytes a client
    for placing them (placement.hosted). The ranks of a node share its memory."""
    rows = min(num_clients, math.ceil(num_clients / world.size / UNIT) * UNIT)
    row = PrivateTable.row_bytes(start)
    have, shared = rank_memory(world)
    refuse_unless_fits(rows * row + 8 * num_clients, have,
                       f"data.num_clients={num_clients:,}: the private state of the "
                       f"{rows:,} clients a rank hosts ({row:,} bytes each once trained) and "
                       "their placement",
                       f"use fewer clients, or more ranks on more nodes{shared}")


class Population:
    """The clients as this rank sees them: hosted ids `mine` (contiguous, whole UNITs), their
    private state, and which of them every evaluation covers."""

    def __init__(self, world: World, start: Params, num_clients: int, evaluated: np.ndarray):
        world.agree(lambda: check_memory(world, start, num_clients))  # every rank, or none
        self.world = world
        self.blocks = hosted(num_clients, world.size)
        self.mine = self.blocks[world.rank]
        self.table = PrivateTable(start, self.mine, world.device)
        self.evaluated = evaluated

    def fetch(self, dealt: Dealt) -> dict[int, Params]:
        """The private state of this rank's members (the stacks dealt to it), from the ranks
        hosting them: one exchange of rows."""
        trained = dealt.members(self.world.size)
        me = self.world.rank
        if not self.table.names:  # no private state (FedAvg): nothing moves
            return {c: {} for c in trained[me]}
        if self.world.size == 1:
            return unstack(trained[me], self.table.get(trained[me]))
        sent = [self._hosted_here(group) for group in trained]
        got = self.world.exchange([self.table.flat(self.table.get(c)) for c in sent])
        private: dict[int, Params] = {}
        for cids, rows in zip(self._by_host(trained[me]), got):
            private.update(unstack(cids, self.table.unflat(rows)))
        return {c: {k: v.to(self.world.device) for k, v in private[c].items()}
                for c in trained[me]}

    def give_back(self, dealt: Dealt, private: dict[int, Params]) -> None:
        """The members' trained private state, back to the ranks hosting them."""
        if not self.table.names:
            return
        trained = dealt.members(self.world.size)
        me = self.world.rank
        if self.world.size == 1:
            self.table.put(trained[me], restack(trained[me], private))
            return
        back = self._by_host(trained[me])
        got = self.world.exchange([self.table.flat(restack(cids, private)) if cids else
                                   np.zeros((0, self.table.width), np.float32)
                                   for cids in back])
        for r, rows in enumerate(got):
            cids = self._hosted_here(trained[r])
            if cids:
                self.table.put(cids, self.table.unflat(rows))

    def _by_host(self, cids: list[int]) -> list[list[int]]:
        """`cids` grouped by the rank that hosts them, in their order (one host_of for all)."""
        out: list[list[int]] = [[] for _ in range(self.world.size)]
        for c, h in zip(cids, host_of(cids, self.blocks) if cids else []):
            out[int(h)].append(c)
        return out

    def _hosted_here(self, cids: list[int]) -> list[int]:
        return [c for c in cids if self.mine.start <= c < self.mine.stop]

    def evaluate(self, algo, shared: Params, data) -> np.ndarray:
        """(evaluated clients, 3): correct, summed loss and test size of the clients this rank
        evaluated (other rows 0). The evaluated ids, sorted, are cut into stacks of at most
        EVAL_IMAGES test images by position (from the evaluated list alone, so no result
        depends on the rank count) and dealt to the ranks like a round's stacks; their private
        rows come from their hosts (read only: nothing goes back)."""
        ev = self.evaluated
        table = np.zeros((len(ev), 3))
        if not len(ev):
            return table
        size = max(1, EVAL_IMAGES // int(max(data.num_test[ev])))
        chunks = [tuple(int(c) for c in ev[i:i + size]) for i in range(0, len(ev), size)]
        dealt = deal_stacks(chunks, data.num_test, self.world.size)
        private = self.fetch(dealt)
        at = 0
        for chunk, r in zip(dealt.stacks, dealt.owner):
            if r == self.world.rank:
                clients = [data.client(c) for c in chunk]
                correct, loss = evaluate_stack(algo, shared, restack(list(chunk), private),
                                               clients)
                table[at:at + len(chunk)] = np.stack(
                    [correct.double().cpu().numpy(), loss.double().cpu().numpy(),
                     [c.num_test for c in clients]], 1)
            at += len(chunk)
        return table


def unstack(cids: list[int], stacked: Params) -> dict[int, Params]:
    return {c: {k: v[i] for k, v in stacked.items()} for i, c in enumerate(cids)}


def restack(cids: list[int], private: dict[int, Params]) -> Params:
    names = private[cids[0]].keys() if cids else ()
    return {k: torch.stack([private[c][k] for c in cids]) for k in names}
