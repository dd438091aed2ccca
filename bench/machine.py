"""The machine's physical rates, measured in the same run as the benchmarks they bound."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

import jax
import jax.numpy as jnp
import torch

from bench.timing import best_seconds, sustained_seconds


@dataclasses.dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    platform: str  # jax's: "cpu" or "gpu"
    device: str
    gemm_gflops: float  # fp32, jnp.dot of two n x n matrices, best of several
    torch_gemm_gflops: float | None  # the same product through PyTorch (MKL on CPU)
    read_gbps: float  # fp32 streaming read (sum or matrix-vector product) sustained for 1 s
    read_burst_gbps: float  # the same, the fastest single read (~13 ms)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 rate of XLA's matrix multiply: the bound every forward and training figure meets."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * n ** 3 / best_seconds(lambda: dot(a, b), repeats) / 1e9


def torch_gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n ** 3 / best_seconds(lambda: a @ b, repeats) / 1e9


def read_gbps(megabytes: int = 512, repeats: int = 10, window_s: float = 1.0, windows: int = 3
              ) -> tuple[float, float]:
    """Memory read bandwidth: streaming reads of an fp32 array far larger than the caches, as a
    sum or as either matrix-vector product (what a decode step does), the fastest of the three.

    Returns (sustained, burst): the best average over `window_s` of back-to-back reads (best of
    `windows`; the bound of a generation run, which lasts seconds) and the best single ~13 ms
    read (of `repeats`), which on a shared VM can catch bursts 50% above what lasts a second.
    """
    x = jnp.ones((768, megabytes * 2 ** 20 // 4 // 768), jnp.float32)
    v = jnp.ones((768,), jnp.float32)
    reads = [jax.jit(jnp.sum), jax.jit(lambda x: v @ x), jax.jit(lambda x: x.reshape(-1, 768) @ v)]
    sustained, burst = float("inf"), float("inf")
    for read in reads:
        read(x).block_until_ready()
        burst = min(burst, best_seconds(functools.partial(read, x), repeats))
        sustained = min(sustained, sustained_seconds(functools.partial(read, x), window_s,
                                                     windows))
    return x.nbytes / sustained / 1e9, x.nbytes / burst / 1e9


def sustained_read_gbps() -> float:
    """A quick sustained-read probe (~3 s), taken between the runs a bandwidth bound is for."""
    return read_gbps(repeats=2, windows=1)[0]


def cpu_jiffies(stat_path: str = "/proc/stat") -> tuple[int, int] | None:
    """(steal, total) CPU time of all cores so far, in jiffies; None where /proc/stat is not.

    Steal is time the hypervisor ran something else while this VM wanted its cores: it slows
    every figure of a run alike and is invisible to the timers, so the report states it.
    """
    try:
        with open(stat_path) as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    # counted in user and nice.
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_fraction(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Share of CPU time stolen by the hypervisor between two `cpu_jiffies` readings."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def best_of(a: Machine, b: Machine) -> Machine:
    """Interference only lowers a measured rate, so the higher of two measurements stands."""
    def best(x: float | None, y: float | None) -> float | None:
        return y if x is None else (x if y is None else max(x, y))

    return dataclasses.replace(
        a, gemm_gflops=max(a.gemm_gflops, b.gemm_gflops), read_gbps=max(a.read_gbps, b.read_gbps),
        read_burst_gbps=max(a.read_burst_gbps, b.read_burst_gbps),
        torch_gemm_gflops=best(a.torch_gemm_gflops, b.torch_gemm_gflops))


def measure(with_torch: bool = True, quick: bool = False) -> Machine:
    repeats = 5 if quick else 10
    device = jax.devices()[0]
    sustained, burst = read_gbps(repeats=repeats)
    return Machine(cpu=cpu_model(), cores=os.cpu_count() or 1, platform=device.platform,
                   device=str(getattr(device, "device_kind", device)),
                   gemm_gflops=gemm_gflops(4096 if device.platform == "gpu" else 2048, repeats),
                   torch_gemm_gflops=torch_gemm_gflops(repeats=repeats) if with_torch else None,
                   read_gbps=sustained, read_burst_gbps=burst)

