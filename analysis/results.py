"""What every analysis script reads: the results files in some folders, and a run's config as
one flat mapping of dotted keys under today's names (files of earlier versions say e.g.
privacy.clip for privacy.update_clip: hpcfl.config.RENAMED)."""
from __future__ import annotations

from pathlib import Path

import yaml

from hpcfl.config import RENAMED


def results_files(dirs: list[str]) -> list[Path]:
    """The results files in `dirs` and any folder below them (not checkpoints); a file named
    in `dirs` is taken as one, whatever its name."""
    found = set()
    for d in map(Path, dirs):
        found |= {d} if d.is_file() else {p for p in d.rglob("*.h5")
                                          if not p.name.endswith((".ckpt.h5", ".ckpt.prev.h5"))}
    return sorted(found)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as dotted keys, renamed keys under their current names."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            name = f"{prefix}{key}"
            flat[RENAMED.get(name, name)] = value
    return flat


def run_config(text: str) -> dict:
    """A results file's `config` attribute (YAML) as flat dotted keys."""
    return flatten(yaml.safe_load(text) or {})
