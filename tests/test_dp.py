"""The DP-SGD baselines (dpfedavg, ppsgd, centaur): per-sample clipping, noise calibration and
accounting, training, and agreement of the engine's two paths."""
import h5py
import numpy as np
import pytest
import torch
from torch.func import functional_call

from hpcfl.algorithms import DPSGD, build_algorithm
from hpcfl.algorithms.dp import Budget
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.data.transforms import model_inputs
from hpcfl.engine import RoundSpec, train_client, train_stacked
from hpcfl.engine.client import dp_noise, per_sample_step, privatize
from hpcfl.loop import run
from hpcfl.main import main
from hpcfl.world import World

from .conftest import TINY, evaluate_each

DP = ["dpfedavg", "ppsgd", "centaur"]


@pytest.mark.parametrize("names", ["all", "extractor"])
def test_vmapped_per_sample_clipping_equals_a_per_sample_loop(names):
    """The official code: loss[i].backward() per sample, clip_grad_norm_ of the DP tensors to C,
    sum, divide by the batch size (here without noise); other tensors get the plain gradient."""
    cfg = load_config(None, ["algorithm.name=dpfedavg", "data.name=synthetic-cifar10",
                             "data.synthetic_samples=200", "data.num_clients=2",
                             "data.partition=iid"])
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in algo.init_shared().items()}
    dp_names = tuple(params) if names == "all" else tuple(k for k in params if "extractor" in k)
    clip = 0.04
    c = data.clients[0]  # synthetic pixels are uint8: the model sees them normalized
    x, y = model_inputs(c, c.x_train[:17]), c.y_train[:17]

    model = algo.model.to_empty(device="cpu")
    model.load_state_dict(params)
    dp_params = [p for k, p in model.named_parameters() if k in dp_names]
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        torch.nn.utils.clip_grad_norm_(dp_params, clip)
        for k, p in model.named_parameters():
            want[k] += p.grad
    for k in want:
        want[k] /= len(y)
    # tensors outside the DP set: the batch-mean gradient (the loop above left them unclipped)

    grads, losses = per_sample_step(algo)(params, {}, x, y)
    dp = DPSGD(dp_names, clip, 1.0)
    got = privatize(grads, torch.ones(len(y)), dp, {k: torch.zeros_like(params[k])
                                                     for k in dp_names})
    for k in params:
        assert (got[k] - want[k]).abs().max() <= 1e-6, k
    batch = torch.func.grad(lambda p: torch.nn.functional.cross_entropy(
        functional_call(algo.model, p, (x,)), y))(params)
    for k in set(params) - set(dp_names):
        assert torch.allclose(got[k], batch[k], atol=1e-6), k
    assert torch.allclose(losses, torch.nn.functional.cross_entropy(
        functional_call(algo.model, params, (x,)), y, reduction="none"), atol=1e-6)


def test_noise_multiplier_of_the_official_settings_is_opacus_s():
    from opacus.accountants.utils import get_noise_multiplier

    cfg = load_config(None, ["algorithm.name=dpfedavg", "train.rounds=200", "train.local_epochs=5",
                             "train.batch_size=50"])
    budget = Budget(cfg, [600] * 20)
    # the official call (cnn/methods/dp_fedavg.py)
    official = get_noise_multiplier(target_epsilon=4, target_delta=1e-5, sample_rate=50 / 600,
                                    epochs=200 * 5)
    assert budget.noise_multiplier == official
    assert budget.steps_per_round == 60 and budget.sample_rate == 50 / 600
    assert 3.99 <= budget.epsilon(200) <= 4.0
    assert budget.epsilon(100) < budget.epsilon(200)


def test_no_client_spends_more_than_the_target_whatever_its_size():
    """Smallest client 50 images, another 51 (batch 50, 5 epochs, 20 rounds, epsilon 4): the
    51-image client takes 2 steps an epoch at almost the same rate. Calibrated to the smallest
    client alone it would spend 5.8; calibrated to the worst schedule every client spends <= 4."""
    from opacus.accountants import create_accountant

    cfg = load_config(None, ["algorithm.name=dpfedavg", "train.rounds=20",
                             "train.local_epochs=5", "train.batch_size=50"])
    sizes = [50, 51, 51, 75, 100, 120, 50]
    budget = Budget(cfg, sizes)

    def spent(n, noise):
        acc = create_accountant("rdp")
        acc.history = [(noise, min(1.0, 50 / n), 20 * 5 * -(-n // 50))]
        return acc.get_epsilon(delta=1e-5)

    assert max(spent(n, budget.noise_multiplier) for n in sizes) <= 4.0 + 1e-6
    assert abs(budget.epsilon(20) - 4.0) < 0.02  # the worst client spends the target
    smallest_only = Budget(cfg, [50]).noise_multiplier
    assert spent(51, smallest_only) > 5  # what the smallest-client calibration let through
    assert budget.noise_multiplier > smallest_only


def test_dp_noise_has_the_calibrated_scale():
    dp = DPSGD(("w",), clip=0.04, noise_multiplier=1.7)
    noise = dp_noise(dp, {"w": torch.zeros(200_000)}, torch.Generator().manual_seed(0))["w"]
    assert abs(float(noise.std()) / (1.7 * 0.04) - 1) < 0.01 and abs(float(noise.mean())) < 1e-3


def test_an_impossible_budget_is_a_config_error(tmp_path, capsys):
    assert main([*TINY, "algorithm.name=centaur", "privacy.dp_epsilon=1e-9",
                 f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "privacy.dp_epsilon" in err and "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", DP)
def test_each_dp_baseline_learns_and_spends_at_most_its_budget(name, tiny_cfg, tmp_path):
    # a loose budget and clip, so that 6 rounds on digits show learning through the noise
    cfg = tiny_cfg(f"algorithm.name={name}", "train.rounds=6", "train.local_epochs=2",
                   "privacy.sample_clip=1", "privacy.dp_epsilon=50", f"output.dir={tmp_path}",
                   "output.name=r")
    data = load_federated(cfg.data, cfg.train.seed)
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    before = evaluate_each(algo, algo.init_shared(),
                           {c: algo.init_client(c) for c in data.clients}, data)
    final = run(cfg, World("cpu"))
    with h5py.File(final["path"]) as f:
        loss, eps = f["metrics/train_loss"][:], f["metrics/epsilon"][:]
        assert f.attrs["dp_noise_multiplier"] == algo.budget.noise_multiplier > 0
        acc_after = f["metrics/test_acc_mean"][-1]
        loss_after = f["metrics/test_loss_mean"][-1]
    assert loss[-1] < loss[0]
    assert loss_after < np.mean(before[:, 1] / before[:, 2])
    # A private head gets above a client's chance (1/3 of its 3 classes); DP-FedAvg's one
    # global model on 3-class clients moves slowly through the noise: above where it started.
    assert acc_after > (np.mean(before[:, 0] / before[:, 2]) + 0.1 if name == "dpfedavg"
                        else 0.45)
    assert (np.diff(eps) > 0).all() and eps[-1] <= 50 and eps[-1] >= 49


@pytest.mark.parametrize("name", DP)
def test_dp_baselines_agree_between_sequential_and_vectorized(name):
    """Each client's upload and private state, trained alone and stacked with unequal others
    (padded schedules, per-sample clipping, noise drawn per client). Within 2e-5: on an AVX2
    machine one centaur client's upload differs by 1.4e-5 (the others by 1e-8; a kink of
    leaky ReLU or max pooling flipped by rounding), and the weighted sum of four by 5e-3."""
    cfg = load_config(None, [f"algorithm.name={name}", "data.num_clients=4",
                             "data.partition=dirichlet", "train.local_epochs=1",
                             "privacy.sample_clip=0.5"])
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    shared, cids = algo.init_shared(), [0, 1, 2, 3]
    assert len({data.num_train[c] for c in cids}) > 1  # unequal clients: padded schedules
    private = {c: algo.init_client(c) for c in cids}
    stacked, _ = train_stacked(algo, shared, private, data.clients, cids, RoundSpec(1, 0, 50))
    for i, c in enumerate(cids):
        alone, _ = train_client(algo, {**shared, **private[c]}, data.clients[c],
                                RoundSpec(1, 0, 50), c)
        for k in alone:
            assert (stacked[k][i] - alone[k]).abs().max() <= 2e-5, (c, k)


@pytest.mark.parametrize("name, shared, private", [
    ("dpfedavg", {"extractor", "head"}, set()),
    ("ppsgd", {"extractor"}, {"head"}),
    ("centaur", {"extractor"}, {"head"})])
def test_what_each_baseline_shares(name, shared, private):
    cfg = load_config(None, [f"algorithm.name={name}"])
    algo = build_algorithm(cfg, (1, 8, 8), 10, [60] * 20)
    assert {k.split(".")[0] for k in algo.init_shared()} == shared
    assert {k.split(".")[0] for k in algo.init_client(0)} == private
    phases = algo.phases()
    assert phases[-1].dp.names == tuple(k for k in algo.initial if k.split(".")[0] in
                                        ({"extractor", "head"} if name == "dpfedavg"
                                         else {"extractor"}))
    if name == "centaur":  # one non-private head epoch first, at the head's lr
        assert phases[0].dp is None and phases[0].lr == 0.1 and phases[0].epochs == 1
    if name == "ppsgd":  # one phase: head at lr_g 0.1, extractor at train.lr
        assert phases[0].lrs == [0.1, 0.1] + [cfg.train.lr] * len(phases[0].param_groups[1])


def test_a_dp_run_cannot_be_extended(tmp_path, capsys):
    """Its noise was calibrated to train.rounds: more rounds would overspend the budget."""
    args = [*TINY, "algorithm.name=dpfedavg", "train.local_steps=1", f"output.dir={tmp_path}",
            "output.name=d"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "train.rounds=3"]) == 2
    assert "train.rounds" in capsys.readouterr().err
