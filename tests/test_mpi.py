"""Under a real `mpiexec`: results do not depend on the number of ranks, a killed or preempted
job resumes (with the same or another number of ranks) to the numbers of an uninterrupted one,
and one failing rank ends the whole job."""
import os
import signal
import subprocess
import time

import h5py
import pytest

from .conftest import (RESUMED, TINY, launch, max_diff, rank_pids, results, run_each, run_main,
                       run_mpi, wait_for_rows)

ARGS = RESUMED  # the runs the `reference` fixture (conftest) ran uninterrupted
SMALL = ["data.num_clients=10", "train.rounds=3", "train.local_epochs=1",
         "output.progress=none", "train.device=cpu"]


# Every configuration compared across rank counts: name -> overrides of SMALL.
ACROSS_RANKS = {
    # HyperFL in sequential stacks of 3 (3+3+2+2 clients, dealt to 1, 2, 3 ranks): each stack's
    # factored upload is one product (docs/factored.md).
    "hyperfl": ["algorithm.name=hyperfl", "engine.mode=sequential", "engine.stack_size=3"],
    "fedavg": ["algorithm.name=fedavg"],
    "vectorized": ["train.rounds=2", "engine.mode=vectorized"],  # HyperFL, the default stacks
    **{a: [f"algorithm.name={a}", "privacy.sample_clip=0.5"]
       for a in ("dpfedavg", "ppsgd", "centaur")},
    **{f"defense{i}": ["train.rounds=2", "algorithm.name=fedavg",
                       *f"privacy.defense={defense}".split(), "data.public_fraction=0.1",
                       "privacy.slice_noise=5e-3"]
       for i, defense in enumerate(["dp_laplace", "soteria", "random_slice", "gradienthide",
                                    "random_slice privacy.slice_sample_clip=1e-2"])},
    "prepared": ["data.name=cifar10", "data.partition=noniid_s", "data.local_size=30",
                 "data.num_clients=5", "train.rounds=2"],  # data.root: the fixture's
    "lpm": ["train.rounds=1", "train.local_steps=2", "train.batch_size=16",
            "algorithm.name=hyperfl_lpm", "model.name=resnet18_adapter",
            "model.backbone=test_resnet", "model.pretrained=none"],
}


def ACROSS(test):
    """The tests of `across_ranks`: on one pytest-xdist worker, which runs its jobs once, and
    with the time of those jobs (the first test's setup, 13 runs a job: the 300 s of setup.cfg
    were not enough on the shared VM at load 11-14)."""
    return pytest.mark.xdist_group("across_ranks")(pytest.mark.timeout(1200)(test))


@pytest.fixture(scope="module")
def across_ranks(tmp_path_factory) -> dict[int, dict]:
    """ACROSS_RANKS run one after another in ONE job per rank count (tests/many.py): 1 and 2
    ranks, and HyperFL on 3; results() by rank count and name, with the files' world size,
    compute_s shape and epsilon. No thread count pinned in the environment (engine.threads
    fixes it). One job per rank count instead of one per configuration and rank count: the
    start of a job (Python, torch, MPI, data on every rank) cost more than most of these runs."""
    from hpcfl.data.prepare import main as prepare

    from .datafiles import write_cifar10

    tmp = tmp_path_factory.mktemp("ranks")
    write_cifar10(tmp / "src")
    assert prepare(["cifar10", "--source", str(tmp / "src"), "--out",
                    str(tmp / "data" / "cifar10.h5")]) == 0
    configs = {name: [*over, f"data.root={tmp / 'data'}"] if name == "prepared" else over
               for name, over in ACROSS_RANKS.items()}
    runs = {}
    for ranks in (1, 2, 3):
        todo = configs if ranks < 3 else {"hyperfl": configs["hyperfl"]}
        out = tmp / f"r{ranks}"
        runs[ranks] = run_each(ranks, todo, *SMALL, f"output.dir={out}", pin_threads=False,
                               timeout=900)
        for name in todo:
            with h5py.File(out / f"{name}.h5") as f:
                runs[ranks][name].update(world_size=f.attrs["world_size"],
                                         compute_shape=f["timing/compute_s"].shape)
                if name in ("dpfedavg", "ppsgd", "centaur"):
                    runs[ranks][name]["epsilon"] = f["metrics/epsilon"][:]
    return runs


def same(a: dict, b: dict) -> float:
    """max_diff of two runs' numbers (their files' facts left out)."""
    facts = ("world_size", "compute_shape")
    return max_diff({k: v for k, v in a.items() if k not in facts},
                    {k: v for k, v in b.items() if k not in facts})


@ACROSS
def test_one_two_and_three_ranks_give_the_same_results(across_ranks):
    """HyperFL on 1, 2 and 3 ranks, FedAvg on 1 and 2."""
    for ranks, names in ((1, ("hyperfl", "fedavg")), (2, ("hyperfl", "fedavg")),
                         (3, ("hyperfl",))):
        for name in names:
            run = across_ranks[ranks][name]
            assert run["world_size"] == ranks and run["compute_shape"] == (3, ranks)
            if ranks > 1:  # docs/cluster.md: bit for bit
                assert same(across_ranks[1][name], run) == 0.0, (name, ranks)


@ACROSS
def test_by_default_vectorized_hyperfl_is_the_same_on_one_and_two_ranks(across_ranks):
    """No thread count pinned in the environment (engine.threads fixes it), and the default
    vectorized stacks, cut from the cohort alone and dealt to both ranks."""
    assert same(across_ranks[1]["vectorized"], across_ranks[2]["vectorized"]) == 0


def test_every_rank_trains_a_share_of_100_clients_at_frac_03_and_results_match_one_rank(
        tmp_path, capsys):
    """The cohort's stacks are dealt to all ranks (before: ranks trained only the blocks of 32
    ids they hosted, 32/32/32/4 of 100 clients on 4 ranks); the private state moves to the rank
    that trains it and back, and the numbers are one rank's (run in this process), bit for
    bit."""
    args = ["data.num_clients=100", "train.frac=0.3", "train.rounds=2", "train.local_epochs=1",
            "engine.mode=vectorized", "output.progress=none", "train.device=cpu",
            f"output.dir={tmp_path}"]
    r = run_mpi(4, *args, "output.name=n4")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "n4.h5") as f:
        assert f.attrs["world_size"] == 4
        compute = f["timing/compute_s"][:]
    assert (compute.min(1) > 0.2 * compute.max(1)).all(), compute  # every rank worked
    assert run_main(capsys, *args, "output.name=n1").returncode == 0
    assert max_diff(results(tmp_path / "n1.h5"), results(tmp_path / "n4.h5")) == 0


@ACROSS
def test_dp_baselines_and_defended_runs_give_the_same_results_on_one_and_two_ranks(
        across_ranks):
    """DP noise and a defense's randomness are drawn per (seed, round, client), never per rank;
    a defense's once-per-run parts (slices, public labels) come from rank 0. (dp_gaussian draws
    through dp_laplace's code with another distribution; topk draws nothing and reads one
    upload.)"""
    names = ["dpfedavg", "ppsgd", "centaur", *(f"defense{i}" for i in range(5))]
    for name in names:
        assert same(across_ranks[1][name], across_ranks[2][name]) == 0.0, name
    for name in ("dpfedavg", "ppsgd", "centaur"):
        assert across_ranks[1][name]["train_loss"][-1] < across_ranks[1][name]["train_loss"][0]
        assert across_ranks[1][name]["epsilon"][-1] > 0, name


@ACROSS
def test_ranks_reading_their_share_of_a_prepared_file_give_the_same_results(across_ranks):
    """A prepared file's official noniid_s split, read into one pool per rank (any rank may
    train any client: the cohort's stacks are dealt by load)."""
    assert same(across_ranks[1]["prepared"], across_ranks[2]["prepared"]) == 0.0  # bit for bit


@ACROSS
def test_hyperfl_lpm_gives_the_same_results_on_one_and_two_ranks(across_ranks):
    assert same(across_ranks[1]["lpm"], across_ranks[2]["lpm"]) == 0


def test_kill9_of_the_job_then_rerun_on_one_rank_matches_an_uninterrupted_run(tmp_path,
                                                                              reference):
    args = [*ARGS, f"output.dir={tmp_path}", "output.name=k"]
    proc = launch(2, *args)
    wait_for_rows(tmp_path / "k.h5", 4, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # mpiexec, its proxies and every rank
    proc.wait()
    r = run_mpi(1, *args)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert max_diff(results(tmp_path / "k.h5"), reference) == 0.0
    with h5py.File(tmp_path / "k.h5") as f:  # exactly one row per round, old and new ranks
        assert list(f["timing/round"][:]) == list(range(1, 9))
        seg = {k: f["segments"][k][:] for k in ("from_round", "to_round", "world_size")}
        resumed = int(f.attrs["resumed_from_round"])
        # every segment kept: who ran which rounds (before, the resume overwrote the first)
        assert seg["world_size"].tolist() == [2, 1]
        assert seg["from_round"].tolist() == [0, resumed] and resumed >= 2
        assert seg["to_round"].tolist() == [resumed, 8]
        assert f["segments/git_commit"][0] and f["segments/hostnames"][1]


def limit_file_size(kib: int):
    """`ulimit -f KIB` for a child: a write past it fails with EFBIG (Python ignores SIGXFSZ).
    The checkpoint (6.8 MB) is past it; the results file (< 1 MB) and MPI's shared-memory
    segments (about 4 MB) are not."""
    import resource

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))
    return preexec


def test_one_rank_killed_then_a_checkpoint_that_cannot_be_written_lose_nothing(tmp_path,
                                                                              reference):
    """Two faults, then a clean rerun that gives the uninterrupted run's numbers:
    1. kill -9 of one rank alone mid-run: mpiexec ends the job within 30 s;
    2. the rerun resumes, then cannot write its next checkpoint (a file size limit): rank 0
       alone fails, in the middle of streaming the rows of every rank; the job ends within
       30 s with exit 2 and one line naming the rank and the file; no temporary file is left,
       the previous checkpoint still verifies, the results file still reads (and is marked
       failed). Before: a traceback, a segfault, the other rank left waiting, a 5 MB
       temporary file."""
    from hpcfl.store import verify_checkpoint

    args = [*ARGS, f"output.dir={tmp_path}", "output.name=f"]
    proc = launch(2, *args)
    wait_for_rows(tmp_path / "f.h5", 3, proc)
    pids = rank_pids(f"output.dir={tmp_path}")
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    proc.communicate(timeout=60)
    assert time.time() - t0 < 30 and proc.returncode != 0
    kept = verify_checkpoint(tmp_path / "f.ckpt.h5")
    assert kept >= 2

    proc = launch(2, *args, preexec_fn=limit_file_size(5500))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if not x.startswith("hpcfl: resuming")]
    assert len(lines) == 1 and lines[0].startswith("hpcfl: error: rank 0 ("), err
    assert "f.ckpt.h5 of round" in lines[0] and "File too large" in lines[0]
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.tmp*"))
    assert verify_checkpoint(tmp_path / "f.ckpt.h5") == kept
    with h5py.File(tmp_path / "f.h5") as f:
        assert f.attrs["status"] != "completed" and len(f["metrics/round"]) >= kept

    r = run_mpi(2, *args)
    assert r.returncode == 0, r.stderr
    assert max_diff(results(tmp_path / "f.h5"), reference) == 0.0


def test_a_large_sampled_population_checkpointed_on_2_ranks_resumes_exactly_on_1(tmp_path,
                                                                                  capsys):
    """The 1M-client case (docs/performance.md, "Scaling to many clients") at a size the
    suite affords: 600 clients over three UNITs of ids (rank 0 hosts 512, rank 1 88), 30 a
    round, the private rows streamed into the checkpoint rank by rank and read back by one
    rank."""
    args = [*TINY, "data.num_clients=600", "data.partition=sampled", "train.frac=0.05",
            "train.rounds=6", "output.checkpoint_every=2", "train.eval_clients=50",
            f"output.dir={tmp_path}"]
    ref = run_main(capsys, *args, "output.name=ref")  # uninterrupted, in this process
    assert ref.returncode == 0, ref.stderr
    proc = launch(2, *args, "output.name=k")
    wait_for_rows(tmp_path / "k.h5", 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    r = run_mpi(1, *args, "output.name=k")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert max_diff(results(tmp_path / "k.h5"), results(tmp_path / "ref.h5")) == 0.0
    with h5py.File(tmp_path / "k.h5") as f:
        assert len(f["clients/ids"]) == 50 and f["clients/test_acc"].shape[1] == 50
    # the checkpoint holds the rows of the clients that trained, not of all 600 (a million
    # clients' checkpoint was 5.2 GB of mostly start values)
    from hpcfl.loop import sample_cohort
    trained = sorted({int(c) for r in range(1, 7) for c in sample_cohort(0, r, 600, 0.05)})
    with h5py.File(tmp_path / "k.ckpt.h5") as f:
        assert f["private_ids"][:].tolist() == trained and len(trained) < 200
        assert f["private/embedding"].shape == (len(trained), 64)


def sigterm_while_a_checkpoint_is_written(folder, proc) -> int:
    """SIGTERM to every rank (as Slurm does at the time limit) while rank 0 is inside writing a
    checkpoint: rank 0 is frozen (SIGSTOP) the moment its temporary file appears, signalled,
    and let go. Returns the round of the checkpoint being written."""
    from hpcfl.store import verify_checkpoint
    end = time.time() + 120
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        tmp = list(folder.glob("sigterm.ckpt.h5.tmp*"))
        if not tmp:
            time.sleep(0.001)
            continue
        writer = int(tmp[0].name.rsplit("tmp", 1)[1])  # the file is named after its pid
        os.kill(writer, signal.SIGSTOP)
        if tmp[0].exists():  # caught inside the write: not yet renamed
            before = (verify_checkpoint(folder / "sigterm.ckpt.h5")
                      if (folder / "sigterm.ckpt.h5").exists() else 0)
            for pid in rank_pids(f"output.dir={folder}"):
                os.kill(pid, signal.SIGTERM)
            os.kill(writer, signal.SIGCONT)
            return before + 2  # checkpoint_every=2
        os.kill(writer, signal.SIGCONT)
    raise TimeoutError("no checkpoint write caught")


def test_sigterm_while_a_checkpoint_is_written_stops_a_round_later_and_resumes_on_3_ranks(
        tmp_path, reference):
    """The checkpoint being written completes (the signal only sets a flag), the ranks agree
    to stop after the next round's training, which is checkpointed; nothing is lost."""
    from hpcfl.store import verify_checkpoint
    args = [*ARGS, f"output.dir={tmp_path}", "output.name=sigterm"]
    proc = launch(2, *args)
    written = sigterm_while_a_checkpoint_is_written(tmp_path, proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by a signal" in out
    with h5py.File(tmp_path / "sigterm.h5") as f:
        assert f.attrs["status"] == "preempted"
        assert list(f["metrics/round"][:]) == list(range(1, written + 2))
    assert verify_checkpoint(tmp_path / "sigterm.ckpt.h5") == written + 1
    assert verify_checkpoint(tmp_path / "sigterm.ckpt.prev.h5") == written
    r = run_mpi(3, *args)
    assert r.returncode == 0, r.stderr
    assert max_diff(results(tmp_path / "sigterm.h5"), reference) == 0.0


def test_an_attack_spread_over_two_ranks_finds_what_one_rank_finds(tmp_path, capsys):
    """python -m hpcfl.attack under mpiexec: the ranks train the run to the attacked round
    together, each attacks its share of the targets, rank 0 writes them all. One rank: in this
    process."""
    from hpcfl.attack import main as attack

    args = ["data.num_clients=6", "algorithm.name=fedavg", "train.local_steps=1",
            "train.device=cpu", "output.progress=none", f"output.dir={tmp_path}",
            "attack.round=2", "attack.clients=3", "attack.iterations=20"]
    found = {}
    for ranks in (1, 2):
        if ranks == 1:
            capsys.readouterr()
            assert attack([*args, "output.name=a1"]) == 0
            r = subprocess.CompletedProcess([], 0, capsys.readouterr().out, "")
        else:
            r = run_mpi(ranks, *args, f"output.name=a{ranks}", module="hpcfl.attack")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("ig on fedavg") == 1  # one summary line, from rank 0
        with h5py.File(tmp_path / f"a{ranks}.h5") as f:
            g = f["privacy/ig"]
            found[ranks] = {k: g[k][:] for k in ("targets", "psnr", "reconstruction", "truth")}
            assert f.attrs["world_size"] == ranks
    assert "on 2 ranks" in r.stdout
    assert found[1]["targets"].tolist() == found[2]["targets"].tolist() == [0, 1, 2]
    for k in ("psnr", "reconstruction", "truth"):
        assert (found[1][k] == found[2][k]).all(), k


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path):
    # Rank 0 cannot create its results file (a directory is in the way); rank 1 is already in
    # the round's Allreduce and would wait forever without the abort.
    (tmp_path / "x.h5").mkdir()
    t0 = time.time()
    r = run_mpi(2, *TINY, f"output.dir={tmp_path}", "output.name=x", "output.overwrite=true",
                timeout=60)
    assert r.returncode != 0
    assert time.time() - t0 < 30
    assert "Traceback" in r.stderr


def test_a_data_file_missing_on_one_rank_ends_every_rank_with_one_line(tmp_path):
    """MPMD: rank 1 is given a data.root without the prepared file, as on a node where it is
    missing. Before, rank 1 exited 2 silently and rank 0 waited in the next collective."""
    import sys

    from hpcfl.data.prepare import main as prepare

    from .conftest import mpiexec
    from .datafiles import write_cifar10

    write_cifar10(tmp_path / "src")
    assert prepare(["cifar10", "--source", str(tmp_path / "src"), "--out",
                    str(tmp_path / "data" / "cifar10.h5")]) == 0
    (tmp_path / "empty").mkdir()
    args = ["data.name=cifar10", "data.num_clients=4", "train.rounds=1", "output.progress=none",
            "train.device=cpu", f"output.dir={tmp_path}", "output.name=m"]
    good, bad = (["-n", "1", sys.executable, "-m", "hpcfl.main", *args, f"data.root={root}"]
                 for root in (tmp_path / "data", tmp_path / "empty"))
    t0 = time.time()
    r = subprocess.run([mpiexec(), *good, ":", *bad], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr
    assert time.time() - t0 < 30
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcfl: error: rank 1 (")
    assert "cifar10" in lines[0]
    assert not (tmp_path / "m.h5").exists()
