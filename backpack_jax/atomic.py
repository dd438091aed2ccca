"""Whole-file writes that a reader (or a full disk) never sees half done."""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` (same suffix, so writers pick the same format) and
    renames it onto `path` only if the block succeeds: readers see the old file or the new one,
    and a failed write removes the temporary file."""
    path = pathlib.Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
