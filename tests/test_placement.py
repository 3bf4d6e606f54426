"""Which rank hosts which clients (hpcfl.placement)."""
import pytest

from hpcfl.placement import balanced_blocks, deal, deal_stacks, host_of, hosted, stacks


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


def rank_loads(num_clients: int, frac: float, ranks: int, sizes) -> list[float]:
    """Samples each rank trains in round 1 under the default engine.stack_size (auto)."""
    from hpcfl.loop import sample_cohort
    cohort = sample_cohort(0, 1, num_clients, frac)
    dealt = deal_stacks(stacks(cohort, 0, "vectorized"), sizes, ranks)
    members = dealt.members(ranks)
    assert sorted(c for m in members for c in m) == sorted(cohort)  # every member, once
    assert all(m == [c for s in dealt.of(r) for c in s] for r, m in enumerate(members))
    return [sum(sizes[c] for c in m) for m in members]


@pytest.mark.parametrize("num_clients, frac, ranks", [
    (20, 1.0, 2), (20, 1.0, 4), (100, 1.0, 2), (100, 1.0, 4), (100, 0.3, 2), (100, 0.3, 4)])
def test_every_rank_trains_a_fair_share_of_the_papers_cohorts(num_clients, frac, ranks):
    """Before: ranks hosted whole blocks of 32 ids and trained only their own, so 20 clients
    on 2 ranks all trained on rank 0, 100 on 4 ranks split 32/32/32/4."""
    sizes = [68 + (c * 7) % 13 for c in range(num_clients)]  # unequal, as after a partition
    loads = rank_loads(num_clients, frac, ranks, sizes)
    assert max(loads) <= 1.25 * sum(loads) / ranks


def test_stacks_are_cut_from_the_cohort_alone():
    cohort = [9, 3, 41, 7, 12, 5, 30]
    assert stacks(cohort, 3, "vectorized") == [(3, 5, 7), (9, 12), (30, 41)]
    assert stacks(cohort, 0, "sequential") == [(c,) for c in sorted(cohort)]
    assert len(stacks(list(range(100)), 0, "vectorized")) == 16
    # sequential: at least 16 stacks (the ranks' balance), at most 8 clients each
    assert [len(stacks(list(range(m)), 0, "sequential")) for m in (20, 100, 1000)] == [16, 16,
                                                                                      125]
    assert stacks(cohort, 3, "sequential") == stacks(cohort, 3, "vectorized")
    assert deal([5.0, 9.0, 1.0, 4.0], 2) == [1, 0, 0, 1]  # heaviest first to the least loaded


def test_hosting_is_whole_units_and_host_of_inverts_it():
    blocks = hosted(1000, 3)
    assert [len(b) for b in blocks] == [512, 256, 232]  # UNIT 256: 4 units, 1, the rest
    assert host_of([0, 511, 512, 767, 768, 999], blocks).tolist() == [0, 0, 1, 1, 2, 2]
