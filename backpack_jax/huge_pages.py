"""Transparent huge pages for XLA's large CPU buffers (Linux with glibc).

glibc serves every allocation over its mmap threshold (at most 32 MiB) with fresh pages and
returns them on free, so each call that makes a large buffer -- the 103 MB logits of a
512-token forward, a training step's activations -- faults its memory in again, 4 KiB at a
time. On the KVM guest of BENCHMARKS.md a fault costs ~2.6 us: the LM head's 25k faults took
~25 ms of its ~125. With the tunable `glibc.malloc.hugetlb=1`, malloc asks the kernel for
transparent huge pages (madvise) and the faults drop 40-fold. glibc reads tunables only when a
process starts, so the command-line entry points re-execute themselves with it set; in your
own scripts, start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"


def environment_with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with the tunable added to GLIBC_TUNABLES, or None when it is already set
    there (to any value: `glibc.malloc.hugetlb=0` opts out)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(entry.partition("=")[0] == TUNABLE for entry in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with `glibc.malloc.hugetlb=1` (same pid,
    arguments and environment otherwise); returns at once if it is set or libc is not glibc.

    Call it first in a `__main__` block, before work worth keeping has started.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    environ = environment_with_huge_pages(os.environ)
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
