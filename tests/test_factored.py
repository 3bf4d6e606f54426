"""A hypernetwork's heads trained in factored form (hpcfl.algorithms.factored, hpcfl.sgd.Record)
against dense SGD: torch.optim.SGD on the formed gradients, and the engine's dense path (the
same phases with factored=None). The layers' outputs theta at every step, the weights, the
momentum buffers and the uploads agree to float32 rounding after 1 and 60 steps, with and
without biases, the clip biting, one client and a stack of unequal step counts; through the
engine (HyperFL, HyperFL-LPM, both modes, a defense that sees uploads), in float64, to 1e-10.
Each check fails when a coefficient is perturbed, and the engine and the attack's simulation
call the same code."""
import copy
import sys
import dataclasses

import pytest
import torch

from hpcfl.algorithms import Phase, build_algorithm, factored
from hpcfl.algorithms.base import Heads
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.data.transforms import model_inputs
from hpcfl.engine import RoundSpec, train_client, train_cohort
from hpcfl.privacy.attacks import Knowledge, Problem
from hpcfl.privacy.attacks.hypernet import adapt
from hpcfl.sgd import THETA, PhaseSGD, Record, upload

OUT, HIDDEN, LR = 40, 8, 0.1
# the worst cases measured over CASES, float32, relative to the tensor's largest entry (see
# rel): 4.6e-7 (theta), 5.7e-7 (weights); a margin of 3.5
TOL = 2e-6


def phase(bias: bool) -> Phase:
    heads = Heads((("x", (OUT,)),), ("W",), ("b",) if bias else ())
    # momentum and weight decay both at work; a clip that bites at every step
    return Phase(param_groups=((*heads.names, "T"),), lr=LR, momentum=0.9, weight_decay=0.05,
                 grad_clip=0.5, factored=heads)


def draws(steps: int, seed: int):
    """A client's gradients of the layers' outputs, inputs h, and gradients of a dense tensor T
    clipped with them, as random numbers: no loss ties them to theta, so rounding stays
    rounding (HyperFL's first rounds amplify it: tests/test_engine.py, settle)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(60, OUT, generator=g)[:steps], torch.rand(60, HIDDEN, generator=g)[:steps],
            torch.randn(60, 3, generator=g)[:steps])


def dense(W0, b0, T0, steps: int, seed: int, bias: bool):
    """torch.optim.SGD with clip_grad_norm_ on the formed gradients g h^T, g: theta before each
    step, the weights, the momentum buffers and T after the phase."""
    W, T = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(T0.clone())
    b = torch.nn.Parameter(b0.clone()) if bias else None
    params = [p for p in (W, b, T) if p is not None]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.05)
    thetas = []
    for g, h, gT in zip(*draws(steps, seed)):
        thetas.append((W @ h + (b if bias else 0)).detach().clone())
        W.grad, T.grad = torch.outer(g, h), gT.clone()
        if bias:
            b.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
    state = {"W": W.detach(), "T": T.detach()}
    momentum = {"W": opt.state[W]["momentum_buffer"]}
    if bias:
        state["b"], momentum["b"] = b.detach(), opt.state[b]["momentum_buffer"]
    return thetas, state, momentum


def rel(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """The largest difference relative to the largest entry of want (or of `scale`, where the
    reference's own rounding is relative to it: W_T - W_0 in float32 is W_0's)."""
    big = max(float(want.abs().max()), float(scale.abs().max()) if scale is not None else 0.0)
    return float((got - want).abs().max()) / big


def mismatch(steps: list[int], bias: bool) -> dict[str, float]:
    """The factored phase (one client, or a stack of len(steps) clients of those step counts,
    padded as the engine pads a stack) against dense SGD per client: the largest relative
    differences of theta, weights, momentum, uploads (one client's, and the stack's weighted
    sum with unequal weights) and T."""
    torch.manual_seed(0)
    W0, b0, T0 = torch.randn(OUT, HIDDEN) * 0.3, torch.randn(OUT) * 0.3, torch.randn(3)
    p, n = phase(bias), len(steps)
    stacked, longest = n > 1, max(steps)
    record = Record(p.factored, (W0, b0 if bias else None), p, steps, stacked)
    opt = PhaseSGD(p, stacked, record)
    params = {"T": T0.expand(n, 3).clone() if stacked else T0.clone()}
    runs = [draws(longest, seed) for seed in range(n)]
    refs = [dense(W0, b0, T0, s, seed, bias) for seed, s in enumerate(steps)]
    out = dict.fromkeys(["theta", "weights", "momentum", "upload", "T"], 0.0)
    for t in range(longest):
        active = torch.tensor([float(t < s) for s in steps])
        g, h, gT = (torch.stack([r[k][t] for r in runs]) * (active[:, None] if k != 1 else 1)
                    for k in range(3))  # a finished client's steps have no sample: g = 0
        f = record.factors()
        theta = torch.func.vmap(factored.theta, in_dims=(None, None, None, [(0, 0, None)], 0))(
            f["W0"], f.get("b0"), f["a"], [(f["G"], f["H"], f["w"])], h) if stacked else \
            factored.theta(f["W0"], f.get("b0"), f["a"], [(f["G"], f["H"], f["w"])], h[0])
        for i, (thetas, _, _) in enumerate(refs):
            if t < steps[i]:
                out["theta"] = max(out["theta"],
                                   rel(theta[i] if stacked else theta, thetas[t]))
        opt.step(params, {THETA: g if stacked else g[0], "T": gT if stacked else gT[0]},
                 h if stacked else h[0], active if stacked else None)
    weights = [3.0, 5.0, 7.0][:n]
    total = upload([(record, i, w) for i, w in enumerate(weights)])
    for i, (_, state, momentum) in enumerate(refs):
        formed, buf, up = record.trained(i), record.momentum(i), upload([(record, i, 1.0)])
        for k in momentum:
            out["weights"] = max(out["weights"], rel(formed[k], state[k]))
            out["momentum"] = max(out["momentum"], rel(buf[k], momentum[k]))
            base = W0 if k == "W" else b0
            out["upload"] = max(out["upload"], rel(up[k], state[k] - base, base))
        out["T"] = max(out["T"], rel(params["T"][i] if stacked else params["T"], state["T"]))
    for k, base in (("W", W0), ("b", b0)):
        if k in total:
            want = sum(w * (state[k] - base) for w, (_, state, _) in zip(weights, refs))
            out["upload"] = max(out["upload"], rel(total[k], want, sum(weights) * base))
    return out


CASES = [([1], True), ([60], True), ([60], False), ([60, 45, 1], True), ([1, 60, 17], False)]


@pytest.mark.parametrize("steps, bias", CASES)
def test_factored_sgd_is_dense_sgd_to_float32_rounding(steps, bias):
    got = mismatch(steps, bias)
    assert max(got.values()) <= TOL, got


@pytest.mark.parametrize("which", ["a", "w", "c"])
def test_a_perturbed_coefficient_is_caught(which, monkeypatch):
    """a_t (W_0's share), w_t0 (the first step's), c_t (the momentum buffer's W_0 share), each
    off by one part in 1e3 from the second step on: far outside the tolerances above."""
    true = factored._scalars

    def perturbed(*args):
        a, w, c, q = (copy.deepcopy(x) for x in true(*args))
        for t in range(2, len(a)):
            if which == "w":
                w[t][0] *= 1 + 1e-3
            else:
                {"a": a, "c": c}[which][t] *= 1 + 1e-3
        return a, w, c, q
    monkeypatch.setattr(factored, "_scalars", perturbed)
    got = mismatch([60], True)
    assert max(got.values()) > 10 * TOL, got


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits (and on a loaded machine, 15x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_path(algo):
    """The same algorithm trained dense: its phases without Phase.factored."""
    out = copy.copy(algo)
    phases = [dataclasses.replace(p, factored=None) for p in algo.phases()]
    out.phases = lambda: phases
    return out


def float64(algo, shared: dict, private: dict, data):
    """The algorithm's state and the clients' data in float64 (the default dtype set by the
    caller), so that the two paths agree to 1e-10, not to float32 rounding amplified by
    HyperFL's first rounds (tests/test_engine.py, settle)."""
    def dbl(p):
        return {k: v.double() for k, v in p.items()}
    algo.constants = dbl(algo.constants)
    clients = [dataclasses.replace(
        c, x_train=c.x_train.double(), x_test=c.x_test.double(),
        mean=None if c.mean is None else c.mean.double(),
        std=None if c.std is None else c.std.double()) for c in map(data.clients.__getitem__,
                                                                     private)]
    return dbl(shared), {c: dbl(p) for c, p in private.items()}, dict(zip(private, clients))


class Probe:
    """A defense that sees uploads (engine.DefenseHooks' upload hook): keeps what it saw of
    each client and sends twice the upload."""

    def __init__(self):
        self.seen = {}

    def per_sample(self, rnd, cids, device):
        return None

    def sees_upload(self):
        return True

    def upload(self, upload, client):
        self.seen[client.client] = {**upload, **{f"trained:{k}": client.trained[k]
                                                 for k in upload}}
        return {k: 2 * v for k, v in upload.items()}


HYPERFL = ["data.num_clients=6", "data.partition=dirichlet", "data.dirichlet_alpha=0.5",
           "train.local_epochs=1"]
LPM = ["algorithm.name=hyperfl_lpm", "model.pretrained=none", "model.name=resnet18_adapter",
       "model.backbone=test_resnet", "data.num_clients=4", "train.local_steps=3",
       "train.batch_size=16"]


@pytest.mark.parametrize("overrides", [HYPERFL, [*HYPERFL, "algorithm.hypernet_bias=false"],
                                       LPM], ids=["hyperfl", "no-bias", "hyperfl_lpm"])
def test_the_engine_trains_factored_heads_as_dense_ones(overrides):
    """Round 1 of three clients of unequal sizes (unequal step counts: a stack pads the short
    ones), from the official init (the clip bites): the factored engine's round buffer, in
    either mode, and what a defense that sees uploads receives, equal the dense path's."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = load_config(None, overrides)
        data = load_federated(cfg.data, seed=0)
        algo = build_algorithm(cfg, data.shape, data.num_classes)
        cids = [0, 1, 2]
        shared, private, clients = float64(algo, algo.init_shared(),
                                           {c: algo.init_client(c) for c in cids}, data)
        sizes = [int(data.num_train[c]) for c in cids]
        assert len(set(sizes)) == 3
        spec = RoundSpec(1, 0, cfg.train.batch_size, cohort=tuple(cids),
                         weights=tuple(map(float, sizes)), stack_size=3)

        def run(a, mode, defense=None):
            p = {c: dict(v) for c, v in private.items()}
            buf = train_cohort(a, dataclasses.replace(spec, mode=mode), shared, p, clients,
                               "cpu", defense)
            return buf.data, p

        want, want_private = run(dense_path(algo), "sequential")
        scale = float(want[:-4].abs().max())
        for mode in ("sequential", "vectorized"):
            got, got_private = run(algo, mode)
            assert float((got - want).abs().max()) <= 1e-10 * scale, mode
            for c in cids:
                for k, v in want_private[c].items():
                    assert torch.allclose(got_private[c][k], v, rtol=0, atol=1e-10), (mode, k)
        seen = [Probe(), Probe()]
        got, _ = run(algo, "vectorized", seen[0])
        want, _ = run(dense_path(algo), "sequential", seen[1])
        assert float((got - want).abs().max()) <= 2e-10 * scale
        for c in cids:
            for k, v in seen[1].seen[c].items():
                assert torch.allclose(seen[0].seen[c][k], v, rtol=0, atol=1e-10), k
    finally:
        torch.set_default_dtype(default)


def test_the_engine_and_the_attack_simulate_a_client_with_the_same_code(monkeypatch):
    """The adaptive attack's simulation of a client (privacy.attacks.hypernet, white-box at
    the client's true images) reproduces the engine's upload through the same functions: both
    call factored.theta, and perturbing the shared coefficients (by 1 % from the second step)
    moves both together (the simulation still matches the factored engine) away from the
    dense path's upload."""
    cfg = load_config(None, ["data.name=digits", "data.partition=iid", "data.num_clients=360",
                             "train.lr=0.05", "train.local_steps=3"])
    data = load_federated(cfg.data, 0)
    algo = build_algorithm(cfg, data.shape, data.num_classes)
    shared, c = algo.init_shared(), data.clients[1]
    state = {**shared, **algo.init_client(1)}
    calls = []
    theta = factored.theta

    def spy(*args):
        calls.append(next(f.f_globals["__name__"] for f in map(sys._getframe, range(1, 9))
                          if f.f_globals["__name__"].startswith("hpcfl.")))
        return theta(*args)
    monkeypatch.setattr(factored, "theta", spy)

    def distance(a) -> float:
        trained, _ = train_client(a, dict(state), c, RoundSpec(1, 0, 50), 1)
        know = Knowledge(algo.forward, state, tuple(shared), tuple(c.x_train.shape[1:]),
                         (0 - c.mean) / c.std, (1 - c.mean) / c.std,
                         phases=tuple(algo.phases()), batch_size=50)
        p = adapt(Problem(know, [], c.num_train, 10, None, {}), algo,
                  algo.upload(shared, trained), shared)
        x = model_inputs(c, c.x_train)
        return float(p.distance(x, c.y_train, {}, "euclidean").detach() / p.observed.sq)

    # the squared distance of the uploads relative to the observed one's squared norm: 7e-6
    # measured either way (float32 rounding of the weight decay the attack takes out)
    assert distance(algo) <= 2e-5 and distance(dense_path(algo)) <= 2e-5
    assert {"hpcfl.engine.client", "hpcfl.privacy.attacks.hypernet"} <= set(calls)
    true = factored._scalars

    def perturbed(*args):
        a, w, c, q = (copy.deepcopy(x) for x in true(*args))
        for t in range(2, len(a)):
            a[t] *= 1 + 1e-2
            w[t][:] = [x * (1 + 1e-2) for x in w[t]]
        return a, w, c, q
    monkeypatch.setattr(factored, "_scalars", perturbed)
    # 5.5e-6 and 4.6e-4 measured
    assert distance(algo) <= 2e-5 < 1e-4 < distance(dense_path(algo))


def test_the_heads_base_is_the_layers_stacked_and_column_major():
    """W_0 is the heads' weights end to end, stored column-major: its products with one h and
    one g per step are a dot product per long row (2.4x faster with MKL on a CPU than
    row-major: docs/performance.md)."""
    heads = Heads((("x", (3, 2)), ("z", (4,))), ("Wx", "Wz"), ("bx", "bz"))
    shared = {"Wx": torch.randn(6, HIDDEN), "Wz": torch.randn(4, HIDDEN),
              "bx": torch.randn(6), "bz": torch.randn(4)}
    W0, b0 = heads.base(shared)
    assert W0.shape == (10, HIDDEN) and W0.T.is_contiguous()
    assert torch.equal(W0, torch.cat([shared["Wx"], shared["Wz"]]))
    assert torch.equal(b0, torch.cat([shared["bx"], shared["bz"]]))
