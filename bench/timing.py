"""Wall-clock timing that tolerates a shared, noisy machine: the best of several runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

# Project and reference are timed in turns; the first call of a turn runs up to 2x slower (the
# other side's allocations have just been freed), so each turn makes this many calls, best kept.
CALLS_PER_TURN = 2


def block(x: Any) -> Any:
    """Waits for every array in `x` (JAX dispatches asynchronously)."""
    return jax.block_until_ready(x)


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` calls; interference only ever adds time, so min is the estimate."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - start)
    return best


def sustained_seconds(fn: Callable[[], Any], window_s: float, repeats: int) -> float:
    """Seconds per call averaged over back-to-back calls filling `window_s`, best of `repeats`
    windows: a rate sustained as long as the run it bounds, which short bursts cannot lift."""
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < window_s:
            block(fn())
            calls += 1
        best = min(best, elapsed / calls)
    return best


def seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall time, result) of one call, e.g. the first call of a jitted function (compile)."""
    start = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - start, out
