"""glibc's huge-page tunable: how the entry points set it, and that it removes XLA's page faults."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from backpack_jax import huge_pages

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_tunable_is_added_once_and_a_users_choice_stands():
    assert huge_pages.environment_with_huge_pages({"A": "1"}) == {
        "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert huge_pages.environment_with_huge_pages(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    for chosen in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"):
        assert huge_pages.environment_with_huge_pages({"GLIBC_TUNABLES": chosen}) is None
    # A longer name that merely starts with the tunable's is a different tunable.
    assert huge_pages.environment_with_huge_pages(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=0"}) is not None


def _python(script: str, tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="the tunable is glibc's")
def test_reexec_sets_the_tunable_in_the_same_process():
    script = ("import os, sys; print(os.getpid()); sys.stdout.flush()\n"
              "from backpack_jax import huge_pages; huge_pages.reexec_with_huge_pages()\n"
              "print(os.getpid(), os.environ['GLIBC_TUNABLES'])")
    first_pid, pid, tunables = _python(script, None)[-3:]
    assert pid == first_pid and tunables == "glibc.malloc.hugetlb=1"
    assert _python(script, "glibc.malloc.hugetlb=0")[-1] == "glibc.malloc.hugetlb=0"


# Minor page faults of the second call of a jitted function making a fresh 64 MiB buffer.
FAULTS = """
import resource, jax, jax.numpy as jnp
make = jax.jit(lambda x: jnp.broadcast_to(x, (2 ** 24,)) + 1.0)
make(jnp.float32(1)).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
make(jnp.float32(2)).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC or not THP.exists() or "[madvise]" not in THP.read_text(),
                    reason="the tunable matters where glibc serves malloc and the kernel gives "
                           "transparent huge pages on request only (madvise)")
def test_huge_pages_remove_the_faults_of_a_fresh_large_buffer():
    pages_4k = 2 ** 26 // 4096
    without = int(_python(FAULTS, "glibc.malloc.hugetlb=0")[-1])
    with_huge = int(_python(FAULTS, "glibc.malloc.hugetlb=1")[-1])
    assert without >= pages_4k  # every 4 KiB page of the fresh buffer faults in
    assert with_huge < pages_4k // 8
