"""Which rank hosts which clients (hpcfl.placement)."""
import pytest

from hpcfl.placement import balanced_blocks


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
