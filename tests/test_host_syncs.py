"""No local step makes the host wait for the device, checked on the CPU.

On CUDA, reading a number back (.item(), .tolist(), float(t), bool(t), int(t), indexing a list
by a tensor, .nonzero(), .numpy(), .cpu()) waits for every queued kernel, and so does a plain
copy of a host tensor to the device; a step that does either stalls the GPU once per step. The
CPU has no queue, so this stand-in counts the calls themselves (a TorchFunctionMode sees every
one) during a round of 1 and of 3 local steps per client: the two counts must be equal, i.e.
nothing per step. What is left is per client or per phase, and bounded below. The CUDA version
of this test (torch's sync debug mode): tests/test_gpu.py, test_no_local_step_waits_for_the_device.
"""
import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hpcfl.algorithms import build_algorithm
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.engine import RoundSpec, train_cohort

READS = {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "nonzero", "numpy",
         "cpu"}
# crop_flip moves its draws to the batch's device: a no-op on CUDA since the engine moves a
# phase's draws there at once (engine.client.phase_batches, engine.stacked.schedules)
NO_OP_MOVES = {"crop_flip"}


class Syncs(TorchFunctionMode):
    """Counts, by the hpcfl function that made them, the calls that would make the host wait
    on CUDA: reads of a value, and moves of a tensor to a device."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        move = name == "to" and ("device" in kwargs or any(
            isinstance(a, (str, torch.device)) for a in args[1:]))
        if name in READS or move:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1])
                         if "/hpcfl/" in f.filename)
            if not (move and frame.name in NO_OP_MOVES):
                self.calls[f"{name} in {frame.name}"] += 1
        return func(*args, **kwargs)


def round_calls(overrides: list[str], mode: str, steps: int) -> collections.Counter:
    cfg = load_config(None, [*overrides, "data.num_clients=4", f"train.local_steps={steps}"])
    data = load_federated(cfg.data, seed=0)
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    shared, cids = algo.init_shared(), [0, 1, 2, 3]
    private = {c: algo.init_client(c) for c in cids}
    spec = RoundSpec(1, 0, cfg.train.batch_size, data.augment, mode, 0, tuple(cids),
                     tuple(float(data.num_train[c]) for c in cids))
    with Syncs() as syncs:
        train_cohort(algo, spec, shared, private, data.clients, "cpu")
    return syncs.calls


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
@pytest.mark.parametrize("overrides", [
    ["algorithm.name=hyperfl"],
    ["algorithm.name=fedavg", "data.name=synthetic-cifar10", "data.synthetic_samples=400",
     "data.augment=true"],
    ["algorithm.name=dpfedavg"],
], ids=["hyperfl", "fedavg-augmented", "dpfedavg"])
def test_no_local_step_reads_from_or_copies_to_the_device(overrides, mode):
    few, many = round_calls(overrides, mode, 1), round_calls(overrides, mode, 3)
    assert few == many, f"per step: {many - few}"
    # What a round of 4 clients (4 stacks of 1 by default) and at most 2 phases has left: each
    # client's data gathered (its train and test indices moved), per phase and stack the
    # batches moved (indices, sample weights, active steps, crop/flip draws), per client its
    # loss read (sequential), per phase and stack the DP schedule read (vectorized).
    clients, phases, stacks = 4, 2, 4
    assert sum(many.values()) <= 2 * clients + 4 * phases * stacks + clients + phases * stacks
    assert {k.split()[0] for k in many} <= {"to", "item", "tolist"}, many
    assert many["item in train_client"] <= clients and many["tolist in train_stacked"] <= (
        phases * stacks), many
