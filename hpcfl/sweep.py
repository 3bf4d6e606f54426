"""`python -m hpcfl.sweep SWEEP.yaml (--list | --index I) [key=value ...]`: one point of a grid
of runs; key=value overrides apply to every point (e.g. output.dir=runs/x, train.device=cuda).

A sweep file has
    base:   a config mapping (sections like a run's YAML), or the path of a config YAML
            (relative to the sweep file, else to the working directory);
    grid:   {dotted.key: [values]}: every combination is a point;
    points: [{dotted.key: value, ...}]: listed points; with a grid as well, every listed point
            is combined with every grid combination;
    attack: true/false (default false): each point first attacks round attack.round
            (python -m hpcfl.attack), then trains to the end into the same results file.
Point I runs as output.name <sweep file stem>-<I, 3 digits> unless it sets output.name.
`--list` checks every point's config (a mistake names the point) and prints the numbered
points and the --array range of a Slurm array job. A finished point (completed, or diverged:
rerunning it would diverge again) is skipped; a preempted one resumes.
"""
from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path
from typing import Any

import h5py

from .config import (ArgumentParser, ConfigError, RunConfig, apply_dict, load_config, load_yaml,
                     parse_override, set_value, validate)
from .loop import run
from .cli import Command, requeue_own_job

log = logging.getLogger("hpcfl")


def load_sweep(path: str) -> tuple[dict, list[dict[str, Any]]]:
    """The sweep file's mapping and its points (dotted key -> value), in order."""
    spec = load_yaml(path, "sweep file")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep is a mapping of base, grid, points, attack; not a "
                          f"{type(spec).__name__}")
    unknown = set(spec) - {"base", "grid", "points", "attack"}
    if unknown:
        raise ConfigError(f"{path}: a sweep has base, grid, points, attack; not "
                          f"{', '.join(sorted(map(str, unknown)))}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(k, str) and isinstance(v, list) and v
                                             for k, v in grid.items()):
        raise ConfigError(f"{path}: grid maps dotted keys to non-empty lists of values")
    listed = spec.get("points") or [{}]
    if not isinstance(listed, list) or not all(
            isinstance(q, dict) and all(isinstance(k, str) for k in q) for q in listed):
        raise ConfigError(f"{path}: points is a list of mappings of dotted keys to values")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return spec, [{**q, **c} for q in listed for c in combos]


def point_config(path: str, spec: dict, point: dict[str, Any], index: int,
                 overrides: list[str] = ()) -> RunConfig:
    base = spec.get("base")
    if isinstance(base, str):
        beside = Path(path).parent / base
        cfg = load_config(str(beside if beside.is_file() else base))
    else:
        cfg = RunConfig()
        apply_dict(cfg, base, f"{path}: base")
    for key, value in point.items():
        set_value(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        if key == "output.name":
            raise ConfigError("output.name is set per point; choose a folder with output.dir")
        set_value(cfg, key, value)
    if "output.name" not in point:
        cfg.output.name = f"{Path(path).stem}-{index:03d}"
    validate(cfg)
    return cfg


def results_state(cfg: RunConfig) -> tuple[str | None, bool]:
    """The status of the point's results file (None: none yet) and whether it holds the
    attack's results."""
    path = Path(cfg.output.dir) / f"{cfg.output.name}.h5"
    try:
        with h5py.File(path, "r", locking=False) as f:
            return str(f.attrs.get("status")), f"privacy/{cfg.attack.name}" in f
    except OSError:
        return None, False


def describe(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "(base)"


def checked(path: str, spec: dict, points: list[dict[str, Any]], index: int,
            overrides: list[str] = ()) -> RunConfig:
    """Point `index`'s config; a mistake in it names the point."""
    try:
        return point_config(path, spec, points[index], index, overrides)
    except ConfigError as e:
        raise ConfigError(f"point {index} ({describe(points[index])}): {e}") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="hpcfl: %(message)s", stream=sys.stderr)
    p = ArgumentParser(prog="python -m hpcfl.sweep", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="the sweep YAML")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the points and their count "
                      "(after checking every point's config)")
    what.add_argument("--index", type=int, help="run point I (0-based)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="set for every point, after the sweep file's values")
    cmd, world = Command("hpcfl.sweep"), None
    with cmd:
        # intermixed: the overrides may come after --index I
        args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
        spec, points = load_sweep(args.sweep)
        if args.list:
            # every point checked now, not when the array job reaches it
            for i in range(len(points)):
                checked(args.sweep, spec, points, i, args.overrides)
            for i, point in enumerate(points):
                print(f"{i:3d}  {describe(point)}")
            print(f"{len(points)} points (a Slurm array: --array=0-{len(points) - 1})")
            return 0
        if not 0 <= args.index < len(points):
            raise ConfigError(f"--index {args.index}: the sweep has points 0-{len(points) - 1}")
        cfg = checked(args.sweep, spec, points, args.index, args.overrides)
        attack = bool(spec.get("attack", False))
        if attack and cfg.attack.round < 2:
            raise ConfigError("a sweep with attack: true needs attack.round >= 2 (the attack "
                              "trains the run to the round before, then the run goes on)")
        head = f"point {args.index} ({describe(points[args.index])})"
        status, attacked = results_state(cfg)
        if status == "diverged" or (status == "completed" and (attacked or not attack)):
            print(f"{head}: already {status}, not run again -> "
                  f"{cfg.output.dir}/{cfg.output.name}.h5")
            return 0
        world = cmd.start(cfg.train.device, cfg.engine.threads)
        if attack and not attacked:
            from .attack import attack as attack_run  # imports the attacks only when needed
            line = attack_run(cfg, world)
            if line:
                print(f"{head}: {line}")
        final = run(cfg, world)
    if cmd.code:
        return cmd.code
    if world.is_main:
        state = ("stopped by a signal, checkpointed; rerun to resume" if final.get("stopped")
                 else f"test_acc_mean {final.get('test_acc_mean', float('nan')):.4f}")
        print(f"{head}: {state} -> {final['path']}", flush=True)
        requeued = requeue_own_job() if final.get("stopped") else None
        if requeued:
            print(f"{head}: {requeued}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
