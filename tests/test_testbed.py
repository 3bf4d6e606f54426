"""hpcfl across hosts, on a real multi-node Slurm cluster on this machine (slurm/testbed/testbed:
each node a network + UTS + mount namespace with its own hostname, address, /dev/shm, scratch,
memory and slurmd). The unmodified slurm/run.sbatch on 2 nodes gives the numbers of one rank bit
for bit; a node killed during a round ends its job within 60 s with the watchdog's one line
naming the rank and host not heard from, and the run resumes on the remaining node to the same
numbers; the per-host paths see their own node: node-local rank and size and the node's memory
shared by its ranks (under mpiexec, hydra, across the nodes), a data root missing on one node
(under srun: one line naming it, exit 2 on every rank).

The testbed is brought up once for the module and always torn down; then no namespace, link,
mount, cgroup or process of it is left. Where it cannot run (not root, no namespaces, no Slurm
daemons) the module skips, and pytest -ra prints why; HPCFL_REQUIRE_TESTBED=1 makes that a
failure. The two batch runs start together (they share the machine's cores, and the node-loss
test's waits), so the tests run in file order."""
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from hpcfl.data.prepare import main as prepare

from .conftest import RESUMED, TINY, max_diff, mpiexec, results
from .datafiles import write_mnist_like

ROOT = Path(__file__).resolve().parent.parent
TESTBED = ROOT / "slurm" / "testbed" / "testbed"
RUN, QUICKSTART = str(ROOT / "slurm" / "run.sbatch"), str(ROOT / "jobs" / "quickstart.yaml")
LOOP = str(ROOT / "tests" / "slurm" / "allreduce_loop.py")
# One xdist worker runs the module: one testbed, brought up once (its fixture is the module's).
pytestmark = [pytest.mark.xdist_group("testbed"), pytest.mark.timeout(600)]
NAME = "ci"  # nodes ci1..ci4; apart from a user's testbed (tb) and the local one-node Slurm
STATE = Path("/run/hpcfl-testbed") / NAME
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HPCFL_TESTBED=NAME,
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def why_not() -> str:
    if os.geteuid() != 0:
        return "not root: the testbed makes network namespaces, a bridge and daemons (sudo)"
    missing = [t for t in ("ip", "nsenter", "unshare", "munged", "slurmctld", "slurmd", "sbatch")
               if not shutil.which(t)]
    if missing:
        return (f"no {', '.join(missing)} (bash tests/slurm/start_local_slurm.sh installs "
                "Slurm and munge)")
    r = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True,
                       text=True)
    if r.returncode:
        return f"no network/UTS/mount namespaces here ({r.stderr.strip()})"
    return ""


def tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TESTBED), "--name", NAME, *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def leftovers() -> list[str]:
    """Whatever of the testbed is still on the machine."""
    left = [f"netns {x}" for x in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                 text=True).stdout.split()
            if x.startswith(f"hpcfl-{NAME}")]
    left += [f"link {x}" for x in re.findall(rf"\d+: (hpcfl-{NAME}\S*?)[:@]", subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True).stdout)]
    left += [f"mount {line.split()[4]}" for line in
             Path("/proc/self/mountinfo").read_text().splitlines() if str(STATE) in line]
    marker = str(STATE).encode()
    for d in Path("/proc").iterdir():
        try:
            if marker in (d / "cmdline").read_bytes() or marker in (d / "environ").read_bytes():
                left.append(f"process {d.name} {(d / 'cmdline').read_bytes()[:80]!r}")
        except (OSError, ValueError):
            continue
    return left + [f"folder {STATE}"] * STATE.exists()


class Cluster:
    def __init__(self, env: dict, folder: Path):
        self.env, self.dir = env, folder  # jobs are submitted from `folder`: runs/, logs

    def sbatch(self, *args: str) -> str:
        return subprocess.run(["sbatch", "--parsable", *args], cwd=self.dir, env=self.env,
                              capture_output=True, text=True, check=True).stdout.strip()

    def run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=self.dir, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job).stdout
        return (re.findall(r"JobState=(\S+)", out) or ["UNKNOWN"])[0]

    def wait(self, job: str, timeout: float, past=("PENDING", "CONFIGURING", "RUNNING",
                                                   "COMPLETING")) -> str:
        end = time.time() + timeout
        while (state := self.state(job)) in past and time.time() < end:
            time.sleep(0.3)
        return state

    def log(self, job: str) -> str:
        return (self.dir / f"hpcfl-{job}.out").read_text()


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    why = why_not()
    if why:
        if os.environ.get("HPCFL_REQUIRE_TESTBED") == "1":
            pytest.fail(f"HPCFL_REQUIRE_TESTBED=1 but {why}")
        pytest.skip(why)
    with open("/tmp/hpcfl-testbed-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one session's testbed at a time on this machine
        tool("down")  # what a session killed before its teardown left
        try:
            t0 = time.time()
            r = tool("up", "--nodes", "4", "--cpus", "4", "--node-memory", "4G")
            assert r.returncode == 0, r.stderr
            assert time.time() - t0 <= 60, r.stderr
            exports = dict(re.findall(r"^export (\w+)=(\S+)$", r.stdout, re.M))
            assert exports["SLURM_CONF"] == str(STATE / "slurm.conf")
            yield Cluster(dict(ENV, **exports), tmp_path_factory.mktemp("testbed"))
        finally:
            r = tool("down")
            assert r.returncode == 0 and not leftovers(), (r.stderr, leftovers())


@pytest.fixture(scope="module")
def jobs(testbed) -> dict[str, str]:
    """`two` on ci1+ci2, to its end; `lost` on ci2+ci3 (its rank 1 on ci3, which the first test
    kills during a round), with a 5 s watchdog."""
    run = [RUN, QUICKSTART, *RESUMED]
    return dict(two=testbed.sbatch("--nodes=2", "--ntasks-per-node=1", "-w", "ci1,ci2", *run,
                                   "output.name=two"),
                lost=testbed.sbatch("--nodes=2", "--ntasks-per-node=1", "-w", "ci2,ci3", *run,
                                    "output.name=lost", "train.collective_timeout_s=5"))


def rows(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["metrics/round"])
    except (OSError, KeyError):
        return 0


def segments(path: Path) -> list[tuple[str, int]]:
    with h5py.File(path, "r") as f:
        return [(h.decode(), int(n)) for h, n in zip(f["segments/hostnames"][:],
                                                    f["segments/world_size"][:])]


def test_a_node_killed_during_a_round_ends_its_job_within_60_s_with_one_line(testbed, jobs):
    lost, path = jobs["lost"], testbed.dir / "runs" / "lost.h5"
    end = time.time() + 150
    while rows(path) < 3 and time.time() < end:  # round 3 evaluated, round 2 checkpointed
        assert testbed.state(lost) in ("PENDING", "CONFIGURING", "RUNNING"), testbed.log(lost)
        time.sleep(0.2)
    r = tool("kill", "ci3")  # its slurmd and every process on it, during round 4
    assert r.returncode == 0 and "killed" in r.stderr, r.stderr
    t0 = time.time()
    state = testbed.wait(lost, 90, past=("CONFIGURING", "RUNNING"))
    took = time.time() - t0
    log = testbed.log(lost)
    assert took <= 60 and state in ("COMPLETING", "FAILED", "PENDING", "NODE_FAIL"), (state, log)
    lines = [x for x in log.splitlines() if x.startswith("hpcfl: round")]
    assert len(lines) == 1 and re.fullmatch(
        r"hpcfl: round [4-8]: the Allreduce did not finish within 5 s "
        r"\(train.collective_timeout_s\); not heard from: rank 1 \(ci3\); .*", lines[0]), log
    # no rank of it is left on the surviving node
    pids = subprocess.run(["ip", "netns", "pids", "hpcfl-ci2"], capture_output=True,
                          text=True).stdout.split()
    assert not [p for p in pids if b"output.name=lost" in Path(f"/proc/{p}/cmdline")
                .read_bytes().replace(b"\0", b" ")]
    # the user resubmits on the remaining node (elastic: 2 ranks -> 1); the test after next waits
    jobs["resumed"] = testbed.sbatch("--nodes=1", "-w", "ci2", RUN, QUICKSTART, *RESUMED,
                                     "output.name=lost")


def test_the_2_node_batch_run_gives_the_numbers_of_one_rank_bit_for_bit(testbed, jobs,
                                                                          request):
    reference = request.getfixturevalue("reference")  # after the testbed, which may skip
    state = testbed.wait(jobs["two"], 240)
    assert state == "COMPLETED", testbed.log(jobs["two"])
    path = testbed.dir / "runs" / "two.h5"
    assert max_diff(results(path), reference) == 0.0
    assert segments(path) == [("ci1,ci2", 2)]


def test_every_per_host_path_sees_its_own_node(testbed):
    # under mpiexec (hydra: the testbed's ssh launcher), 2 ranks on each of 2 nodes
    r = testbed.run(mpiexec(), "-launcher", "ssh", "-launcher-exec",
                    str(TESTBED.parent / "ssh"), "-hosts", "ci1,ci2", "-ppn", "2", "-n", "4",
                    sys.executable, str(ROOT / "tests" / "slurm" / "node_probe.py"))
    assert r.returncode == 0, r.stderr
    ranks = [json.loads(x) for x in re.findall(r"\{[^{}]*\}", r.stdout)]  # lines interleave
    assert sorted((d["host"], d["local_rank"]) for d in ranks) == [
        ("ci1", 0), ("ci1", 1), ("ci2", 0), ("ci2", 1)]
    for d in ranks:
        assert d["local_size"] == 2 and d["hosts"] == ["ci1", "ci2"]
        # the node's memory (up --node-memory 4G), not this machine's, shared by its 2 ranks
        assert 0 < d["memory"] <= 2 * 2 ** 30 and "shared by its 2 ranks" in d["shared"]

    # under srun, a data root on node ci1 only (node-local scratch): one line naming ci2, and
    # exit code 2 on every rank
    write_mnist_like(testbed.dir / "src", "mnist")
    assert prepare(["mnist", "--source", str(testbed.dir / "src"), "--out",
                    str(STATE / "nodes" / "ci1" / "scratch" / "data" / "mnist.h5")]) == 0
    r = testbed.run("srun", "--mpi=pmi2", "-N2", "--ntasks-per-node=1", "-w", "ci1,ci2",
                    sys.executable, "-m", "hpcfl.main", *TINY, "data.name=mnist",
                    f"data.root={STATE / 'scratch' / 'data'}", "output.name=local")
    lines = [x for x in r.stderr.splitlines() if x.startswith("hpcfl:")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("hpcfl: error: rank 1 (ci2): data.name=mnist: ") and \
        "not found" in lines[0], r.stderr
    for task, node in enumerate(("ci1", "ci2")):
        assert f"{node}: task {task}: Exited with exit code 2" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (testbed.dir / "runs" / "local.h5").exists()


def test_the_run_resumes_on_the_remaining_node_to_the_numbers_of_one_that_never_stopped(
        testbed, jobs, request):
    reference = request.getfixturevalue("reference")
    resumed = jobs["resumed"]
    assert testbed.wait(resumed, 240) == "COMPLETED", testbed.log(resumed)
    path = testbed.dir / "runs" / "lost.h5"
    assert "hpcfl: resuming runs/lost.h5 from round" in testbed.log(resumed)
    assert max_diff(results(path), reference) == 0.0
    assert segments(path) == [("ci2,ci3", 2), ("ci2", 1)]


def read_until(stream, pattern: str, timeout: float) -> tuple[str, str]:
    """Lines of a running process's `stream` until one matches `pattern`: (that line, all)."""
    seen, end = "", time.time() + timeout
    while time.time() < end:
        if select.select([stream], [], [], max(end - time.time(), 0))[0]:
            line = stream.readline()
            seen += line
            if re.search(pattern, line):
                return line, seen
            if not line:
                break
    raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n{seen}")


def test_a_cut_link_ends_the_round_by_the_watchdog_with_one_line(testbed):
    """No FIN, no reset: without the watchdog the Allreduce would wait for TCP's timeout
    (minutes) or the job's time limit."""
    cmd = ["srun", "--mpi=pmi2", "-J", "cut", "-N2", "--ntasks-per-node=1", "-w", "ci1,ci4",
           sys.executable, LOOP, "3"]
    proc = subprocess.Popen(cmd, cwd=testbed.dir, env=testbed.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        read_until(proc.stdout, r"^round 5$", 120)
        assert tool("link", "ci4", "down").returncode == 0
        t0 = time.time()
        line, seen = read_until(proc.stderr, r"^hpcfl:", 30)
        assert time.time() - t0 <= 3 + 10, seen
        # the cut falls at a random point of a round: before rank 1's arrival note reached
        # rank 0 (rank 1 is named) or after it, with the Allreduce's data still on the link
        assert re.fullmatch(r"hpcfl: round \d+: the Allreduce did not finish within 3 s "
                            r"\(train.collective_timeout_s\); not heard from: (rank 1 \(ci4\)|"
                            r"none \(every rank reached it\)); every rank stopped: .*\n",
                            line), seen
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        testbed.run("scancel", "-n", "cut")
        tool("link", "ci4", "up")


def test_the_watchdog_names_a_rank_that_stopped_answering_and_exits_4():
    """Without the testbed (any machine): rank 1 of a local mpiexec frozen (SIGSTOP)."""
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, LOOP, "2"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        read_until(proc.stdout, r"^round 3$", 120)
        rank1 = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
                 and LOOP.encode() in _read(d / "cmdline") and b"PMI_RANK=1\0" in
                 _read(d / "environ")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 4 and time.time() - t0 <= 2 + 10, err
        lines = [x for x in err.splitlines() if x.startswith("hpcfl:")]
        assert len(lines) == 1 and re.fullmatch(
            r"hpcfl: round \d+: the Allreduce did not finish within 2 s "
            rf"\(train.collective_timeout_s\); not heard from: rank 1 \({os.uname().nodename}\); "
            r"every rank stopped: rerun the same command to resume from the last checkpoint",
            lines[0]), err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
