"""`python -m analysis.summarize DIR|FILE... [--csv F] [--plot DIR]`: one table row per results file
(running, preempted, failed and diverged runs too), mean ± std over seeds, optional figures.

Per run: the config keys (dotted, `output.*` left out) whose values differ between the runs
read, then `final_acc` (test_acc_mean of the last evaluated round), `best_acc` (its max over
rounds), `rounds` (the last evaluated round), `s_per_round`, `world_size`, `status`, `file`.
`s_per_round` comes from /timing: a round's wall time is compute + allreduce + exchange + eval
+ io of its slowest rank, and the median over rounds keeps round 1's warm-up (data, first
kernels) from dominating once a run has 3 or more rounds. Runs whose configs differ only in
`train.seed` (and have the same world size) form a group: the second table, printed when a
group has two or more runs, gives n (runs with an evaluated round), the seeds, and mean ± std
(sample std, ddof=1) of final and best accuracy. `--csv F` writes the run table to F and, when
that second table is printed, the group table to F's name with `-seeds.csv` for its suffix
(runs.csv -> runs-seeds.csv; numbers in `*_mean`, `*_std` columns).

`--plot DIR` writes DIR/accuracy.png (accuracy per round, one line per group: the mean over
seeds, a min-max band), DIR/scaling.png (seconds per round against world size at a fixed number
of clients (strong scaling) and at a fixed number of clients per rank (weak scaling), and its
split into phases; only when the runs have more than one world size or client count),
DIR/population.png (a training round, an evaluation, start-up and a checkpoint against the
number of clients, log axes, one line style per world size; when the runs have more than one
client count, e.g. from `python -m hpcfl.bench population`) and DIR/privacy_utility.png
(analysis.privacy_utility, when a file has /privacy).
A results file can also be named itself. Files that cannot be read as results files are counted
and named in one line. No readable results file, a path that does not exist, or a --csv or
--plot of the wrong kind: one line on stderr and exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

from analysis.results import results_files, run_config
from hpcfl.config import ArgumentParser, ConfigError
from hpcfl.oneline import one_line

PHASES = ("compute", "allreduce", "exchange", "eval", "io")  # exchange: new in 0.2, else 0
SEED = "train.seed"


@dataclass
class Run:
    file: str
    status: str
    world_size: int
    config: dict            # flattened: dotted key -> value
    rounds: np.ndarray      # evaluated rounds
    acc: np.ndarray         # test_acc_mean of those rounds
    phases: pd.DataFrame    # one row per timed round: seconds of each phase on its slowest rank
    costs: dict             # startup_s, checkpoint_s (NaN where the file predates them)


def read_run(path: Path) -> Run:
    with h5py.File(path, "r", locking=False) as f:
        config = run_config(f.attrs["config"])
        # The writer appends one dataset after the other, so a file read mid-write can have one
        # more row in some datasets than in others: keep only the rows complete everywhere.
        m = f["metrics"]
        n = min(len(m["round"]), len(m["test_acc_mean"]))
        rounds, acc = m["round"][:n], m["test_acc_mean"][:n]
        t = f["timing"]
        n = min(len(t[f"{p}_s"]) for p in PHASES if f"{p}_s" in t)
        per_rank = {p: t[f"{p}_s"][:n] if f"{p}_s" in t else np.zeros(t["compute_s"][:n].shape)
                    for p in PHASES}
        status, world_size = str(f.attrs.get("status", "unknown")), int(f.attrs["world_size"])
        costs = {k: float(f.attrs.get(k, np.nan)) for k in ("startup_s", "checkpoint_s")}
    # Ranks wait for each other in the allreduce, so the slowest rank sets the round's time
    # (NaN: a rank that did not exist before a resume on more ranks).
    slowest = np.argmax(sum(np.nan_to_num(per_rank[p]) for p in PHASES), axis=1)
    phases = pd.DataFrame({p: per_rank[p][np.arange(n), slowest] for p in PHASES})
    return Run(str(path), status, world_size, config, rounds, acc, phases, costs)


def varying_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs (a key missing from a run counts as a
    value of its own), in the config's order; output.* names files, not experiments."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    return [k for k in keys if not k.startswith("output.")
            and len({repr(r.config.get(k, "<missing>")) for r in runs}) > 1]


def run_table(runs: list[Run], keys: list[str]) -> pd.DataFrame:
    rows = []
    for r in runs:
        phases = r.phases.median()
        rows.append({**{k: r.config.get(k) for k in keys},
                     "final_acc": r.acc[-1] if len(r.acc) else np.nan,
                     "best_acc": r.acc.max() if len(r.acc) else np.nan,
                     "rounds": int(r.rounds[-1]) if len(r.rounds) else 0,
                     "s_per_round": r.phases.sum(axis=1).median(),
                     "world_size": r.world_size, "status": r.status, "file": r.file,
                     "num_clients": r.config.get("data.num_clients"),
                     **{f"{p}_s": phases[p] for p in PHASES}, **r.costs})
    return pd.DataFrame(rows)


def group_keys(table: pd.DataFrame, keys: list[str]) -> list[str]:
    """What tells seed groups apart: the varying keys but the seed, and the world size."""
    return [k for k in keys if k != SEED] + ["world_size"] * (table.world_size.nunique() > 1)


def label(row, keys: list[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in keys) or "all runs"


def seed_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per group of runs that differ only in the seed: n (runs with an evaluated round),
    the seeds, mean and sample std (ddof=1) of final and best accuracy."""
    gkeys = group_keys(table, keys)
    groups = table.assign(group=[label(row, gkeys) for _, row in table.iterrows()])
    rows = []
    for _, g in groups.groupby("group", sort=False):
        row = {k: g[k].iloc[0] for k in gkeys}
        row.update(n=int(g.final_acc.count()),
                   seeds=",".join(str(s) for s in g[SEED]) if SEED in g else "")
        for c in ("final_acc", "best_acc"):
            row.update({f"{c}_mean": g[c].mean(), f"{c}_std": g[c].std(ddof=1)})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_accuracy(runs: list[Run], table: pd.DataFrame, keys: list[str], out: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    gkeys = group_keys(table, keys)
    curves: dict[str, list[pd.Series]] = {}
    for r, (_, row) in zip(runs, table.iterrows()):
        if len(r.rounds):
            curves.setdefault(label(row, gkeys), []).append(pd.Series(r.acc, index=r.rounds))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, series) in enumerate(curves.items()):
        # Columns are seeds; a run still going has fewer rounds, so the later rounds' mean and
        # band are over the seeds that reached them.
        acc = pd.concat(series, axis=1).sort_index()
        ax.plot(acc.index, acc.mean(axis=1), color=f"C{i}", label=f"{name} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(acc.index, acc.min(axis=1), acc.max(axis=1), color=f"C{i}",
                            alpha=0.2)
    ax.set_xlabel("communication round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (fraction, mean over clients)")
    ax.set_title("Test accuracy per round: mean over seeds (n runs),\n"
                 "shaded: min to max over seeds")
    ax.grid(alpha=0.3)
    # Below the axes: labels of several varying keys are long and would hide the curves.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_scaling(table: pd.DataFrame, out: Path) -> None:
    import matplotlib.pyplot as plt

    # Several runs at one (clients, ranks) point (seeds, methods) are averaged.
    cols = ["s_per_round", *(f"{p}_s" for p in PHASES)]
    points = (table.dropna(subset=["s_per_round"])
              .groupby(["num_clients", "world_size"])[cols].mean().reset_index())
    fig, (strong, weak, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    per_rank = points.num_clients / points.world_size
    for ax, series, what, kind in ((strong, points.num_clients, "clients", "strong"),
                                   (weak, per_rank, "clients per rank", "weak")):
        for i, (n, g) in enumerate(points.groupby(series)):
            ax.plot(g.world_size, g.s_per_round, "o-", color=f"C{i}", label=f"{n:g} {what}")
        ax.set_xscale("log", base=2)
        ranks = sorted(points.world_size.unique())
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("MPI ranks (world size)")
        ax.set_ylabel("seconds per round (median over rounds)")
        ax.set_title(f"{kind.capitalize()} scaling: wall time per round, {what} fixed\n"
                     "(slowest rank, mean over runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    bottom = np.zeros(len(points))
    for p in PHASES:
        right.bar(range(len(points)), points[f"{p}_s"], bottom=bottom, label=p)
        bottom += points[f"{p}_s"].fillna(0).to_numpy()
    ticks = [f"{w} rank{'s' * (w != 1)}\n{c} clients"
             for c, w in zip(points.num_clients, points.world_size)]
    right.set_xticks(range(len(points)), ticks, fontsize=8)
    right.set_ylabel("seconds per round (median of each phase)")
    right.set_title("Where a round's time goes (slowest rank)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_population(table: pd.DataFrame, out: Path) -> None:
    """Cost against the population (log axes), one line style per world size: a training
    round, an evaluation, start-up and a checkpoint (hpcfl.bench population writes such runs)."""
    import matplotlib.pyplot as plt

    costs = {"training round": ("compute_s", "allreduce_s", "exchange_s"),
             "evaluation": ("eval_s",), "start-up": ("startup_s",),
             "checkpoint": ("checkpoint_s",)}
    points = table.groupby(["num_clients", "world_size"]).mean(numeric_only=True).reset_index()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for j, (ranks, g) in enumerate(points.groupby("world_size")):
        for i, (what, cols) in enumerate(costs.items()):
            y = g[list(cols)].sum(axis=1, min_count=1)
            ax.plot(g.num_clients, y, ["o-", "s--", "^:", "d-."][j % 4], color=f"C{i}",
                    label=f"{what}, {ranks} rank{'s' * (ranks != 1)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients in the run (population)")
    ax.set_ylabel("seconds (median over rounds)")
    ax.set_title("Cost against the population (slowest rank, mean over runs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse(argv: list[str]) -> argparse.Namespace:
    """The arguments, checked before anything is read or written: the inputs exist, and the
    outputs are not of the wrong kind (a folder where --csv names a file, and the reverse)."""
    p = ArgumentParser(prog="python -m analysis.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="folders of results files (searched below), or "
                   "results files")
    p.add_argument("--csv", help="write the run table here, the seed groups to <stem>-seeds.csv")
    p.add_argument("--plot", help="write PNG figures into this folder")
    args = p.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:
        raise ConfigError(f"no such file or folder: {', '.join(missing)}")
    if args.csv and (Path(args.csv).is_dir() or any(q.is_file() for q in Path(args.csv).parents)):
        raise ConfigError(f"--csv {args.csv}: not a file that can be written (a directory, or "
                          "below a file)")
    if args.plot and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise ConfigError(f"--plot {args.plot} is a file; name the folder for the figures")
    return args


def read_runs(dirs: list[str]) -> tuple[list[Run], list[str]]:
    """The runs of the results files in `dirs`, and 'name (why)' of each file that cannot be
    read as one (not HDF5, truncated, another program's)."""
    runs, unreadable = [], []
    for path in results_files(dirs):
        try:
            runs.append(read_run(path))
        except (OSError, KeyError, ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
            unreadable.append(f"{path.name} ({type(e).__name__}: {one_line(e)[:120]})")
    return runs, unreadable


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        runs, unreadable = read_runs(args.dirs)
        if not runs:
            left = f"; unreadable: {', '.join(unreadable)}" if unreadable else ""
            raise ConfigError(f"no readable results file in {', '.join(args.dirs)}{left}")
    except ConfigError as e:
        print(f"analysis.summarize: error: {e}", file=sys.stderr)
        return 2
    if unreadable:
        print(f"{len(unreadable)} unreadable files left out: {', '.join(unreadable)}")
    keys = varying_keys(runs)
    table = run_table(runs, keys)
    seeds = seed_table(table, keys)
    shown = [*keys, "final_acc", "best_acc", "rounds", "s_per_round", "world_size", "status",
             "file"]
    print(table[shown].to_string(index=False, formatters={
        c: "{:.4f}".format for c in ("final_acc", "best_acc", "s_per_round")}))
    written = []
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table[shown].to_csv(args.csv, index=False)
        written.append(args.csv)
    if (seeds.n > 1).any():
        shown_seeds = seeds.drop(columns=[c for c in seeds if c.endswith(("_mean", "_std"))])
        for c in ("final_acc", "best_acc"):
            shown_seeds[c] = [f"{m:.4f}" + (f" ± {s:.4f}" if n > 1 else "") for m, s, n
                              in zip(seeds[f"{c}_mean"], seeds[f"{c}_std"], seeds.n)]
        print("\nmean ± std (ddof=1) over seeds, n runs per group:")
        print(shown_seeds.to_string(index=False))
        if args.csv:
            path = Path(args.csv)
            seeds.to_csv(path.with_name(f"{path.stem}-seeds.csv"), index=False)
            written.append(str(path.with_name(f"{path.stem}-seeds.csv")))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        from analysis.privacy_utility import collect, plot

        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        if any(len(r.rounds) for r in runs):
            plot_accuracy(runs, table, keys, out / "accuracy.png")
            written.append(str(out / "accuracy.png"))
        else:
            print("no accuracy figure: no run has an evaluated round yet")
        if table.world_size.nunique() > 1 or table.num_clients.nunique() > 1:
            plot_scaling(table, out / "scaling.png")
            written.append(str(out / "scaling.png"))
        else:
            print("no scaling figure: every run has the same world size and number of clients")
        if table.num_clients.nunique() > 1:
            plot_population(table, out / "population.png")
            written.append(str(out / "population.png"))
        privacy, _ = collect(args.dirs)
        if not privacy.empty:
            plot(privacy, out / "privacy_utility.png")
            written.append(str(out / "privacy_utility.png"))
    print(f"{len(runs)} runs" + (f" -> {', '.join(written)}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
