"""A rank's private state as tables (hpcfl.private)."""
import torch

from hpcfl.private import PrivateTable


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def start():
    g = torch.Generator().manual_seed(0)
    return {"embedding": torch.randn(64, generator=g), "head.weight": torch.randn(10, 128,
                                                                                   generator=g)}


def test_rows_read_as_the_start_until_written_and_copies_are_independent():
    table = PrivateTable(start(), range(1000, 1500), "cpu")
    got = table.get([1000, 1499])
    assert all(torch.equal(got[k][i], start()[k]) for k in got for i in (0, 1))
    table.put([1200], {"embedding": torch.ones(1, 64), "head.weight": torch.zeros(1, 10, 128)})
    other = table.copy()
    row = table.get([1200, 1201])
    assert torch.equal(row["embedding"][0], torch.ones(64))
    assert torch.equal(row["embedding"][1], start()["embedding"])  # its neighbour untouched
    other.put([1200], {"embedding": torch.zeros(1, 64), "head.weight": torch.zeros(1, 10, 128)})
    assert torch.equal(table.get([1200], ["embedding"])["embedding"][0], torch.ones(64))
    flat = table.flat(table.get([1200, 1300]))
    assert flat.shape == (2, 64 + 1280) and torch.equal(
        table.unflat(flat)["head.weight"][1], start()["head.weight"])


def test_a_million_clients_cost_nothing_until_they_train():
    """5.4 KB of HyperFL state per client: 5.4 GB if every row were stored at start-up."""
    before = rss_bytes()
    table = PrivateTable({**start(), "head.bias": torch.zeros(10)}, range(1_000_000), "cpu")
    table.put(list(range(0, 1_000_000, 10_000)), table.get(list(range(0, 1_000_000, 10_000))))
    assert rss_bytes() - before < 200 * 2**20
    assert table.nbytes() > 5 * 10**9  # what it could hold
