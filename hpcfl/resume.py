"""Where a run starts (fresh, or from its checkpoint) and how checkpoints are taken.

A rerun with the same output.name goes on from `<name>.ckpt.h5` (or the previous checkpoint if
that one is damaged), appending to the same results file; it may use another number of ranks,
since private state is stored per client id. Only rank 0 touches the files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .config import DP_ALGORITHMS, ConfigError, RunConfig, is_plugin, parse_stored
from .experiment import check_same_experiment
from .oneline import one_line
from .population import Population
from .store import (CheckpointError, CheckpointWriter, NotResults, StoredRun, checkpoint_paths,
                    read_results, rows_per_chunk, verify_checkpoint)
from .world import World

log = logging.getLogger("hpcfl")


@dataclass
class Start:
    """Where a run starts: fresh, from a checkpoint, or nothing to do."""
    path: Path                    # results file
    checkpoint: Path | None = None
    round: int = 0
    done: bool = False


def plan_start(cfg: RunConfig, device_type: str = "cpu") -> Start:
    """Decide (on rank 0) whether to start fresh or resume on `device_type`; ConfigError if
    neither is right."""
    o = cfg.output
    path = Path(o.dir) / f"{o.name}.h5"
    ckpt, prev = checkpoint_paths(path)
    have = [p for p in (ckpt, prev) if p.exists()]
    if o.resume == "must" and o.overwrite:
        raise ConfigError("output.overwrite=true starts over; it cannot go with output.resume=must")
    if o.resume == "never" or o.overwrite or not have:
        if o.resume == "must":
            raise ConfigError(f"output.resume=must but there is no checkpoint {ckpt}")
        if path.exists() and not have and not o.overwrite and o.resume == "auto":
            return finished(cfg, path)
        if (path.exists() or have) and not o.overwrite:
            raise ConfigError(f"output.name: {path} exists; choose another output.name or set "
                              "output.overwrite=true to start over")
        for p in have:
            p.unlink()
        return Start(path)
    problems = []
    for p in have:
        try:
            rnd = verify_checkpoint(p)
            break
        except CheckpointError as e:
            problems.append(str(e))
    else:
        raise ConfigError(f"no usable checkpoint ({'; '.join(problems)}); set "
                          "output.resume=never output.overwrite=true to start over")
    for problem in problems:  # said once the fallback is known to work, else in the error
        log.warning("%s; going on from %s", problem, p)
    if not path.exists():
        raise ConfigError(f"checkpoint {p} has no results file {path} to continue")
    check_readable(path)
    with h5py.File(p, "r", locking=False) as f:
        # parsed as a config, so that a file from an older hpcfl compares in today's types
        check_same_experiment(parse_stored(f.attrs["config"], p), cfg, p)
    check_same_noise(cfg, path, device_type)
    if rnd > cfg.train.rounds:
        raise ConfigError(f"train.rounds: {p} is at round {rnd}, past train.rounds="
                          f"{cfg.train.rounds}")
    # At the last round the checkpoint comes after the last row: the run is done, even if it
    # was killed before it could mark its results file completed.
    return Start(path, p, rnd, done=rnd == cfg.train.rounds)


def finished(cfg: RunConfig, path: Path) -> Start:
    """A results file without a checkpoint (its checkpoints removed, or written before
    checkpoints were kept) is done if it completed this experiment, the same number of rounds;
    anything else there is refused with one line."""
    run = check_readable(path)
    if run.status != "completed":
        raise ConfigError(f"output.name: {path} exists ({run.status}, no checkpoint to go on "
                          "from); choose another output.name or set output.overwrite=true to "
                          "start over")
    stored = parse_stored(run.config, path)
    check_same_experiment(stored, cfg, path)
    if stored.train.rounds != cfg.train.rounds:
        raise ConfigError(f"train.rounds: {path} completed {stored.train.rounds} rounds and has "
                          "no checkpoint to go on from; choose another output.name or set "
                          "output.overwrite=true to start over")
    return Start(path, None, stored.train.rounds, done=True)


def check_same_noise(cfg: RunConfig, results: Path, device_type: str) -> None:
    """DP and defense noise come from generators of the device they run on, and CPU and CUDA
    generators give other draws from one seed: a noisy run resumes on its own device type."""
    # (a user's algorithm may draw noise: it is held to this too)
    if (cfg.algorithm.name not in DP_ALGORITHMS and not is_plugin(cfg.algorithm.name)
            and cfg.privacy.defense == "none"):
        return
    with h5py.File(results, "r", locking=False) as f:
        before = str(f.attrs.get("device", device_type)).split(":")[0]
    if before != device_type:
        raise ConfigError(f"train.device: this run drew its noise on {before}; resumed on "
                          f"{device_type} it would draw other noise (device-specific "
                          f"generators). Resume it on {before}, or start over "
                          "(output.resume=never output.overwrite=true)")


def plan_or_error(cfg: RunConfig, world: World) -> Start:
    """Rank 0 plans the start (it alone touches the results file); all ranks follow, or all
    stop with the same ConfigError."""
    return world.on_main(lambda: plan_start(cfg, world.device.type))


def checkpoint(world: World, path: Path, cfg: RunConfig, rnd: int, elapsed: float,
               state: tuple[dict, Population]) -> tuple[float, int]:
    """Rank 0 writes the checkpoint: the shared state, then every private tensor as rows of all
    clients in id order, each rank's hosted rows streamed to it a chunk at a time (point to
    point, in rank order: no rank holds more than its own rows and one chunk). Returns, on rank
    0, the seconds it took and the file's size (zeros elsewhere)."""
    t0 = time.perf_counter()
    writer = None
    try:
        if world.is_main:
            writer = CheckpointWriter(checkpoint_paths(path), rnd, cfg.to_yaml(), elapsed,
                                      {k: v.detach().cpu().numpy() for k, v in state[0].items()})
        _stream_rows(world, state[1], writer)
        size = writer.finish() if writer else 0
    except OSError as e:  # h5py reports a failed write as an OSError
        if not world.is_main:
            raise
        if writer:
            writer.abandon()
        raise ConfigError(f"checkpoint {checkpoint_paths(path)[0]} of round {rnd} could not be "
                          f"written ({one_line(e)}); the previous checkpoint is kept") from None
    return (time.perf_counter() - t0, size) if writer else (0.0, 0)


def check_readable(path: Path) -> StoredRun:
    """A results file to go on with must read (a truncated copy, a full disk at its last write):
    else one line, and nothing is written to it."""
    try:
        return read_results(path)
    except NotResults as e:
        raise ConfigError(f"output.name: results file {path} is damaged ({e}); it is left "
                          "as it is: move it away, or set output.overwrite=true to start over")


def _stream_rows(world: World, population: Population, writer) -> None:
    """The ids of the written clients, then every private tensor's rows of those clients, in id
    order, into rank 0's writer: each rank's rows in turn (ranks host contiguous id blocks)."""
    table = population.table
    mine = table.written_ids()
    per_rank = world.gather_to_main(mine)  # ids: 8 bytes a written client
    if writer:
        writer.ids(np.concatenate(per_rank))
    counts = [len(ids) for ids in per_rank] if writer else None
    for name in sorted(table.names):
        shape = table.shapes[name]
        if writer:
            writer.begin(name, (sum(counts), *shape))
        step = rows_per_chunk(shape)
        for r in range(world.size):
            n = len(mine) if r == world.rank else (counts[r] if writer else 0)
            for i in range(0, n, step):
                if r == world.rank:
                    rows = table.get(mine[i:i + step], [name])[name].detach().cpu().numpy()
                    if writer:
                        writer.write(rows)
                    else:
                        world.send_to_main(rows)
                elif writer:
                    writer.write(world.receive_from(r, (min(step, n - i), *shape)))
