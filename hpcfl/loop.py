"""The run: config -> world -> data -> the clients hosted here -> for each round: cohort, local
training, one Allreduce, server step, evaluation -> results file, and a checkpoint every few rounds
that a rerun with the same output.name resumes from (docs/ARCHITECTURE.md, "The round"). One home
for the round loop:
`python -m hpcfl.main` runs it, `hpcfl.bench` times its rounds, `hpcfl.attack` trains to the round
it attacks with it.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .algorithms import build_algorithm
from .config import ConfigError, RunConfig
from .cli import Diverged
from .data import load_federated
from .engine import (ROUND_DTYPE, RoundBuffer, RoundSpec, Slot, evaluate_client, precision,
                     resolve_mode, train_cohort, unflatten)
from .lock import lock_output
from .placement import balanced_blocks
from .privacy.defenses import Defense, Setup, build_defense
from .resume import checkpoint, plan_or_error
from .store import TIMING, ResultsFile, git_commit, load_checkpoint, mark_completed
from .streams import Stream, numpy_stream
from .world import World

log = logging.getLogger("hpcfl")


def sample_cohort(seed: int, rnd: int, num_clients: int, frac: float) -> list[int]:
    """The clients of round `rnd`: identical on every rank, drawn from (seed, rnd) alone."""
    m = max(int(frac * num_clients), 1)  # as the official code
    return sorted(numpy_stream(seed, Stream.COHORT, rnd).choice(num_clients, m,
                                                               replace=False).tolist())


def provenance(cfg: RunConfig, world: World) -> dict:
    return dict(hpcfl_version=__version__, git_commit=git_commit(), config=cfg.to_yaml(),
                seed=cfg.train.seed, world_size=world.size,
                hostnames=",".join(world.hostnames()),
                device=str(world.device), torch_version=str(torch.__version__),
                cuda_version=torch.version.cuda or "none", mpi_version=world.mpi_version())


def default_name(cfg: RunConfig) -> str:
    """<algorithm>-<data>-<when>: in a Slurm job its id, which a requeued job keeps (so that it
    resumes its own run); else rank 0's clock."""
    job = os.environ.get("SLURM_JOB_ID")
    when = f"slurm{job}" if job else time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.algorithm.name}-{cfg.data.name}-{when}"


def to_device(params: dict, device: torch.device) -> dict:
    return {k: torch.as_tensor(v).to(device) for k, v in params.items()}


def build(cfg: RunConfig, data, device: torch.device):
    """The run's algorithm, its constants (a frozen backbone) on this rank's device."""
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    algo.constants = to_device(algo.constants, device)
    return algo


def prepare_defense(defense: Defense | None, cfg: RunConfig, world: World, algo,
                    num_classes: int) -> None:
    """The run's defense checked against the run and prepared: what it computes once per run
    is computed on rank 0 and installed on every rank (a ConfigError there stops them all)."""
    if defense is not None:
        defense.check(cfg.data, algo)
        setup = Setup(algo, cfg.data, cfg.model.name, cfg.train.seed, num_classes, world.device)
        defense.install(world.on_main(lambda: defense.prepare(setup)), setup)


def round_spec(cfg: RunConfig, mode: str, rnd: int, mine: list[int], data) -> RoundSpec:
    """Round `rnd` as this rank trains it: its members of the cohort (`mine`)."""
    return RoundSpec(rnd, cfg.train.seed, cfg.train.batch_size, data.augment, mode,
                     cfg.engine.block_size, tuple(mine),
                     tuple(float(data.num_train[c]) for c in mine))


def train_round(cfg: RunConfig, world: World, algo, state: tuple[dict, dict], data, mode: str,
                rnd: int, defense: Defense | None = None) -> tuple[RoundBuffer, float, float]:
    """One round on this rank: train its members of the cohort, the one Allreduce (which also
    carries this rank's stop vote, read after local training: a signal that arrived during it
    counts this round), the server step. `state`: (shared, private), updated in place. Returns
    the reduced buffer and the seconds of local training and of the Allreduce."""
    shared, private = state
    cohort = sample_cohort(cfg.train.seed, rnd, cfg.data.num_clients, cfg.train.frac)
    spec = round_spec(cfg, mode, rnd, [c for c in cohort if c in private], data)
    t0 = time.perf_counter()
    with precision(cfg.engine.dtype, world.device):
        buf = train_cohort(algo, spec, shared, private, data.clients, world.device, defense)
    buf[Slot.STOP] = float(world.stop_requested)
    world.synchronize()
    t1 = time.perf_counter()
    world.allreduce_sum_(buf.data)
    if defense is not None:  # the server's side, in place on the reduced sum
        defense.server(buf.upload, [float(data.num_train[c]) for c in cohort])
    t2 = time.perf_counter()
    algo.server_step(shared, unflatten(buf.upload, shared), buf[Slot.WEIGHT])
    return buf, t1 - t0, t2 - t1


def evaluate(algo, shared, private, data, num_clients: int) -> np.ndarray:
    """(num_clients, 3): correct, summed loss, test size; rows of clients hosted elsewhere are 0."""
    table = np.zeros((num_clients, 3))
    for cid, state in private.items():
        c = data.clients[cid]
        table[cid] = (*evaluate_client(algo, {**shared, **state}, c), c.num_test)
    return table


class Recorder:
    """Brings evaluations and every rank's timings to rank 0 and writes them (rank 0 only)."""

    def __init__(self, world: World, store: ResultsFile | None, nbytes: int):
        self.world, self.store, self.nbytes = world, store, nbytes
        self.rows: list[tuple[int, list[float]]] = []  # (round, [compute, allreduce, eval])

    def time_round(self, rnd: int, compute: float, allreduce: float) -> None:
        self.rows.append((rnd, [compute, allreduce, 0.0]))

    def _reduce(self, table: np.ndarray):
        """One Reduce for the client table and the timing rows since the last call."""
        w = self.world
        timing = np.zeros((len(self.rows), w.size, 3))
        timing[:, w.rank] = [r for _, r in self.rows]
        rounds, self.rows = [rnd for rnd, _ in self.rows], []
        total = w.reduce_sum_to_main(np.concatenate([table.ravel(), timing.ravel()]))
        if total is None:
            return None, None, rounds
        return (total[:table.size].reshape(table.shape),
                total[table.size:].reshape(timing.shape), rounds)

    def _write_timing(self, timing: np.ndarray, rounds: list[int], io_s: float) -> None:
        io = np.zeros(timing.shape[:2])
        io[-1, 0] = io_s
        self.store.append_timing(rounds, self.nbytes,
                                 dict(zip(TIMING, [*np.moveaxis(timing, 2, 0), io])))
        self.store.flush()

    def evaluation(self, rnd: int, table: np.ndarray, eval_s: float, train_loss: float,
                   t0: float, start: float, epsilon: float | None = None) -> dict | None:
        self.rows[-1][1][2] = eval_s
        table, timing, rounds = self._reduce(table)
        if table is None:
            return None
        acc, loss = table[:, 0] / table[:, 2], table[:, 1] / table[:, 2]
        now = time.perf_counter()
        row = dict(round=rnd, test_acc_mean=acc.mean(),
                   test_acc_weighted=table[:, 0].sum() / table[:, 2].sum(),
                   test_loss_mean=loss.mean(), train_loss=train_loss, round_time_s=now - t0,
                   elapsed_s=now - start)
        if epsilon is not None:
            row["epsilon"] = epsilon
        self.store.append_eval(row, dict(test_acc=acc, test_loss=loss))
        self.store.flush()
        self._write_timing(timing, rounds, time.perf_counter() - now)
        return row

    def flush_timing(self) -> None:
        """Timing rows of rounds after the last evaluation (before a checkpoint)."""
        if self.rows:
            _, timing, rounds = self._reduce(np.zeros(0))
            if timing is not None:
                self._write_timing(timing, rounds, 0.0)


def run(cfg: RunConfig, world: World, until: int = 0) -> dict:
    """The run, trained to its end, or only to round `until` (> 0), checkpointed there as a
    preempted run that a later call goes on from (an attack of round until + 1 trains the run
    this way: the same experiment, e.g. a DP run's noise calibrated to all its rounds)."""
    if not cfg.output.name:
        cfg.output.name = world.from_main(default_name(cfg))
    locks: list = []  # taken by _run once the input is checked: a mistake creates no folder
    try:
        return _run(cfg, world, until, locks)
    finally:
        for lock in filter(None, locks):
            lock.release()


def _run(cfg: RunConfig, world: World, until: int, locks: list) -> dict:
    t, n = cfg.train, cfg.data.num_clients
    last = min(until or t.rounds, t.rounds)
    defense = build_defense(cfg.privacy, t.seed)
    mode = resolve_mode(cfg.engine.mode, world.device)
    unit = cfg.engine.block_size if mode == "vectorized" else 1  # ranks host whole blocks
    data = load_federated(cfg.data, t.seed, world.device, hosted=lambda sizes: balanced_blocks(
        sizes, world.size, unit)[world.rank])
    blocks = balanced_blocks(data.num_train, world.size, unit)
    algo = build(cfg, data, world.device)
    if (cfg.engine.dtype, world.device.type, cfg.model.name) == ("bf16", "cpu",
                                                                 "resnet18_adapter"):
        raise ConfigError("engine.dtype=bf16: CPU autocast cannot run this model's BatchNorm; "
                          "use a GPU, or engine.dtype=fp32")
    prepare_defense(defense, cfg, world, algo, data.num_classes)
    if world.is_main and algo.attrs():
        log.info("%s", ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in algo.attrs().items()))
    locks.append(lock_output(cfg.output, world))
    start = plan_or_error(cfg, world)
    if start.done:
        if world.is_main:
            mark_completed(start.path)
        return dict(done=True, path=str(start.path), round=start.round)
    if start.round > last:
        raise ConfigError(f"output.name: {start.path} holds a run at round {start.round}, past "
                          f"round {last}; choose another output.name")
    if start.round == last:
        return dict(path=str(start.path), round=start.round, stopped=True)

    dev, template = world.device, algo.init_client(0)
    if start.checkpoint is None:
        shared = to_device(algo.init_shared(), dev)
        private = {cid: to_device(algo.init_client(cid), dev) for cid in data.clients}
        elapsed = 0.0
    else:
        ck = load_checkpoint(start.checkpoint, blocks[world.rank])
        shared = to_device(ck.shared, dev)
        private = {cid: to_device({k: v[i] for k, v in ck.private.items()}, dev)
                   for i, cid in enumerate(blocks[world.rank])}
        elapsed = ck.elapsed_s
        if world.is_main:
            log.info("resuming %s from round %d (%s)", start.path, start.round, start.checkpoint)
    numel = sum(v.numel() for v in shared.values())

    store, attrs = None, {**provenance(cfg, world), **algo.attrs(),  # collective: all ranks
                          **(defense.attrs() if defense is not None else {})}
    if world.is_main:
        store = (ResultsFile.resume(start.path, start.round, attrs)
                 if start.checkpoint else
                 ResultsFile.create(start.path, attrs, data.num_train, data.num_test,
                                    world.size, () if algo.epsilon(0) is None else ("epsilon",)))
    rec = Recorder(world, store, (numel + len(Slot)) * ROUND_DTYPE.itemsize)
    show = cfg.output.progress
    if show == "auto":
        show = "bar" if sys.stderr.isatty() else "log"
    bar = tqdm(total=t.rounds, initial=start.round, unit="round",
               disable=not (world.is_main and show == "bar"))
    world.catch_stop_signals()
    t_start, final, stop, rnd = time.perf_counter() - elapsed, {}, False, start.round
    try:
        for rnd in range(start.round + 1, last + 1):
            t0 = time.perf_counter()
            buf, compute_s, allreduce_s = train_round(cfg, world, algo, (shared, private), data,
                                                      mode, rnd, defense)
            loss_sum, trained, stops, _ = buf.slots.tolist()
            if not (math.isfinite(loss_sum) and torch.isfinite(buf.data).all()):
                # the same reduced buffer on every rank: all of them stop here
                raise Diverged(f"round {rnd}: the training loss or the shared update is NaN "
                               "or inf; stopped before checkpointing it (status diverged; a "
                               "lower train.lr or a tighter clip may help)")
            rec.time_round(rnd, compute_s, allreduce_s)
            bar.update()
            # a signal in the last round changes nothing
            stop = (stops > 0 or rnd == last) and rnd < t.rounds
            if rnd % t.eval_every == 0 or rnd == t.rounds:
                t3 = time.perf_counter()
                table = evaluate(algo, shared, private, data, n)
                row = rec.evaluation(rnd, table, time.perf_counter() - t3, loss_sum / trained,
                                     t0, t_start, epsilon=algo.epsilon(rnd))
                if row:
                    final = row
                    bar.set_postfix(acc=f"{row['test_acc_mean']:.3f}",
                                    loss=f"{row['train_loss']:.3f}")
                    if show == "log":
                        log.info("round %d/%d  test_acc_mean %.4f  train_loss %.4f  "
                                 "%.2f s/round%s",
                                 rnd, t.rounds, row["test_acc_mean"], row["train_loss"],
                                 row["round_time_s"], f"  epsilon {row['epsilon']:.3f}"
                                 if "epsilon" in row else "")
            every = cfg.output.checkpoint_every
            if stop or rnd == t.rounds or (every and rnd % every == 0):
                rec.flush_timing()
                checkpoint(world, start.path, cfg, rnd, time.perf_counter() - t_start,
                           (shared, private), template, blocks)
            if stop:
                break
    except BaseException as e:
        bar.close()
        if store:
            store.close("diverged" if isinstance(e, Diverged) else "failed")
        world.release_stop_signals()
        raise
    bar.close()
    if store:
        store.close("preempted" if stop else "completed",
                    elapsed_s=time.perf_counter() - t_start)
    world.release_stop_signals()
    return dict(final, path=str(start.path), round=rnd, stopped=stop,
                elapsed_s=time.perf_counter() - t_start)
