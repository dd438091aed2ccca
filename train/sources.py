"""Where documents come from: local text files and prepared TFDS text datasets.

A source is cut into picklable *shards* (a file, a byte range of a .jsonl file, a range of TFDS
records) so that worker processes can read and tokenize them in parallel. A shard yields
`(key, text)` pairs for the keys a `keep` predicate accepts, so a split that takes few documents
reads few; `text` is None for a document that cannot be read or decoded, which the builder skips and
counts instead of failing a multi-hour build on one bad file. Keys are stable across machines
(relative paths), so the held-out assignment below never depends on file order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import lzma
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".xz")
JSONL_SHARD_BYTES = 64 * 2**20  # large .jsonl files are split so that several workers share them

Document = tuple[str, "str | None"]
KeyFilter = Callable[[str], bool]


class Shard(Protocol):
    """A picklable unit of reading work."""

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        """Yields `(key, text)` for kept keys; text is None when unreadable or not UTF-8."""
        ...


def keep_all(key: str) -> bool:
    """The `keep` filter of a split that takes every document."""
    del key
    return True


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclasses.dataclass(frozen=True)
class TextFileShard:
    """One .txt file = one document."""

    path: Path
    key: str

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        if keep(self.key):
            try:
                yield self.key, _decode(self.path.read_bytes())
            except OSError:
                yield self.key, None


@dataclasses.dataclass(frozen=True)
class XzShard:
    """An .xz file: a tar of text files (as in an extracted OpenWebText dump) or one xz text."""

    path: Path
    key: str

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        try:
            archive = tarfile.open(self.path, mode="r|xz")
        except tarfile.ReadError:  # not a tar: the whole stream is one document
            yield from self._plain_text(keep)
            return
        except (OSError, lzma.LZMAError, EOFError):
            yield from self._unreadable(keep)
            return
        try:
            with archive:
                for member in archive:
                    key = f"{self.key}/{member.name}"
                    if member.isfile() and keep(key):
                        yield key, _decode(archive.extractfile(member).read())
        except (OSError, lzma.LZMAError, EOFError, tarfile.TarError):
            yield from self._unreadable(keep)  # damaged: the documents after the damage are lost

    def _plain_text(self, keep: KeyFilter) -> Iterator[Document]:
        if keep(self.key):
            try:
                with lzma.open(self.path) as f:
                    yield self.key, _decode(f.read())
            except (OSError, lzma.LZMAError, EOFError):
                yield self.key, None

    def _unreadable(self, keep: KeyFilter) -> Iterator[Document]:
        if keep(self.key):
            yield self.key, None


@dataclasses.dataclass(frozen=True)
class JsonlShard:
    """The lines of a .jsonl file that start in bytes [start, stop); each line's `text` field is a
    document. Keys carry the byte offset of the line, which is stable whatever the shard size."""

    path: Path
    key: str
    start: int
    stop: int

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(self.start - 1, 0))
                if self.start > 0:
                    f.readline()  # finish the line that belongs to the previous shard
                while (offset := f.tell()) < self.stop:
                    line = f.readline()
                    if not line:
                        break
                    key = f"{self.key}@{offset}"
                    if line.strip() and keep(key):
                        yield key, _jsonl_text(line)
        except OSError:
            if keep(f"{self.key}@{self.start}"):
                yield f"{self.key}@{self.start}", None


def _jsonl_text(line: bytes) -> str | None:
    try:
        text = json.loads(line).get("text")
    except (ValueError, AttributeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return text if isinstance(text, str) else None


def local_text_shards(source_dir: str | os.PathLike) -> list[Shard]:
    """Shards for every .txt, .jsonl and .xz file under `source_dir`, in sorted path order."""
    root = Path(source_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"source directory {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    texts = [p for p in paths if p.suffix.lower() in TEXT_SUFFIXES]
    if not texts:
        raise ValueError(
            f"no {', '.join(TEXT_SUFFIXES)} files under {root} ({len(paths)} other files)"
        )
    if len(texts) < len(paths):
        log.warning("ignoring %d files under %s that are not %s", len(paths) - len(texts), root,
                    "/".join(TEXT_SUFFIXES))
    shards: list[Shard] = []
    for path in texts:
        key = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            shards.append(TextFileShard(path, key))
        elif suffix == ".xz":
            shards.append(XzShard(path, key))
        else:
            size = path.stat().st_size
            shards += [JsonlShard(path, key, start, min(start + JSONL_SHARD_BYTES, size))
                       for start in range(0, max(size, 1), JSONL_SHARD_BYTES)]
    return shards


@dataclasses.dataclass(frozen=True)
class TfdsTextShard:
    """Records [start, stop) of one split of a prepared TFDS dataset with a `text` feature."""

    name: str
    split: str
    data_dir: str
    start: int
    stop: int

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                  download=False)
        for index in range(self.start, self.stop):
            key = f"{self.split}/{index}"
            if keep(key):
                text = source[index]["text"]
                yield key, _decode(text) if isinstance(text, bytes) else text


@dataclasses.dataclass(frozen=True)
class HeldoutSelector:
    """Keeps the documents of one side of a seeded, key-hashed train/held-out split.

    A document is held out when the hash of (seed, key) falls below `fraction`: the choice is
    deterministic, independent of order and worker count, and stable when files are added.
    """

    fraction: float
    seed: int
    heldout: bool

    def rank(self, key: str) -> float:
        """Where the key falls in [0, 1): it is held out below `fraction`."""
        digest = hashlib.blake2b(f"{self.seed}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def keeps(self, rank: float) -> bool:
        """Whether a key of this rank is on this selector's side."""
        return (rank < self.fraction) == self.heldout

    def __call__(self, key: str) -> bool:
        return self.keeps(self.rank(key))
