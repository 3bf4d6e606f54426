import pytest

from hpcfl.world import balanced_blocks

from .conftest import TINY, run_cli


@pytest.mark.parametrize("unit", [1, 4])
@pytest.mark.parametrize("sizes, parts", [
    ([68] * 20, 1), ([68] * 20, 3), ([5, 90, 3, 40, 7, 60], 4), (list(range(1, 30)), 7),
    ([10, 10], 5)])
def test_blocks_are_contiguous_cover_all_clients_and_balance_samples(sizes, parts, unit):
    blocks = balanced_blocks(sizes, parts, unit)
    assert len(blocks) == parts
    assert [c for b in blocks for c in b] == list(range(len(sizes)))
    assert all(b.start % unit == 0 for b in blocks if len(b))  # whole units of ids
    loads = [sum(sizes[c] for c in b) for b in blocks]
    if len(sizes) >= parts * unit:  # no block exceeds its fair share by more than one unit
        assert max(loads) <= sum(sizes) / parts + unit * max(sizes)


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
