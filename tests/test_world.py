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
