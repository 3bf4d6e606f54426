"""`python -m analysis.privacy_verdict DIR... [--out FIG.png] [--csv TABLE.csv]`: the verdict
table of docs/privacy-verdict.md from the results files of jobs/privacy/verdict_*.yaml.

One row per (data, protocol, attacked setup, budget): PSNR, SSIM and label accuracy over the
targets whose upload carries their images, the share of target images visible in their upload,
the error of the features read off the upload (median), and the count of images. Basin-test
files (attack.basin > 0) make the second table: per setup and noise level, the share of images
the attack brought back (PSNR >= RETURNED dB). The figure: PSNR against iterations, one panel
per data and protocol, and the basin test."""
from __future__ import annotations

import argparse
import sys

import h5py
import numpy as np
import pandas as pd

from analysis.results import results_files, run_config

RETURNED = 25.0  # dB: a reconstruction this close is the image (privacy.md §9.1: >= 20)
SETUPS = ("FedAvg", "FedAvg on HyperFL's weights", "HyperFL server", "HyperFL white-box",
          "HyperFL no output bias")


def setup(cfg: dict) -> str:
    """The attacked setup (the table's row group) of a run's flat config."""
    if cfg["algorithm.name"] != "hyperfl":
        return SETUPS[1] if cfg.get("algorithm.fedavg_init") == "hyperfl" else SETUPS[0]
    if not cfg.get("algorithm.hypernet_bias", True):
        return SETUPS[4]
    name = SETUPS[3] if cfg["attack.threat"] == "white-box" else SETUPS[2]
    return name + (" (no head epoch)" if cfg.get("algorithm.head_epochs", 1) == 0 else "")


def protocol(cfg: dict) -> str:
    steps, batch = cfg["train.local_steps"], cfg["train.batch_size"]
    if steps == 1:
        return f"FedSGD B={batch}"
    return f"{steps} steps of {batch}" if steps else f"{cfg['train.local_epochs']} epochs of {batch}"


def finite_mean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def collect(dirs: list[str]) -> pd.DataFrame:
    """One row per results file with /privacy/ig."""
    rows = []
    for path in results_files(dirs):
        try:
            with h5py.File(path, "r", locking=False) as f:
                if "privacy/ig" not in f:
                    continue
                g = f["privacy/ig"]
                cfg = run_config(g.attrs["config"])
                full = ~g["empty"][:]
                per_image = np.repeat(full, g["images"][:])
                rows.append(dict(
                    data=cfg["data.name"], protocol=protocol(cfg), setup=setup(cfg),
                    round=cfg["attack.round"],
                    iterations=cfg["attack.iterations"], basin=cfg.get("attack.basin", 0.0),
                    psnr=finite_mean(g["psnr"][:][full]), ssim=finite_mean(g["ssim"][:][full]),
                    label_acc=finite_mean(g["label_acc"][:][full]),
                    visible=float(1 - g["invisible"][:].mean()),
                    feature_error=float(np.nanmedian(g["feature_rel_error"][:][full]))
                    if full.any() else np.nan,
                    theta_error=float(np.nanmedian(g["theta_rel_error"][:][full]))
                    if full.any() and np.isfinite(g["theta_rel_error"][:][full]).any()
                    else np.nan,
                    returned=float((g["image_psnr"][:][per_image] >= RETURNED).mean())
                    if per_image.any() else np.nan,
                    images=int(g["images"][:].sum()), empty_targets=int((~full).sum()),
                    targets=len(full), file=str(path)))
        except (OSError, KeyError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
    return pd.DataFrame(rows)


def order(name: str) -> int:
    """A setup's place in the table (its base setup's: the longest one it starts with)."""
    return max((len(s), i) for i, s in enumerate(SETUPS) if name.startswith(s))[1]


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict table: attacks from random images, ordered by data, protocol, setup, budget."""
    t = df[df.basin == 0].copy()
    t["order"] = t.setup.map(order)
    t = t.sort_values(["data", "protocol", "round", "order", "iterations"])
    return t[["data", "protocol", "round", "setup", "iterations", "psnr", "ssim", "label_acc", "visible",
              "feature_error", "theta_error", "images", "empty_targets"]]


def basin(df: pd.DataFrame) -> pd.DataFrame:
    """The basin test: per setup and noise level, the PSNR and the share of images returned."""
    b = df[df.basin > 0].copy()
    b["order"] = b.setup.map(order)
    return b.sort_values(["order", "basin"])[["setup", "basin", "psnr", "returned", "images"]]


def markdown(t: pd.DataFrame) -> str:
    """A table as Markdown, numbers to 3 significant digits (NaN as a dash)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "-" if np.isnan(v) else f"{v:.3g}"
        return str(v)
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.itertuples(index=False)]
    return "\n".join(lines)


def style(name: str) -> dict:
    """One colour per base setup in every panel; dashed, squares without HyperFL's head
    epoch."""
    other = "no head epoch" in name
    return dict(color=f"C{order(name)}", linestyle="--" if other else "-",
                marker="s" if other else "o", label=name)


def figure(t: pd.DataFrame, b: pd.DataFrame, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    panels = list(t.groupby(["data", "protocol", "round"]).groups)
    n = len(panels) + (1 if len(b) else 0)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.6), squeeze=False)
    handles = {}
    for ax, (data, proto, rnd) in zip(axes[0], panels):
        part = t[(t.data == data) & (t.protocol == proto) & (t["round"] == rnd)]
        for name in sorted(set(part.setup), key=order):
            s = part[part.setup == name]
            handles[name] = ax.plot(s.iterations, s.psnr, **style(name))[0]
        ax.set_xscale("log")
        ticks = sorted(set(part.iterations))
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:,}" for v in ticks])
        ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
        ax.set_title(f"{data}, {proto}, round {rnd}", fontsize=9)
        ax.set_ylim(5, max(40, float(part.psnr.max()) + 3))
        ax.set_xlabel("IG iterations")
        ax.set_ylabel("PSNR, targets with their images (dB)", fontsize=8)
        ax.grid(alpha=0.3)
    if len(b):
        ax = axes[0][-1]
        for name in sorted(set(b.setup), key=order):
            s = b[b.setup == name]
            handles[name] = ax.plot(s.basin, s.returned, **style(name))[0]
        ax.set_xscale("log")
        ax.set_title("basin test (digits, FedSGD B=1, round 2)", fontsize=9)
        ax.set_xlabel("start: truth + noise of std (pixels in [0, 1])", fontsize=8)
        ax.set_ylabel(f"share of images returned (>= {RETURNED:.0f} dB)", fontsize=8)
        ax.grid(alpha=0.3)
    names = sorted(handles, key=lambda k: (order(k), k))
    fig.legend([handles[k] for k in names], names, loc="lower center", ncol=len(names),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.privacy_verdict",
                                description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="folders (or files) of results files")
    p.add_argument("--out", help="write the figure here (PNG)")
    p.add_argument("--csv", help="write the table here")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = p.parse_args(argv)
    df = collect(args.dirs)
    if df.empty:
        print("no results file with /privacy/ig", file=sys.stderr)
        return 2
    t, b = table(df), basin(df)
    for part in (t, b) if len(b) else (t,):
        print(markdown(part) if args.markdown else part.to_string(
            index=False, float_format=lambda v: f"{v:.3g}"))
        print()
    if args.csv:
        pd.concat([t.assign(kind="table"), b.assign(kind="basin")]).to_csv(args.csv, index=False)
    if args.out:
        figure(t, b, args.out)
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
