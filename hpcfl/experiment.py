"""What makes two configs one experiment: the check that an existing file holds the experiment
asked for (a resumed run may change only the keys of config.RESUMABLE), and the digest that
names an experiment's results file (hpcfl.loop.default_name)."""
from __future__ import annotations

import hashlib

import yaml

from .config import DP_ALGORITHMS, RESUMABLE, ConfigError, RunConfig


def resumable(key: str, algorithm: str) -> bool:
    """Whether a resumed run of `algorithm` may change `key` (RESUMABLE)."""
    if key == "train.rounds" and algorithm in DP_ALGORITHMS:
        return False
    return key in RESUMABLE or f"{key.split('.')[0]}.*" in RESUMABLE


def check_same_experiment(stored: RunConfig, now: RunConfig, where) -> None:
    """One line naming every key that differs between the config stored in `where` (a
    checkpoint, a results file) and the requested one, and that a resumed run may not change
    (RESUMABLE): a run that goes on, or is reported done, in an existing file must be the
    experiment that file holds."""
    old, new = stored.to_dict(), now.to_dict()
    changed = [f"{sec}.{key}: {new[sec][key]!r} differs from {value!r}"
               for sec, keys in old.items() for key, value in keys.items()
               if new[sec][key] != value and not resumable(f"{sec}.{key}", now.algorithm.name)]
    if changed:
        raise ConfigError(f"{', '.join(changed)} in {where}; a rerun into an existing results "
                          "file must be the same experiment: choose another output.name (or "
                          "output.dir), or set output.overwrite=true to replace it")


def experiment_digest(cfg: RunConfig) -> str:
    """8 hex digits of the config without its output and attack sections: the same for every
    command line of one experiment (python -m hpcfl.attack and hpcfl.main of one config, a
    requeued Slurm job), another for any other."""
    tree = {sec: keys for sec, keys in cfg.to_dict().items() if sec not in ("output", "attack")}
    return hashlib.sha256(yaml.safe_dump(tree, sort_keys=True).encode()).hexdigest()[:8]
