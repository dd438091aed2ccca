"""Training and evaluation batches from tokenized TFDS datasets, and the `prepare`/`inspect` CLI.

Names resolve, in `data_dir`, to:
  * None or "default": the embedded corpus (`train.default_corpus`), built on first use;
  * a dataset made by `python -m train.data prepare` (feature `tokens`);
  * any prepared array_record TFDS dataset with a `text` feature (e.g. "lm1b",
    "wikipedia/20230601.en"): tokenized once, on first use, into the sibling dataset
    "tokenized_<name>" with the same splits.

Batches: the windows of `train.windows` are shuffled by seed (a new order each epoch), cut into
global batches, and process p of P takes every P-th window, so global batch k is the same windows
whatever P is and each process reads only its rows. The iterator state is the global batch index.

`fingerprint` identifies the prepared data a name means now; training checkpoints record it, so
that a run resumed on a dataset rebuilt under the same name notices.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from backpack_jax import cli
from backpack_jax.tokenizer import get_tokenizer
from train import text_dataset
from train.default_corpus import ensure_default_corpus
from train.text_dataset import HELDOUT, TOKENS, TRAIN
from train.windows import Batch, TokenStream, Windows

DATA_DIR_ENV = "BACKPACK_JAX_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/backpack_jax/tensorflow_datasets")
DEFAULT_NAME = "default"
# Two threads keep a few batches ready while the training step runs (the reads hold the GIL).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir`, else $BACKPACK_JAX_DATA_DIR, else ~/.cache/backpack_jax/tensorflow_datasets."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def available_datasets(data_dir: str | os.PathLike) -> list[str]:
    """Names ("name" or "name/config") of the TFDS datasets prepared in `data_dir`."""
    root = Path(data_dir)
    infos = [*root.glob("*/*/dataset_info.json"), *root.glob("*/*/*/dataset_info.json")]
    names = {p.parent.parent.relative_to(root).as_posix() for p in infos}
    return sorted(n for n in names if not n.startswith("."))


def _prepared_builder(name: str, data_dir: Path) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        raise ValueError(
            f"no prepared dataset {name!r} in {data_dir}; available: "
            f"{', '.join(available_datasets(data_dir)) or 'none'}. Make one with "
            f"`python -m train.data prepare --source DIR --name NAME --data_dir {data_dir}`"
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"dataset {name!r} is stored as {builder.info.file_format.value}; "
                         f"random access needs it prepared with file_format='array_record'")
    return builder


def tokenized_builder(name: str | None, data_dir: str | os.PathLike | None = None
                      ) -> tfds.core.DatasetBuilder:
    """The token-id dataset that `name` refers to, building it first where that is needed."""
    root = resolve_data_dir(data_dir)
    if name in (None, DEFAULT_NAME):
        name = ensure_default_corpus(root)
    builder = _prepared_builder(name, root)
    features = builder.info.features
    if TOKENS in features:
        return builder
    if "text" in features:
        tokenized = "tokenized_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        text_dataset.build(tokenized, text_dataset.tfds_text_plan(name, os.fspath(root)), root,
                           workers=os.cpu_count() or 1, exist_ok=True)
        return _prepared_builder(tokenized, root)
    raise ValueError(f"dataset {name!r} has neither `{TOKENS}` nor `text` features "
                     f"({', '.join(features)})")


def fingerprint(name: str | None, data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The dataset's name, version, examples per split, and a digest of its files' names and
    sizes and of its JSON metadata (TFDS's dataset_info.json, our metadata.json: sources, token
    counts). Cheap for any corpus: the records themselves are not read."""
    builder = tokenized_builder(name, data_dir)
    digest = hashlib.sha256()
    for path in sorted(Path(builder.data_path).iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\0{path.stat().st_size}\n".encode())
            if path.suffix == ".json":
                digest.update(path.read_bytes())
    return {"name": builder.name, "version": str(builder.info.version),
            "splits": {split: info.num_examples for split, info in builder.info.splits.items()},
            "files": digest.hexdigest()}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data `now` differs from the `saved` fingerprint's, in words; [] if it does not."""
    changes = [f"its {key} was {saved.get(key)!r}, now {now.get(key)!r}"
               for key in ("name", "version") if saved.get(key) != now.get(key)]
    before, after = saved.get("splits", {}), now.get("splits", {})
    changes += [f"split {split!r} had {before.get(split, 'no')} examples, now "
                f"{after.get(split, 'none')}" for split in sorted(set(before) | set(after))
                if before.get(split) != after.get(split)]
    if not changes and saved.get("files") != now.get("files"):
        changes.append("its prepared files differ (the same number of examples per split)")
    return changes


def load_stream(name: str | None, split: str, data_dir: str | os.PathLike | None = None
                ) -> TokenStream:
    """The whole-split token stream of `name` (see the module docstring for names)."""
    builder = tokenized_builder(name, data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"dataset {builder.name!r} has no split {split!r}; "
                         f"splits: {', '.join(builder.info.splits)}")
    lengths = np.load(builder.data_path / f"doc_lengths-{split}.npy", mmap_mode="r")
    return TokenStream.from_lengths(builder.as_data_source(split), lengths)


def count_windows(name: str | None, split: str, *, seq_len: int,
                  data_dir: str | os.PathLike | None = None) -> int:
    """How many `seq_len + 1`-token windows (sequences) one pass over the split holds."""
    return len(Windows(load_stream(name, split, data_dir), seq_len))


class BatchIterator(Iterator[Batch]):
    """Yields `{"inputs", "targets"}`, each int32[batch_size // process_count, seq_len].

    `get_state()` is JSON-serialisable: the pipeline's identity and the number of global batches
    consumed. `set_state` refuses a state from a different pipeline; the process count may change
    between save and restore, since global batches do not depend on it.
    """

    def __init__(self, batches: grain.MapDataset, pipeline: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self.num_batches = len(batches) if pipeline["num_epochs"] is not None else None
        self._iterator = iter(batches.to_iter_dataset(_READ_OPTIONS))

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": dict(self._pipeline), "position": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("pipeline") != self._pipeline:
            saved = state.get("pipeline") or {}
            diff = {k: (saved.get(k), v) for k, v in self._pipeline.items() if saved.get(k) != v}
            raise ValueError(f"iterator state is from another pipeline; (saved, now): {diff}")
        self._iterator.set_state(state["position"])


def _batch_iterator(name: str | None, split: str, *, seq_len: int, batch_size: int,
                    seed: int | None, num_epochs: int | None, data_dir: str | os.PathLike | None,
                    process_index: int, process_count: int) -> BatchIterator:
    """Batches of the split's windows, shuffled by `seed` or in order when it is None."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by "
                         f"process_count {process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    windows = Windows(load_stream(name, split, data_dir), seq_len)
    if len(windows) < batch_size:
        raise ValueError(
            f"split {split!r} of {name or DEFAULT_NAME!r} has {windows.stream.n_tokens} tokens "
            f"(with one <|endoftext|> per document) = {len(windows)} windows of seq_len+1="
            f"{seq_len + 1}; one batch of {batch_size} needs {batch_size * (seq_len + 1)} tokens"
        )
    indices = grain.MapDataset.range(len(windows))
    if seed is not None:
        indices = indices.shuffle(seed=seed)
    indices = indices.repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so that every process agrees
        indices = indices[: len(indices) // batch_size * batch_size]
    batches = (indices[process_index::process_count].map(windows)
               .batch(batch_size // process_count, drop_remainder=True))
    pipeline = {"name": name, "split": split, "seq_len": seq_len, "batch_size": batch_size,
                "seed": seed, "num_epochs": num_epochs, "windows": len(windows)}
    return BatchIterator(batches, pipeline)


def make_batches(name: str | None, split: str, *, seq_len: int, batch_size: int, seed: int,
                 data_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> BatchIterator:
    """Shuffled training batches; `num_epochs=None` repeats forever with a new order per epoch.

    A finite run ends at the last whole global batch (a partial one is dropped).
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return _batch_iterator(name, split, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           num_epochs=num_epochs, data_dir=data_dir, process_index=process_index,
                           process_count=process_count)


def make_eval_batches(name: str | None, split: str = HELDOUT, *, seq_len: int, batch_size: int,
                      data_dir: str | None = None, process_index: int = 0,
                      process_count: int = 1) -> BatchIterator:
    """One in-order pass over the split, for evaluation.

    The last partial global batch is dropped, so `num_batches * batch_size` of the
    `count_windows(...)` windows are evaluated (all but fewer than one batch).
    """
    return _batch_iterator(name, split, seq_len=seq_len, batch_size=batch_size, seed=None,
                           num_epochs=1, data_dir=data_dir, process_index=process_index,
                           process_count=process_count)


def _prepare(args: argparse.Namespace) -> None:
    plan = text_dataset.local_text_plan(args.source, heldout_fraction=args.heldout_fraction,
                                        seed=args.seed)
    path = text_dataset.build(args.name, plan, resolve_data_dir(args.data_dir),
                              workers=args.workers)
    _print_summary(tfds.builder_from_directory(os.fspath(path)))


def _print_summary(builder: tfds.core.DatasetBuilder) -> None:
    size = sum(f.stat().st_size for f in Path(builder.data_path).iterdir())
    metadata = builder.info.metadata or {}
    print(f"dataset {builder.name} at {builder.data_path} ({size / 2**20:.1f} MiB)")
    print(f"source: {metadata.get('source', builder.info.description)}")
    for split, info in builder.info.splits.items():
        counts = metadata.get("splits", {}).get(split, {})
        print(f"  {split}: {info.num_examples} documents, {counts.get('tokens', '?')} tokens, "
              f"{counts.get('skipped_documents', 0)} skipped (unreadable / not UTF-8), "
              f"{counts.get('empty_documents', 0)} empty")


def _inspect(args: argparse.Namespace) -> None:
    builder = tokenized_builder(args.name, args.data_dir)
    _print_summary(builder)
    for split in builder.info.splits:
        n = count_windows(args.name, split, seq_len=args.seq_len, data_dir=args.data_dir)
        print(f"  {split}: {n} windows of seq_len+1={args.seq_len + 1}")
    split = TRAIN if TRAIN in builder.info.splits else next(iter(builder.info.splits))
    batch = next(make_batches(args.name, split, seq_len=args.seq_len, batch_size=args.batch_size,
                              seed=0, data_dir=args.data_dir))
    tokenizer = get_tokenizer()
    for row, ids in enumerate(batch["inputs"]):
        print(f"--- {split} batch row {row}, inputs[:{args.show_tokens}] ---")
        print(tokenizer.decode(ids[: args.show_tokens]))


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("train.data", __doc__, checkpoint=False, json=False)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare", formatter_class=cli.HelpFormatter,
        help="tokenize a directory of .txt/.jsonl/.xz files into a TFDS dataset",
        description="Tokenize every .txt (one document per file), .jsonl (a `text` field per line) "
                    "and .xz (a tar of .txt files, or one xz-compressed text) under --source. "
                    "Unreadable or non-UTF-8 documents are skipped, logged and counted.")
    prepare.add_argument("--source", required=True, help="directory of text files")
    prepare.add_argument("--name", required=True, help="dataset name, [a-z][a-z0-9_]*")
    prepare.add_argument("--heldout_fraction", type=float,
                         default=text_dataset.DEFAULT_HELDOUT_FRACTION,
                         help="fraction of documents in the `heldout` split")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the held-out choice")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="tokenizing processes")
    inspect = commands.add_parser("inspect", formatter_class=cli.HelpFormatter,
                                  help="print sizes and a decoded sample batch")
    inspect.add_argument("name", help=f"dataset name; {DEFAULT_NAME!r} = the embedded corpus")
    inspect.add_argument("--seq_len", type=int, default=512, help="tokens per window")
    inspect.add_argument("--batch_size", type=int, default=4, help="rows of the sample batch")
    inspect.add_argument("--show_tokens", type=int, default=64, help="tokens to decode per row")
    for command in (prepare, inspect):
        command.add_argument("--data_dir", default=None,
                             help=f"TFDS data directory (default: ${DATA_DIR_ENV} or "
                                  f"{DEFAULT_DATA_DIR})")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prepare.set_defaults(body=_prepare)
    inspect.set_defaults(body=_inspect)
    cli.run(parser, argv, lambda args: args.body(args))


if __name__ == "__main__":
    main()
