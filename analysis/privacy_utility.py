"""`python -m analysis.privacy_utility DIR... [--out FIG.png] [--csv TABLE.csv]`: privacy
against utility, one point per run: the mean PSNR of an attack on its uploads (/privacy/<attack>)
against its final mean test accuracy; one marker per defense, one colour per algorithm. Files
without /privacy, or with no evaluated round, are left out (and counted)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from analysis.results import results_files, run_config

MARKERS = dict(none="o", dp_gaussian="s", dp_laplace="D", topk="^", soteria="v",
               random_slice="P", gradienthide="X")


def strength(cfg: dict) -> str:
    """The defense's strength keys (of a flat config), as text."""
    keys = dict(dp_gaussian=("update_clip", "noise"), dp_laplace=("update_clip", "noise"),
                topk=("topk_ratio",), soteria=("soteria_rate",),
                random_slice=("slice_noise", "slice_sample_clip"), gradienthide=("hide_batch",))
    # files written before a key existed lack it
    return " ".join(f"{k}={cfg[f'privacy.{k}']}" for k in keys.get(cfg["privacy.defense"], ())
                    if f"privacy.{k}" in cfg)


def collect(dirs: list[str]) -> tuple[pd.DataFrame, int]:
    """One row per (results file, attack): algorithm, defense, strength, muted, attack, threat,
    adaptive, local_steps, psnr, ssim, label_acc, theta_rel_error (NaN but for an adaptive
    attack on a hypernetwork), accuracy, rounds, status, file; and the number of files skipped.
    """
    rows, skipped = [], 0
    for path in results_files(dirs):
        try:
            with h5py.File(path, "r", locking=False) as f:
                cfg = run_config(f.attrs["config"])
                if "privacy" not in f or len(f["metrics/round"]) == 0:
                    skipped += 1
                    continue
                for name, g in f["privacy"].items():
                    rows.append(dict(
                        algorithm=cfg["algorithm.name"], defense=cfg["privacy.defense"],
                        strength=strength(cfg),
                        muted=bool(cfg.get("attack.mute_defended_layer", False)),
                        attack=name, threat=str(g.attrs.get("threat", "")),
                        adaptive=bool(g.attrs.get("adaptive", False)),
                        local_steps=int(cfg.get("train.local_steps", 0)),
                        psnr=float(np.mean(g["psnr"][:])), ssim=float(np.mean(g["ssim"][:])),
                        label_acc=float(np.mean(g["label_acc"][:])),
                        theta_rel_error=(float(np.mean(g["theta_rel_error"][:]))
                                         if "theta_rel_error" in g else np.nan),
                        accuracy=float(f["metrics/test_acc_mean"][-1]),
                        rounds=int(f["metrics/round"][-1]), status=str(f.attrs["status"]),
                        file=str(path)))
        except (OSError, KeyError):
            skipped += 1
    return pd.DataFrame(rows), skipped


def plot(table: pd.DataFrame, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colours = {a: f"C{i}" for i, a in enumerate(sorted(table.algorithm.unique()))}
    for row in table.itertuples():
        ax.scatter(row.accuracy, row.psnr, marker=MARKERS.get(row.defense, "*"),
                   color=colours[row.algorithm], s=60,
                   facecolors="none" if row.muted else colours[row.algorithm])
    for defense in table.defense.unique():
        ax.scatter([], [], marker=MARKERS.get(defense, "*"), color="grey", label=defense)
    for algorithm, colour in colours.items():
        ax.scatter([], [], marker="o", color=colour, label=algorithm)
    ax.set_xlabel("final test accuracy (mean over clients)")
    ax.set_ylabel("attack PSNR (dB, mean over attacked clients)")
    ax.set_title("privacy vs utility: lower and to the right is better\n"
                 "(hollow: the attack leaves Soteria's layer out)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.privacy_utility",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="folders of results files")
    p.add_argument("--out", default="privacy_utility.png", help="the figure (PNG)")
    p.add_argument("--csv", help="also write the table as CSV")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    table, skipped = collect(args.dirs)
    if table.empty:
        print(f"analysis.privacy_utility: error: no results file with /privacy in "
              f"{', '.join(args.dirs)} ({skipped} without)", file=sys.stderr)
        return 2
    plot(table, Path(args.out))
    if args.csv:
        table.to_csv(args.csv, index=False)
    cols = ["algorithm", "defense", "strength", "muted", "attack", "threat", "adaptive",
            "local_steps", "psnr", "ssim", "label_acc", "theta_rel_error", "accuracy", "status"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(table)} points -> {args.out}" + (f", {args.csv}" if args.csv else "")
          + (f"; {skipped} files without /privacy or rounds left out" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
