"""`python -m hpcfl.main [CONFIG.yaml] [key=value ...]`: one federated run.

    mpiexec -n 4 python -m hpcfl.main jobs/quickstart.yaml train.rounds=50
    srun python -m hpcfl.main jobs/quickstart.yaml

The run reads as the round of DESIGN §1: config -> world -> data -> clients hosted here -> for each
round: cohort, local training, one Allreduce, server step, evaluation -> results file.
Exit codes: 0 done; 2 bad input (one line on stderr, no results file written); 1 a crash.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .algorithms import build_algorithm
from .config import ConfigError, RunConfig, describe, load_config
from .data import load_federated
from .data.partition import rng
from .engine import EXTRA_SLOTS, evaluate_client, train_cohort, unflatten
from .store import TIMING, ResultsFile, git_commit
from .world import World, balanced_blocks

log = logging.getLogger("hpcfl")
COHORT = 104  # stream tag, see data.partition.rng

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
        with h5py.File(path, "r", locking=False) as f:
            return f.attrs["config"]
    except (OSError, KeyError) as e:
        raise ConfigError(f"--from {path}: not an hpcfl results file ({e})") from None


def sample_cohort(seed: int, rnd: int, num_clients: int, frac: float) -> list[int]:
    """The clients of round `rnd`: identical on every rank, drawn from (seed, rnd) alone."""
    m = max(int(frac * num_clients), 1)  # as the official code
    return sorted(rng(seed, COHORT, rnd).choice(num_clients, m, replace=False).tolist())


def results_path(cfg: RunConfig) -> Path:
    if not cfg.output.name:
        cfg.output.name = (f"{cfg.algorithm.name}-{cfg.data.name}-"
                           f"{time.strftime('%Y%m%d-%H%M%S')}")
    path = Path(cfg.output.dir) / f"{cfg.output.name}.h5"
    if path.exists() and not cfg.output.overwrite:
        raise ConfigError(f"output.name: {path} exists; choose another output.name or set "
                          "output.overwrite=true")
    return path


def provenance(cfg: RunConfig, world: World) -> dict:
    return dict(hpcfl_version=__version__, git_commit=git_commit(), config=cfg.to_yaml(),
                seed=cfg.train.seed, world_size=world.size, 
                hostnames=",".join(world.hostnames()),
                device=str(world.device), torch_version=str(torch.__version__),
                cuda_version=torch.version.cuda or "none", mpi_version=world.mpi_version())


def evaluate(algo, shared, private, data, num_clients: int) -> np.ndarray:
    """(num_clients, 3): correct, summed loss, test size; rows of clients hosted elsewhere are 0."""
    table = np.zeros((num_clients, 3))
    for cid, state in private.items():
        c = data.clients[cid]
        table[cid] = (*evaluate_client(algo, {**shared, **state}, c.x_test, c.y_test), c.num_test)
    return table


def run(cfg: RunConfig, world: World) -> dict:
    t, n = cfg.train, cfg.data.num_clients
    data = load_federated(cfg.data, t.seed, world.device,
                          hosted=lambda sizes: balanced_blocks(sizes, world.size)[world.rank])
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    path = results_path(cfg)
    to_dev = lambda p: {k: v.to(world.device) for k, v in p.items()}  # noqa: E731
    shared = to_dev(algo.init_shared())
    private = {cid: to_dev(algo.init_client(cid)) for cid in data.clients}
    weights = [float(s) for s in data.num_train]

    store = ResultsFile(path, provenance(cfg, world), data.num_train, data.num_test,
                        world.size) if world.is_main else None
    mode = cfg.output.progress
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    bar = tqdm(total=t.rounds, unit="round", disable=not (world.is_main and mode == "bar"))
    timing_rows: list[list[float]] = []  # this rank's [compute, allreduce, eval] per round
    start, final = time.perf_counter(), {}
    try:
        for rnd in range(1, t.rounds + 1):
            t0 = time.perf_counter()
            mine = [c for c in sample_cohort(t.seed, rnd, n, t.frac) if c in private]
            buf = train_cohort(algo, shared, private, data.clients, mine,
                               [weights[c] for c in mine], t.batch_size, t.seed, rnd)
            t1 = time.perf_counter()
            world.allreduce_sum_(buf)
            t2 = time.perf_counter()
            loss_sum, trained, weight = buf[-EXTRA_SLOTS:].tolist()
            algo.server_step(shared, unflatten(buf[:-EXTRA_SLOTS], shared), weight)
            timing_rows.append([t1 - t0, t2 - t1, 0.0])
            bar.update()
            if rnd % t.eval_every and rnd != t.rounds:
                continue
            t3 = time.perf_counter()
            table = evaluate(algo, shared, private, data, n)
            timing_rows[-1][2] = time.perf_counter() - t3
            # One Reduce per evaluation brings every client's results and every rank's timings
            # of the rounds since the last evaluation to rank 0.
            timing = np.zeros((len(timing_rows), world.size, 3))
            timing[:, world.rank] = timing_rows
            total = world.reduce_sum_to_main(np.concatenate([table.ravel(), timing.ravel()]))
            first = rnd - len(timing_rows) + 1
            timing_rows = []
            if not world.is_main:
                continue
            table, timing = total[:table.size].reshape(table.shape), total[table.size:]
            acc, loss = table[:, 0] / table[:, 2], table[:, 1] / table[:, 2]
            now = time.perf_counter()
            final = dict(round=rnd, test_acc_mean=acc.mean(),
                         test_acc_weighted=table[:, 0].sum() / table[:, 2].sum(),
                         test_loss_mean=loss.mean(), train_loss=loss_sum / trained,
                         round_time_s=now - t0, elapsed_s=now - start)
            store.append_eval(final, dict(test_acc=acc, test_loss=loss))
            store.flush()
            timing = timing.reshape(-1, world.size, 3)
            io = np.zeros((len(timing), world.size))
            io[-1, 0] = time.perf_counter() - now
            store.append_timing(list(range(first, rnd + 1)),
                                dict(zip(TIMING, [*np.moveaxis(timing, 2, 0), io])))
            store.flush()
            bar.set_postfix(acc=f"{final['test_acc_mean']:.3f}", loss=f"{final['train_loss']:.3f}")
            if mode == "log":
                log.info("round %d/%d  test_acc_mean %.4f  train_loss %.4f  %.2f s/round",
                         rnd, t.rounds, final["test_acc_mean"], final["train_loss"],
                         final["elapsed_s"] / rnd)
    except BaseException:
        bar.close()
        if store:
            store.close("failed")
        raise
    bar.close()
    if store:
        store.close("completed", elapsed_s=time.perf_counter() - start)
    final["path"] = str(path)
    return final


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="hpcfl: %(message)s", stream=sys.stderr)
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"hpcfl: error: {e}", file=sys.stderr)
        return 2
    world = None
    try:
        world = World(cfg.train.device)
        final = run(cfg, world)
    except ConfigError as e:  # found once the device or data is known, before any results file
        if world is None or world.is_main:
            print(f"hpcfl: error: {e}", file=sys.stderr)
        return 2
    except BaseException as exc:
        if world is not None and world.size > 1:  # one failing rank must end the job, not hang the others
            import mpi4py.run
            mpi4py.run.set_abort_status(exc)
        raise
    if world.is_main:
        print(f"{cfg.algorithm.name} on {cfg.data.name}: {cfg.data.num_clients} clients, "
              f"{final['round']} rounds in {final['elapsed_s']:.1f} s; final test_acc_mean "
              f"{final['test_acc_mean']:.4f} (weighted {final['test_acc_weighted']:.4f}) "
              f"-> {final['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
