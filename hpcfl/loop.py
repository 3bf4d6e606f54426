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
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from . import __version__
from .algorithms import algorithm_class, build_algorithm
from .config import ConfigError, RunConfig
from .experiment import experiment_digest
from .cli import Diverged
from .data import load_federated
from .engine import (ROUND_DTYPE, RoundBuffer, RoundSpec, Slot, compile_unavailable, precision,
                     resolve_mode, train_cohort, unflatten)
from .lock import lock_output
from .placement import deal_stacks, stacks
from .population import Population, evaluated_clients
from .privacy.defenses import Defense, Setup, build_defense, defense_class
from .record import Recorder
from .resume import checkpoint, plan_or_error
from .store import ResultsFile, git_commit, load_checkpoint, mark_completed
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
    """<algorithm>-<data>-<digest of the experiment>: the same for every command of one
    experiment, on every rank, in any job (hpcfl.attack then hpcfl.main, a requeued job), and
    another for any other experiment (two runs in one Slurm allocation); a user's
    module:Class algorithm as module.Class."""
    return (f"{cfg.algorithm.name.replace(':', '.')}-{cfg.data.name}-"
            f"{experiment_digest(cfg)}")


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


def round_spec(cfg: RunConfig, mode: str, rnd: int, mine: list[tuple[int, ...]],
               data) -> RoundSpec:
    """Round `rnd` as this rank trains it: the stacks dealt to it (`mine`)."""
    members = tuple(c for s in mine for c in s)
    return RoundSpec(rnd, cfg.train.seed, cfg.train.batch_size, data.augment, mode,
                     cfg.engine.stack_size, members,
                     tuple(float(data.num_train[c]) for c in members), tuple(mine),
                     cfg.engine.compile)


@dataclass
class RoundTimes:
    """Seconds a rank spent in a round's phases (the /timing columns it fills)."""
    compute: float
    allreduce: float
    exchange: float


def train_round(cfg: RunConfig, world: World, algo, state: tuple[dict, Population], data,
                mode: str, rnd: int, defense: Defense | None = None
                ) -> tuple[RoundBuffer, RoundTimes]:
    """One round on this rank: the cohort cut into stacks and dealt to the ranks
    (hpcfl.placement), the members' private state fetched from their hosts, local training,
    the one Allreduce (which also carries this rank's stop vote, read after local training: a
    signal that arrived during it counts this round), the server step, the private state back to
    the hosts. `state`: (shared, population), updated in place."""
    shared, population = state
    cohort = sample_cohort(cfg.train.seed, rnd, cfg.data.num_clients, cfg.train.frac)
    dealt = deal_stacks(stacks(cohort, cfg.engine.stack_size, mode), data.num_train, world.size)
    t0 = time.perf_counter()
    private = population.fetch(dealt)
    spec = round_spec(cfg, mode, rnd, dealt.of(world.rank), data)
    t1 = time.perf_counter()
    with precision(cfg.engine.dtype, world.device):
        buf = train_cohort(algo, spec, shared, private, data.clients, world.device, defense)
    buf[Slot.STOP] = float(world.stop_requested)
    world.synchronize()
    t2 = time.perf_counter()
    world.allreduce_sum_(buf.data, rnd)
    if defense is not None:  # the server's side, in place on the reduced sum
        defense.server(buf.upload, [float(data.num_train[c]) for c in cohort])
    t3 = time.perf_counter()
    algo.server_step(shared, unflatten(buf.upload, shared), buf[Slot.WEIGHT])
    population.give_back(dealt, private)
    return buf, RoundTimes(t2 - t1, t3 - t2, t1 - t0 + time.perf_counter() - t3)


def run(cfg: RunConfig, world: World, until: int | None = None) -> dict:
    """The run, trained to its end, or only to round `until`, checkpointed there as a
    preempted run that a later call goes on from (an attack of round until + 1 trains the run
    this way: the same experiment, e.g. a DP run's noise calibrated to all its rounds; until=0
    leaves the run's start checkpointed, for an attack of round 1)."""
    if not cfg.output.name:
        cfg.output.name = default_name(cfg)
    locks: list = []  # taken by _run once the input is checked: a mistake creates no folder
    try:
        return _run(cfg, world, until, locks)
    finally:
        for lock in filter(None, locks):
            lock.release()


def check_classes(cfg: RunConfig) -> None:
    """The classes algorithm.name and privacy.defense name: a user's module:Class that is not
    an Algorithm or a Defense is one line now, before any work."""
    algorithm_class(cfg.algorithm.name)
    defense_class(cfg.privacy.defense)


def check_compile(cfg: RunConfig, device: torch.device) -> None:
    """engine.compile=true where torch.compile cannot work (no C++ compiler for the CPU, no
    Triton for CUDA): one line now, not a traceback from inside the first round."""
    if cfg.engine.compile and (why := compile_unavailable(device)) is not None:
        raise ConfigError(f"engine.compile=true: torch.compile does not work on {device.type} "
                          f"here ({why}); use engine.compile=false")


def start_up(cfg: RunConfig, device: torch.device):
    """This rank's data and algorithm; a ConfigError (a file missing or damaged on this node,
    weights it cannot find, engine.compile without a compiler) ends every rank through
    world.agree."""
    check_compile(cfg, device)
    data = load_federated(cfg.data, cfg.train.seed, device)
    algo = build(cfg, data, device)
    if (cfg.engine.dtype, device.type, cfg.model.name) == ("bf16", "cpu", "resnet18_adapter"):
        raise ConfigError("engine.dtype=bf16: CPU autocast cannot run this model's BatchNorm; "
                          "use a GPU, or engine.dtype=fp32")
    return data, algo


def _run(cfg: RunConfig, world: World, until: int, locks: list) -> dict:
    t, n = cfg.train, cfg.data.num_clients
    last = t.rounds if until is None else min(until, t.rounds)
    check_classes(cfg)
    defense = build_defense(cfg.privacy, t.seed)
    mode = resolve_mode(cfg.engine.mode, world.device)
    data, algo = world.agree(lambda: start_up(cfg, world.device))
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
                          f"round {last}; choose another output.name", every_rank=True)
    if start.round == last and start.checkpoint is not None:
        return dict(path=str(start.path), round=start.round, stopped=True)

    dev = world.device
    population = Population(world, to_device(algo.init_client(0), dev), n,
                            evaluated_clients(t, n))
    if start.checkpoint is None:
        shared = to_device(algo.init_shared(), dev)
        elapsed = 0.0
    else:
        ck = load_checkpoint(start.checkpoint, population.table)
        shared, elapsed = to_device(ck.shared, dev), ck.elapsed_s
        if world.is_main:
            log.info("resuming %s from round %d (%s)", start.path, start.round, start.checkpoint)
    numel = sum(v.numel() for v in shared.values())

    store, attrs = None, {**provenance(cfg, world), **algo.attrs(),  # collective: all ranks
                          **(defense.attrs() if defense is not None else {})}
    if world.is_main:
        store = (ResultsFile.resume(start.path, start.round, attrs)
                 if start.checkpoint else
                 ResultsFile.create(start.path, attrs, (data.num_train, data.num_test),
                                    population.evaluated, world.size,
                                    () if algo.epsilon(0) is None else ("epsilon",)))
    rec = Recorder(world, store, (numel + len(Slot)) * ROUND_DTYPE.itemsize)
    show = cfg.output.progress
    if show == "auto":
        show = "bar" if sys.stderr.isatty() else "log"
    bar = tqdm(total=t.rounds, initial=start.round, unit="round",
               disable=not (world.is_main and show == "bar"))
    world.watch_collectives(t.collective_timeout_s)
    world.catch_stop_signals()
    rec.note_startup()
    t_start, final, stop, rnd = time.perf_counter() - elapsed, {}, False, start.round
    if last == start.round:  # nothing to train (until=0): the run's start, checkpointed
        stop = True
        saved = checkpoint(world, start.path, cfg, rnd, 0.0, (shared, population))
        if store:
            store.note_checkpoint(*saved)
    try:
        for rnd in range(start.round + 1, last + 1):
            t0 = time.perf_counter()
            buf, times = train_round(cfg, world, algo, (shared, population), data, mode, rnd,
                                     defense)
            loss_sum, trained, stops, _ = buf.slots.tolist()
            if not (math.isfinite(loss_sum) and torch.isfinite(buf.data).all()):
                # the same reduced buffer on every rank: all of them stop here
                raise Diverged(f"round {rnd}: the training loss or the shared update is NaN "
                               "or inf; stopped before checkpointing it (status diverged; a "
                               "lower train.lr or a tighter clip may help)")
            rec.time_round(rnd, times.compute, times.allreduce, times.exchange)
            bar.update()
            # a signal in the last round changes nothing
            stop = (stops > 0 or rnd == last) and rnd < t.rounds
            if rnd % t.eval_every == 0 or rnd == t.rounds:
                t3 = time.perf_counter()
                table = population.evaluate(algo, shared, data)
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
                saved = checkpoint(world, start.path, cfg, rnd, time.perf_counter() - t_start,
                                   (shared, population))
                if store:
                    store.note_checkpoint(*saved)
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
