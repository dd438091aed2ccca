"""The one batch rule (fixed-size windows, the last shifted back) and the one width rule (powers
of two, bounded), checked against a direct enumeration."""

import numpy as np
import pytest

from backpack_jax import batching


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 23])
@pytest.mark.parametrize("size", [1, 3, 8, 30])
def test_windows_have_one_size_and_cover_every_item_once(n, size):
    ws = list(batching.windows(n, size))
    assert {w.stop - w.start for w in ws} == {min(size, n)}
    assert ws[0].start == 0 and ws[-1].stop == n
    fresh = np.concatenate([np.arange(w.start, w.stop)[w.fresh] for w in ws])
    np.testing.assert_array_equal(fresh, np.arange(n))  # each item once, in order
    assert all(w.new == 0 for w in ws[:-1])  # only the last window overlaps


def test_a_sweep_over_windows_equals_the_whole_computation():
    """A row-wise function run window by window, keeping the fresh rows, is the function."""
    x_NxD = np.random.default_rng(0).normal(size=(11, 5))
    f = np.tanh
    got = np.concatenate([f(x_NxD[w.start:w.stop])[w.fresh] for w in batching.windows(11, 4)])
    np.testing.assert_array_equal(got, f(x_NxD))
    starts = [w.start for w in batching.windows(11, 4)]
    assert starts == [0, 4, 7]  # the tail [8, 11) shifted back to [7, 11)


def test_bucket_is_the_next_power_of_two_within_bounds():
    assert [batching.bucket(n, 512) for n in (0, 1, 16, 17, 33, 64, 65, 300, 512)] == [
        16, 16, 16, 32, 64, 64, 128, 512, 512]
    assert batching.bucket(300, 464) == 464 and batching.bucket(5, 10) == 10
    assert batching.bucket(5, 464, smallest=64) == 64
    for limit, smallest in [(464, 16), (80, 64), (64, 64), (10, 16), (1000, 8)]:
        widths = batching.buckets(limit, smallest)
        assert widths == sorted({batching.bucket(n, limit, smallest)
                                 for n in range(1, limit + 1)})
        assert widths[-1] == limit and all(w >= smallest or w == limit for w in widths)
    assert batching.buckets(464) == [16, 32, 64, 128, 256, 464]
    assert batching.buckets(80, 64) == [64, 80]


@pytest.mark.parametrize("call, message", [
    (lambda: list(batching.windows(0, 4)), "at least one item"),
    (lambda: list(batching.windows(5, 0)), "batch size >= 1"),
    (lambda: batching.bucket(513, 512), "513 tokens does not fit a width of at most 512"),
])
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
