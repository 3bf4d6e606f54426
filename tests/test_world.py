from .conftest import TINY, run_cli


def test_without_an_mpi_library_the_run_is_single_process(tmp_path):
    r = run_cli(*TINY, "train.rounds=1", f"output.dir={tmp_path}", "output.name=x",
                env={"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"})
    assert r.returncode == 0, r.stderr
    assert "MPI unavailable" in r.stderr and "running as a single process" in r.stderr


def test_a_run_gives_the_stop_signals_back_when_it_returns(tiny_cfg, tmp_path):
    """Inside a longer program (python -m hpcfl.attack) SIGTERM must work again afterwards."""
    import signal

    from hpcfl.loop import run
    from hpcfl.world import STOP_SIGNALS, World

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    run(tiny_cfg("train.rounds=1", f"output.dir={tmp_path}", "output.name=s"), World("cpu"))
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def test_a_cuda_rank_turns_on_every_deterministic_kernel_setting(monkeypatch):
    """What World sets when it picks a CUDA device (checkable without one): torch's
    deterministic mode (index_add_ and scatter_add_ deterministic on CUDA, an error naming any op
    without a deterministic kernel), cuDNN deterministic without autotuning, a fixed cuBLAS
    workspace. The flags are global, so they are put back after."""
    import torch

    from hpcfl.world import deterministic_kernels
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]
