import os
import subprocess
import sys

import pytest

from hpcfl.config import load_config

# A run small enough for a unit test: 6 digits clients, 2 rounds of 1 local epoch.
TINY = ["data.num_clients=6", "data.classes_per_client=3", "train.rounds=2",
        "train.local_epochs=1", "algorithm.head_epochs=1", "output.progress=none",
        "train.device=cpu"]


def run_cli(*args: str, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m hpcfl.main ARGS` in a fresh process, as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "hpcfl.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return load_config(None, [*TINY, *overrides])
    return make
