"""`python -m hpcfl.sweep SWEEP.yaml (--list | --index I) [key=value ...]`: one point of a grid
of runs; key=value overrides apply to every point (e.g. output.dir=runs/x, train.device=cuda).

A sweep file has
    base:   a config mapping (sections like a run's YAML), or the path of a config YAML
            (relative to the sweep file, else to the working directory);
    grid:   {dotted.key: [values]}: every combination is a point;
    points: [{dotted.key: value, ...}]: listed points; with a grid as well, every listed point
            is combined with every grid combination;
    attack: true/false (default false): each point first attacks round attack.round
            (python -m hpcfl.attack), then trains to the end into the same results file;
    name:   the prefix of its points' results files (default: the sweep file's stem).
Point I runs as output.name <name>-<I, 3 digits> unless it sets output.name; give two sweeps
that write into one output.dir different names. `--list` checks every point's config (a
mistake names the point) and prints the numbered points and the --array range of a Slurm
array job. A finished point (completed, or diverged: rerunning it would diverge again) is
skipped, a preempted one resumes; a finished file of another config (another sweep's point of
the same name) is refused with one line naming the keys that differ.
"""
from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path
from typing import Any

from .config import (ArgumentParser, ConfigError, RunConfig, apply_dict, is_plugin, load_config,
                     load_yaml, parse_override, parse_stored, set_value, validate)
from .experiment import check_same_experiment
from .loop import check_classes, run
from .privacy.attacks import attack_class
from .cli import Command, requeue_own_job
from .store import NotResults, read_results

log = logging.getLogger("hpcfl")


def load_sweep(path: str) -> tuple[dict, list[dict[str, Any]]]:
    """The sweep file's mapping and its points (dotted key -> value), in order."""
    spec = load_yaml(path, "sweep file")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep is a mapping of base, grid, points, attack; not a "
                          f"{type(spec).__name__}")
    unknown = set(spec) - {"base", "grid", "points", "attack", "name"}
    if unknown:
        raise ConfigError(f"{path}: a sweep has base, grid, points, attack, name; not "
                          f"{', '.join(sorted(map(str, unknown)))}")
    name = spec.get("name", Path(path).stem)
    if not isinstance(name, str) or not name or name.startswith(".") or any(
            c in name for c in "/\\"):
        raise ConfigError(f"{path}: name {name!r} is not a plain file-name prefix")
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
        cfg.output.name = f"{spec.get('name', Path(path).stem)}-{index:03d}"
    validate(cfg)
    return cfg


def finished(cfg: RunConfig, attack: bool) -> str | None:
    """The status of the point's results file when there is nothing left to do there
    (completed, with the attack's results if the sweep attacks; or diverged); None when the
    point is to run (no file yet, preempted, or to extend). A finished file of another
    experiment, or of another attack, is refused with one line naming the keys."""
    path = Path(cfg.output.dir) / f"{cfg.output.name}.h5"
    if not path.exists():
        return None
    try:
        stored = read_results(path)
    except NotResults:
        return None  # the run itself says what is wrong with it, with one line
    if stored.status not in ("completed", "diverged"):
        return None
    before = parse_stored(stored.config, path)
    check_same_experiment(before, cfg, path)
    if before.train.rounds != cfg.train.rounds:
        return None  # the run extends it, or says why not
    if attack and stored.status == "completed":
        if cfg.attack.name not in stored.attacks:
            return None
        attacked = parse_stored(stored.attacks[cfg.attack.name], f"{path}, /privacy")
        if attacked.attack != cfg.attack:
            changed = [f"attack.{k}: {v!r} differs from {getattr(attacked.attack, k)!r}"
                       for k, v in vars(cfg.attack).items() if getattr(attacked.attack, k) != v]
            raise ConfigError(f"{', '.join(changed)} in {path} (/privacy/{cfg.attack.name}); "
                              "choose another output.dir, or remove the file to attack again")
    return stored.status


def attacked(cfg: RunConfig) -> bool:
    """Whether the point's results file holds this attack's results already."""
    try:
        return cfg.attack.name in read_results(
            Path(cfg.output.dir) / f"{cfg.output.name}.h5").attacks
    except NotResults:
        return False


def describe(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "(base)"


def checked(path: str, spec: dict, points: list[dict[str, Any]], index: int,
            overrides: list[str] = ()) -> RunConfig:
    """Point `index`'s config, its classes checked (a user's module:Class); a mistake in it
    names the point."""
    try:
        cfg = point_config(path, spec, points[index], index, overrides)
        check_classes(cfg)
        if spec.get("attack") and is_plugin(cfg.attack.name):
            attack_class(cfg.attack.name)
        return cfg
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
            cfgs = [checked(args.sweep, spec, points, i, args.overrides)
                    for i in range(len(points))]
            for i, (point, cfg) in enumerate(zip(points, cfgs)):
                print(f"{i:3d}  {describe(point)}  -> {cfg.output.dir}/{cfg.output.name}.h5")
            print(f"{len(points)} points (a Slurm array: --array=0-{len(points) - 1})")
            return 0
        if not 0 <= args.index < len(points):
            raise ConfigError(f"--index {args.index}: the sweep has points 0-{len(points) - 1}")
        cfg = checked(args.sweep, spec, points, args.index, args.overrides)
        attack = bool(spec.get("attack", False))
        head = f"point {args.index} ({describe(points[args.index])})"
        status = finished(cfg, attack)
        if status:
            print(f"{head}: already {status}, not run again -> "
                  f"{cfg.output.dir}/{cfg.output.name}.h5")
            return 0
        world = cmd.start(cfg.train.device, cfg.engine.threads)
        if attack and not world.on_main(lambda: attacked(cfg)):
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
