"""Faults a cluster run meets, each acted on where it arrives (in-process, real runs)."""
import os
import signal

import h5py
import torch

from hpcfl.config import load_config
from hpcfl.engine import precision
from hpcfl.loop import run
from hpcfl.privacy.defenses import DEFENSES, Defense, register
from hpcfl.world import World

BASE = ["data.num_clients=4", "algorithm.name=fedavg", "train.local_steps=1", "train.rounds=5",
        "output.progress=none", "output.checkpoint_every=0"]


def test_a_signal_during_local_training_stops_the_run_after_that_round(tmp_path):
    """Slurm's SIGTERM arriving while round 2 trains: the stop vote is read after local
    training, so round 2 is the last (before, the vote was taken before training and the run
    went on to round 3, spending the grace time)."""
    calls = []

    @register
    class SignalInRound2(Defense):
        name = "signal_in_round_2"

        def upload(self, upload, client):
            calls.append(1)
            if len(calls) == 5:  # the first upload of round 2 (4 clients a round)
                os.kill(os.getpid(), signal.SIGTERM)
            return upload

    try:
        out = run(load_config(None, [*BASE, "privacy.defense=signal_in_round_2",
                                     f"output.dir={tmp_path}", "output.name=s"]), World("cpu"))
    finally:
        DEFENSES.pop("signal_in_round_2")
    assert out["stopped"] and out["round"] == 2
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["status"] == "preempted"
        assert list(f["metrics/round"][:]) == [1, 2]
    with h5py.File(tmp_path / "s.ckpt.h5") as f:
        assert f.attrs["round"] == 2


def test_tf32_is_training_only_and_never_leaks_into_evaluation():
    """engine.dtype=tf32 sets torch's global TF32 flags for local training; docs/performance.md
    promises fp32 evaluation, so they are restored when training ends (before, they stayed set)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with precision("tf32", torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    try:
        with precision("tf32", torch.device("cpu")):
            raise RuntimeError("a failing step")
    except RuntimeError:
        pass
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


def test_a_tf32_run_leaves_the_flags_as_it_found_them(tmp_path):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    run(load_config(None, [*BASE, "train.rounds=1", "engine.dtype=tf32",
                           f"output.dir={tmp_path}", "output.name=t"]), World("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
