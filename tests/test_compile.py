"""engine.compile: the local step through torch.compile trains as the eager one, on the CPU
(CUDA graphs on a GPU: tests/test_gpu.py), and a machine where it cannot work says so in one
line before anything runs."""
from torch._dynamo.utils import counters

from hpcfl.algorithms import build_algorithm
from hpcfl.config import load_config
from hpcfl.data import load_federated
from hpcfl.engine import RoundSpec, train_cohort
from hpcfl.loop import round_spec

from .conftest import TINY, run_cli


def test_a_compiled_local_step_trains_as_the_eager_one():
    """One round of 4 FedAvg clients, 3 full batches each, both paths. Not bit for bit:
    inductor fuses and orders the backward's reductions its own way; measured on this 2-core
    AVX2 VM (torch 2.14.1): 9.0e-9 on an averaged upload of magnitude 6.9e-3, both paths.
    Compiling costs about 40 s per path here with a cold cache (seconds with a warm one)."""
    cfg = load_config(None, ["algorithm.name=fedavg", "data.num_clients=4",
                             "train.local_steps=3"])
    data = load_federated(cfg.data, seed=0)
    algo = build_algorithm(cfg, data.shape, data.num_classes, data.num_train)
    cids, w = (0, 1, 2, 3), tuple(float(n) for n in data.num_train[:4])
    graphs = counters["stats"]["unique_graphs"]
    for mode in ("sequential", "vectorized"):
        mean = {}
        for compiled in (False, True):
            spec = RoundSpec(1, 0, 50, False, mode, 0, cids, w, compile=compiled)
            buf = train_cohort(algo, spec, algo.init_shared(),
                               {c: algo.init_client(c) for c in cids}, data.clients, "cpu").data
            mean[compiled] = buf[:-4] / buf[-1]
        assert 0 < float((mean[True] - mean[False]).abs().max()) <= 5e-8, mode
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not silently eager


def test_the_run_passes_engine_compile_to_the_engine(tiny_cfg):
    cfg = tiny_cfg("engine.compile=true")
    data = load_federated(cfg.data, seed=0)
    assert round_spec(cfg, "vectorized", 1, [(0, 1)], data).compile
    assert not round_spec(tiny_cfg(), "vectorized", 1, [(0, 1)], data).compile


def test_without_a_compiler_engine_compile_is_one_line_and_exit_2(tmp_path):
    """A fresh inductor cache, so that nothing compiled before stands in for the compiler."""
    r = run_cli(*TINY, "engine.compile=true", f"output.dir={tmp_path / 'runs'}",
                env={"CXX": "/nonexistent/c++",
                     "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "hpcfl: error: engine.compile=true: torch.compile does not work on cpu here (")
    assert "use engine.compile=false" in r.stderr and not (tmp_path / "runs").exists()
