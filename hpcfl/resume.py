"""Where a run starts (fresh, or from its checkpoint) and how checkpoints are taken.

A rerun with the same output.name goes on from `<name>.ckpt.h5` (or the previous checkpoint if
that one is damaged), appending to the same results file; it may use another number of ranks,
since private state is stored per client id. Only rank 0 touches the files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml

from .config import DP_ALGORITHMS, ConfigError, RunConfig, apply_dict
from .engine import flatten
from .store import CheckpointError, checkpoint_paths, save_checkpoint, verify_checkpoint
from .world import World

log = logging.getLogger("hpcfl")
# Keys a resumed run may change; any other change would make it a different experiment.
RESUMABLE_CHANGES = ("train.rounds", "train.eval_every", "train.device", "engine.", "output.",
                     "attack.")


@dataclass
class Start:
    """Where a run starts: fresh, from a checkpoint, or nothing to do."""
    path: Path                    # results file
    checkpoint: Path | None = None
    round: int = 0
    done: bool = False


def plan_start(cfg: RunConfig) -> Start:
    """Decide (on rank 0) whether to start fresh or resume; ConfigError if neither is right."""
    o = cfg.output
    path = Path(o.dir) / f"{o.name}.h5"
    ckpt, prev = checkpoint_paths(path)
    have = [p for p in (ckpt, prev) if p.exists()]
    if o.resume == "must" and o.overwrite:
        raise ConfigError("output.overwrite=true starts over; it cannot go with output.resume=must")
    if o.resume == "never" or o.overwrite or not have:
        if o.resume == "must":
            raise ConfigError(f"output.resume=must but there is no checkpoint {ckpt}")
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
            log.warning("%s", e)
            problems.append(str(e))
    else:
        raise ConfigError(f"no usable checkpoint ({'; '.join(problems)}); set "
                          "output.resume=never output.overwrite=true to start over")
    if not path.exists():
        raise ConfigError(f"checkpoint {p} has no results file {path} to continue")
    with h5py.File(p, "r", locking=False) as f:
        # parsed as a config, so that a file from an older hpcfl compares in today's types
        stored = RunConfig()
        apply_dict(stored, yaml.safe_load(f.attrs["config"]), f"config stored in {p}")
        check_same_experiment(stored.to_dict(), cfg.to_dict(), p)
    if rnd > cfg.train.rounds:
        raise ConfigError(f"train.rounds: {p} is at round {rnd}, past train.rounds="
                          f"{cfg.train.rounds}")
    # At the last round the checkpoint comes after the last row: the run is done, even if it
    # was killed before it could mark its results file completed.
    return Start(path, p, rnd, done=rnd == cfg.train.rounds)


def check_same_experiment(stored: dict, now: dict, where: Path) -> None:
    for section, keys in stored.items():
        for key, value in keys.items():
            name = f"{section}.{key}"
            if now[section][key] == value or (name.startswith(RESUMABLE_CHANGES) and not (
                    name == "train.rounds" and now["algorithm"]["name"] in DP_ALGORITHMS)):
                continue  # (a DP run's noise is calibrated to its number of rounds)
            raise ConfigError(f"{name}: {now[section][key]!r} differs from {value!r} in {where}; "
                              "a resumed run must be the same experiment (or set "
                              "output.resume=never output.overwrite=true, or another output.name)")


def plan_or_error(cfg: RunConfig, world: World) -> Start:
    """Rank 0 plans the start (it alone touches the results file); all ranks follow, or all
    stop with the same ConfigError."""
    return world.on_main(lambda: plan_start(cfg))


def checkpoint(world: World, path: Path, cfg: RunConfig, rnd: int, elapsed: float,
               state: tuple[dict, dict], template: dict, blocks: list[range]) -> None:
    """Every client's private state (laid out as `template`) reaches rank 0 in one Gatherv,
    rows in client-id order (blocks are contiguous); rank 0 writes the checkpoint. `state`: the
    shared state and this rank's clients' private state."""
    shared, private = state
    width = sum(v.numel() for v in template.values())
    rows = np.zeros((len(private), width), np.float32)
    for i, cid in enumerate(sorted(private)):
        rows[i] = flatten(private[cid], template).cpu().numpy()
    if width and world.size > 1:
        rows = world.gather_rows_to_main(rows, [len(b) for b in blocks])
    if not world.is_main:
        return
    out, i = {}, 0
    for n, v in template.items():
        out[n] = rows[:, i:i + v.numel()].reshape(len(rows), *v.shape)
        i += v.numel()
    save_checkpoint(*checkpoint_paths(path), rnd, cfg.to_yaml(), elapsed,
                    {n: v.detach().cpu().numpy() for n, v in shared.items()}, out)
