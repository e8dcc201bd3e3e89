"""EpochSeededSampler: the order is a pure function of (seed, epoch), which is what makes a resume exact."""

import torch

from ssl_lab.data.base import EpochSeededSampler


def order(n: int, seed: int, epoch: int) -> list[int]:
    s = EpochSeededSampler(n, seed)
    s.set_epoch(epoch)
    return list(s)


def test_same_seed_and_epoch_give_same_permutation():
    assert order(50, 3, 2) == order(50, 3, 2)
    assert sorted(order(50, 3, 2)) == list(range(50))
    assert len(EpochSeededSampler(50, 3)) == 50


def test_epochs_and_seeds_change_the_order():
    assert order(50, 3, 0) != order(50, 3, 1)
    assert order(50, 3, 0) != order(50, 4, 0)


def test_fresh_sampler_at_epoch_k_matches_one_that_lived_through_epochs():
    """A resumed run builds a new sampler and only sees set_epoch(k): it must replay the unbroken run's order."""
    lived = EpochSeededSampler(40, 7)
    seen = []
    for epoch in range(4):
        lived.set_epoch(epoch)
        seen.append(list(lived))
    assert seen[3] == order(40, 7, 3)
    assert list(lived) == seen[3]  # iterating again without set_epoch does not advance the order


def test_global_torch_rng_neither_used_nor_disturbed():
    torch.manual_seed(0)
    a = order(30, 1, 5)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = order(30, 1, 5)
    torch.manual_seed(0)
    order(30, 1, 5)
    assert a == b and torch.equal(torch.rand(1), after_a)


def test_no_shuffle_is_sequential():
    s = EpochSeededSampler(5, 0, shuffle=False)
    s.set_epoch(9)
    assert list(s) == [0, 1, 2, 3, 4]
