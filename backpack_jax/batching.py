"""Fixed-shape sweeps: one batch rule and one width rule, so that a sweep compiles few shapes.

XLA compiles once per shape, so a sweep over n items runs batches of one size and pads texts to
a few widths:

- `windows(n, size)`: batches of exactly min(size, n) consecutive items. The last one is
  shifted back to end at item n, overlapping the one before; its first items were computed
  already and their outputs are dropped (`Window.new`). No fill rows, no fill values.
- `bucket(n, limit)`: the width a text of n tokens is padded to, the next power of two (at
  least `smallest`) and at most `limit`; `buckets(limit)` lists them all (to compile them
  ahead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

SMALLEST_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class Window:
    """Items [start, stop) of a sweep; those from `start + new` on appear here first."""

    start: int
    stop: int
    new: int  # the offset of the first item not in an earlier window

    @property
    def fresh(self) -> slice:
        """Where the new items' outputs sit in this window's outputs."""
        return slice(self.new, self.stop - self.start)


def windows(n: int, size: int) -> Iterator[Window]:
    """Covers items 0..n-1 with windows of exactly min(size, n) items, the last shifted back."""
    if n < 1 or size < 1:
        raise ValueError(f"a sweep needs at least one item and a batch size >= 1, got n={n}, "
                         f"size={size}")
    size = min(size, n)
    for first in range(0, n, size):
        start = min(first, n - size)
        yield Window(start, start + size, first - start)


def bucket(n: int, limit: int, smallest: int = SMALLEST_WIDTH) -> int:
    """The padded width of a text of `n` tokens: the next power of two, at least `smallest`, at
    most `limit`."""
    if not 0 <= n <= limit:
        raise ValueError(f"a text of {n} tokens does not fit a width of at most {limit}")
    return min(max(smallest, 1 << (n - 1).bit_length()), limit)


def buckets(limit: int, smallest: int = SMALLEST_WIDTH) -> list[int]:
    """Every width `bucket` gives for texts of 1..limit tokens, shortest first."""
    return sorted({bucket(n, limit, smallest) for n in range(1, limit + 1)})
