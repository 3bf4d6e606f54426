"""`python -m hpcfl.main [CONFIG.yaml] [key=value ...]`: one federated run.

    python -m hpcfl.main jobs/quickstart.yaml train.rounds=50
    mpiexec -n 4 python -m hpcfl.main jobs/quickstart.yaml
    srun --mpi=pmi2 python -m hpcfl.main jobs/quickstart.yaml

The command line of the run in hpcfl.loop (docs/ARCHITECTURE.md, "The round").
Exit codes: 0 done, or stopped by a signal after checkpointing (status `preempted`; under
slurm/*.sbatch the job then requeues itself); 2 bad input (one line on stderr, no results file
written); 3 diverged (a round's loss or update was NaN/inf: status `diverged`, nothing
checkpointed past the last finite round); 1 a crash (every rank is aborted, status `failed`).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, describe, load_config
from .loop import run
from .cli import Command, requeue_own_job
from .store import NotResults, read_results

USAGE = """usage: python -m hpcfl.main [CONFIG.yaml] [--from RESULTS.h5] [section.key=value ...]

Runs one federated-learning experiment and writes <output.dir>/<output.name>.h5.
CONFIG.yaml sets keys by section (see jobs/); key=value overrides win; --from RESULTS.h5 starts
from the config stored in a results file. Keys, defaults and allowed values:
"""


def parse_args(argv: list[str]) -> RunConfig:
    path, base, overrides = None, None, []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(USAGE + describe())
            raise SystemExit(0)
        if a == "--from":
            if not args:
                raise ConfigError("--from needs a results file")
            base = stored_config(args.pop(0))
        elif "=" not in a and path is None and not a.startswith("-"):
            path = a
        else:
            overrides.append(a)
    return load_config(path, overrides, base_yaml=base)


def stored_config(path: str) -> str:
    try:
        return read_results(Path(path)).config
    except NotResults as e:
        raise ConfigError(f"--from {path}: not an hpcfl results file ({e})") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="hpcfl: %(message)s", stream=sys.stderr)
    cmd = Command("hpcfl")
    with cmd:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        world = cmd.start(cfg.train.device, cfg.engine.threads)
        # ConfigErrors found once the device or data is known come before any results file
        final = run(cfg, world)
    if cmd.code:
        return cmd.code
    if not world.is_main:
        return 0
    head = f"{cfg.algorithm.name} on {cfg.data.name}: {cfg.data.num_clients} clients"
    if final.get("done"):
        print(f"{head}: already completed ({final['round']} rounds) -> {final['path']} "
              "(output.overwrite=true runs it again)")
    elif final.get("stopped"):
        print(f"{head}: stopped by a signal after round {final['round']}, checkpointed; rerun "
              f"the same command to resume -> {final['path']}", flush=True)
        requeued = requeue_own_job()
        if requeued:
            print(requeued, flush=True)
    else:
        print(f"{head}, {final['round']} rounds in {final['elapsed_s']:.1f} s; final "
              f"test_acc_mean {final['test_acc_mean']:.4f} (weighted "
              f"{final['test_acc_weighted']:.4f}) -> {final['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
