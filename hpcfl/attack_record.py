"""What `python -m hpcfl.attack` records: /privacy/<attack.name> in the run's results file, a PNG
of truth against reconstruction beside it, and the means its summary line reports."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .config import RunConfig
from .privacy.metrics import LPIPS_NOTE

# What the adaptive attack read off a hypernetwork upload, against the truth (NaN otherwise).
# And what the server threat's other unknowns (HyperFL's head) were at the start and the end, and
# the first Linear layer's input that one step's upload gives (analytic.FeatureHint).
RECOVERY = ("theta_rel_error", "h_rel_error", "theta_rel_error_final", "head_rel_error",
            "head_rel_error_final", "feature_rel_error")


def save_grid(path: Path, truth: np.ndarray, rec: np.ndarray, scale: int = 4) -> None:
    """Truth on the top row, reconstruction below, each image scaled up."""
    from PIL import Image

    rows = [np.concatenate(list(imgs.transpose(0, 2, 3, 1)), axis=1) for imgs in (truth, rec)]
    grid = np.concatenate(rows, axis=0)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


MEANS = ("psnr", "ssim", "label_acc")


def means(results: list[dict]) -> dict[str, float]:
    """The scores' means over the targets whose uploads carry any of their images (NaN if none
    does): an empty upload is named and counted, not averaged in. A label accuracy is NaN where
    the attack sought no label (a surrogate head's)."""
    out = {}
    for k in MEANS:
        kept = [r[k] for r in results if not r["empty"] and np.isfinite(r[k])]
        out[k] = float(np.mean(kept)) if kept else float("nan")
    return out


def write(path: Path, cfg: RunConfig, results: list[dict]) -> Path:
    """/privacy/<attack.name>: per target (attacked client) its scores, image count and whether
    its upload was empty; per target image, end to end in target order, the truth, the
    reconstruction, its PSNR, its share of its step's gradient, whether it is invisible and
    its index in the client's training set."""
    a = cfg.attack
    with h5py.File(path, "r+", locking=False) as f:
        if f"privacy/{a.name}" in f:
            del f[f"privacy/{a.name}"]
        g = f.require_group("privacy").create_group(a.name)
        for key in ("psnr", "ssim", "label_acc", "loss", "truth_loss", *RECOVERY):
            g[key] = np.array([r[key] for r in results], dtype="f8")
        g["targets"] = np.array([r["client"] for r in results], dtype="i8")
        g["images"] = np.array([r["images"] for r in results], dtype="i8")
        g["empty"] = np.array([r["empty"] for r in results], dtype=bool)
        for key, kind in (("reconstruction", None), ("truth", None), ("image_psnr", "f8"),
                          ("share", "f8"), ("invisible", bool), ("index", "i8")):
            joined = np.concatenate([r[key] for r in results])
            g[key] = joined if kind is None else joined.astype(kind)
        mean = means(results)
        g.attrs.update(config=cfg.to_yaml(), round=a.round, threat=a.threat,
                       defense=cfg.privacy.defense, multi_step=results[0]["multi_step"],
                       adaptive=a.adaptive, analytic=a.analytic, lpips=LPIPS_NOTE,
                       empty_targets=int(sum(r["empty"] for r in results)),
                       **{f"mean_{k}": v for k, v in mean.items()})
    png = path.with_name(f"{path.stem}-{a.name.replace(':', '.')}-r{a.round}.png")  # a plugin's module:Class
    save_grid(png, np.concatenate([r["truth"] for r in results]),
              np.concatenate([r["reconstruction"] for r in results]))
    return png
