"""A TFDS dataset of GPT-2 token ids, one example per document, written as array_record.

TFDS builders are classes with a fixed, registered name, but here every user-chosen NAME is its own
dataset. `build` therefore makes an unregistered subclass whose `name` is NAME for the duration of
the write; readers never need that class, because TFDS loads an unregistered name from the files in
`data_dir/NAME/1.0.0` (`tfds.builder(NAME, data_dir=...)`, `tfds.data_source(...)`). No
TensorFlow is involved: array_record is written and read with NumPy.

Each example is `{"tokens": int32[n]}` (no `<|endoftext|>`; readers append it). TFDS stores the
ids as protobuf varints in array_record records (~1.5 bytes per token after array_record's
compression), smaller than raw or zlib-encoded int32 bytes and as fast to read. Records keep
generation order, and the per-document token counts of each split are saved next to the records as
`doc_lengths-{split}.npy`, so readers can locate any window of the concatenated stream without
scanning the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from backpack_jax.tokenizer import EOT_ID, get_tokenizer
from train.sources import (
    HeldoutSelector,
    KeyFilter,
    Shard,
    TfdsTextShard,
    keep_all,
    local_text_shards,
)

log = logging.getLogger(__name__)

TRAIN = "train"
HELDOUT = "heldout"
DEFAULT_HELDOUT_FRACTION = 0.0005  # the paper's 0.05% of OpenWebText documents
TOKENS = "tokens"
VERSION = "1.0.0"
TFDS_RECORDS_PER_SHARD = 10_000
_LOGGED_SKIPS = 20  # skipped documents named in the log per split; all are counted
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
SHARD_BYTES = 256 * 2**20  # serialized bytes per array_record file

Task = tuple[Shard, KeyFilter]  # read the documents of the shard that the filter keeps


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What to build: the reading tasks of each split and what to record about the source."""

    splits: dict[str, list[Task]]
    metadata: dict[str, Any]


def heldout_plan(shards: Sequence[Shard], *, heldout_fraction: float, seed: int,
                 metadata: dict[str, Any]) -> BuildPlan:
    """Train and held-out splits of the same shards, separated by a seeded hash of each key.

    The held-out split comes first: it is cheap (only its documents are tokenized), so a corpus
    too small for the fraction fails in seconds rather than after the train split.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    metadata = {**metadata, "heldout_fraction": heldout_fraction, "seed": seed}
    if heldout_fraction == 0.0:
        return BuildPlan({TRAIN: [(shard, keep_all) for shard in shards]}, metadata)
    return BuildPlan(
        {
            split: [(shard, HeldoutSelector(heldout_fraction, seed, split == HELDOUT))
                    for shard in shards]
            for split in (HELDOUT, TRAIN)
        },
        metadata,
    )


def local_text_plan(source_dir: str | os.PathLike, *,
                    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, seed: int = 0) -> BuildPlan:
    """Plan for a directory of .txt / .jsonl / .xz files (see `train.sources`)."""
    return heldout_plan(local_text_shards(source_dir), heldout_fraction=heldout_fraction,
                        seed=seed,
                        metadata={"source": f"local text files under {Path(source_dir).resolve()}"})


def tfds_text_plan(name: str, data_dir: str) -> BuildPlan:
    """Plan that tokenizes every split of a prepared TFDS dataset with a `text` feature."""
    builder = tfds.builder(name, data_dir=data_dir)
    if "text" not in builder.info.features:
        raise ValueError(f"TFDS dataset {name!r} has no `text` feature to tokenize "
                         f"(features: {', '.join(builder.info.features)})")
    splits = {
        split: [(TfdsTextShard(name, split, data_dir, start,
                               min(start + TFDS_RECORDS_PER_SHARD, info.num_examples)), keep_all)
                for start in range(0, info.num_examples, TFDS_RECORDS_PER_SHARD)]
        for split, info in builder.info.splits.items()
    }
    return BuildPlan(splits, {"source": f"TFDS dataset {builder.info.full_name} in {data_dir}"})


@dataclasses.dataclass
class _ShardTokens:
    tokens: list[np.ndarray]
    skipped: list[str]
    empty: int
    lowest: tuple[float, str] | None = None  # (rank, key) of the lowest rank, held-out pass


def _tokenize_task(task: Task) -> _ShardTokens:
    """Reads and tokenizes one shard (runs in a worker process)."""
    shard, keep = task
    encode = get_tokenizer().encode
    result = _ShardTokens([], [], 0)

    def keep_and_rank(key: str) -> bool:
        if not (isinstance(keep, HeldoutSelector) and keep.heldout):
            return keep(key)
        rank = keep.rank(key)  # the held-out pass notes its lowest rank (one hash per key)
        result.lowest = min(result.lowest or (rank, key), (rank, key))
        return keep.keeps(rank)

    for key, text in shard.documents(keep_and_rank):
        if text is None:
            result.skipped.append(key)
        elif not text:
            result.empty += 1
        else:
            result.tokens.append(np.asarray(encode(text), dtype=np.int32))
    return result


TaskMap = Callable[[Callable[[Task], _ShardTokens], Sequence[Task]], Iterator[_ShardTokens]]


@contextlib.contextmanager
def _task_map(workers: int) -> Iterator[TaskMap]:
    """An ordered map over tasks, in `workers` processes (spawned: the caller may hold threads)."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield functools.partial(pool.imap, chunksize=1)


class _TokenizedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the documents of a `BuildPlan` as token ids; subclassed per dataset name."""

    VERSION = tfds.core.Version(VERSION)
    # Generated at run time, so there is no code directory with checksums.tsv to look up (and
    # TFDS's lookup for classes in packages needs the `importlib_resources` backport).
    code_path = None

    def __init__(self, *, plan: BuildPlan, task_map: TaskMap, **kwargs: Any) -> None:
        self._plan = plan
        self._task_map = task_map
        self._heldout_threshold: float | None = None  # set when no key falls below the fraction
        super().__init__(**kwargs)

    def _log_download_bytes(self) -> None:
        """TFDS announces a download here; nothing downloads, so say what happens instead."""
        print(f"Preparing dataset {self.name} from {self._plan.metadata['source']} (nothing is "
              f"downloaded) in {self.data_dir}", flush=True)

    def _log_download_done(self) -> None:
        print(f"Dataset {self.name} prepared in {self.data_dir}", flush=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"GPT-2 token ids, one example per document, of "
                        f"{self._plan.metadata['source']}.",
            features=tfds.features.FeaturesDict({
                TOKENS: tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                             doc="GPT-2 BPE ids of one document, no end-of-text"),
            }),
            metadata=tfds.core.MetadataDict(
                {**self._plan.metadata, "tokenizer": "gpt2", "eot_id": EOT_ID, "splits": {}}),
            disable_shuffling=True,  # records are in the order of doc_lengths-{split}.npy
        )

    def _generate_splits(self, dl_manager: Any, download_config: Any) -> list[tfds.core.SplitInfo]:
        """Writes each split as its examples arrive.

        TFDS's own writer sorts examples through temporary bucket files, which need TensorFlow once
        a split exceeds 1 GB; ours come in their final order, so they are streamed straight out.
        """
        del download_config
        return [self._write_split(split, examples)
                for split, examples in self._split_generators(dl_manager).items()]

    def _write_split(self, split: str, examples: Iterator[tuple[int, dict]]
                     ) -> tfds.core.SplitInfo:
        template = tfds.core.ShardedFileTemplate(
            data_dir=self.data_path, dataset_name=self.name, split=split,
            filetype_suffix=tfds.core.FileFormat.ARRAY_RECORD.file_suffix)
        parts: list[Path] = []
        shard_lengths: list[int] = []
        shard_bytes: list[int] = []
        writer = None
        for _, example in examples:
            if writer is None:
                parts.append(self.data_path / f"{split}.part{len(parts)}.tmp")
                writer = ArrayRecordWriter(os.fspath(parts[-1]), "group_size:1")
                shard_lengths.append(0)
                shard_bytes.append(0)
            record = self.info.features.serialize_example(example)
            writer.write(record)
            shard_lengths[-1] += 1
            shard_bytes[-1] += len(record)
            if shard_bytes[-1] >= SHARD_BYTES:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()
        for index, part in enumerate(parts):
            part.rename(template.sharded_filepath(shard_index=index, num_shards=len(parts)))
        return tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths,
                                   num_bytes=sum(shard_bytes), filename_template=template)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # all input is local
        return {split: self._generate_examples(split, tasks)
                for split, tasks in self._plan.splits.items()}

    def _generate_examples(self, split: str, tasks: list[Task]) -> Iterator[tuple[int, dict]]:
        if self._heldout_threshold is not None:
            tasks = [(shard, dataclasses.replace(keep, fraction=self._heldout_threshold)
                      if isinstance(keep, HeldoutSelector) else keep) for shard, keep in tasks]
        lengths: list[int] = []
        skipped = empty = 0
        lowest: tuple[float, str] | None = None
        with tqdm.tqdm(total=len(tasks), desc=f"Tokenizing {self.name} {split}",
                       unit="shard") as progress:
            for result in self._task_map(_tokenize_task, tasks):
                for tokens in result.tokens:
                    yield len(lengths), {TOKENS: tokens}
                    lengths.append(len(tokens))
                for key in result.skipped[: max(0, _LOGGED_SKIPS - skipped)]:
                    log.warning("skipped %s: unreadable or not UTF-8 (or no `text` string)", key)
                skipped += len(result.skipped)
                empty += result.empty
                if result.lowest is not None:
                    lowest = min(lowest or result.lowest, result.lowest)
                progress.update()
                progress.set_postfix(docs=len(lengths), skipped=skipped, refresh=False)
        fraction = self._plan.metadata.get("heldout_fraction")
        if not lengths and split == HELDOUT and lowest and self._heldout_threshold is None:
            # A small corpus may have no key below the fraction: hold out the lowest-ranked one
            # (the train split then uses the same threshold, so no document is in both).
            self._heldout_threshold = float(np.nextafter(lowest[0], 1.0))
            self.info.metadata["heldout_threshold"] = self._heldout_threshold
            log.warning("no document of %s falls below the held-out fraction %s; holding out the "
                        "lowest-ranked one, %s", self.name, fraction, lowest[1])
            yield from self._generate_examples(split, tasks)
            return
        if not lengths:
            hint = f"; raise the held-out fraction ({fraction})" if split == HELDOUT else ""
            raise ValueError(f"split {split!r} of {self.name} would be empty ({skipped} unreadable "
                             f"and {empty} empty documents){hint}")
        np.save(self.data_path / f"doc_lengths-{split}.npy", np.asarray(lengths, dtype=np.int32))
        self.info.metadata["splits"][split] = {
            "documents": len(lengths), "tokens": int(sum(lengths)),
            "skipped_documents": skipped, "empty_documents": empty,
        }
        if skipped:
            log.warning("%s %s: skipped %d unreadable documents", self.name, split, skipped)


def validate_name(name: str) -> None:
    """A NAME must be a valid TFDS dataset name that does not shadow a TFDS catalog builder."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"dataset name {name!r} must match [a-z][a-z0-9_]* (a TFDS dataset name)")
    if name in tfds.list_builders(with_community_datasets=False):
        raise ValueError(f"dataset name {name!r} is a TFDS catalog dataset; choose another name")


def dataset_path(name: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / name / VERSION


def is_built(name: str, data_dir: str | os.PathLike) -> bool:
    return (dataset_path(name, data_dir) / "dataset_info.json").exists()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialises builds of one dataset across processes (two test runs, several hosts)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(name: str, plan: BuildPlan, data_dir: str | os.PathLike, *, workers: int = 1,
          exist_ok: bool = False) -> Path:
    """Tokenizes `plan` into the dataset NAME under `data_dir`; returns the dataset directory.

    TFDS writes into a temporary directory and renames it when complete, and a lock file makes
    concurrent callers wait, so readers only ever see a finished dataset.
    """
    validate_name(name)
    path = dataset_path(name, data_dir)
    with _exclusive(Path(data_dir) / f".{name}.lock"):
        if is_built(name, data_dir):
            if exist_ok:
                return path
            raise FileExistsError(f"dataset {name!r} already exists at {path}; delete it first")
        builder_cls = type(name, (_TokenizedText,), {"name": name, "__module__": __name__},
                           skip_registration=True)
        workers = min(workers, max(len(tasks) for tasks in plan.splits.values()))
        with _task_map(workers) as task_map, tempfile.TemporaryDirectory() as scratch:
            builder = builder_cls(plan=plan, task_map=task_map, data_dir=os.fspath(data_dir),
                                  file_format="array_record")
            builder.download_and_prepare(
                download_dir=scratch,  # unused, but TFDS would otherwise create data_dir/downloads
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return path
