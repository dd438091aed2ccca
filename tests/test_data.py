"""Data pipeline: local text -> TFDS array_record dataset -> windows -> resumable grain batches."""

import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from backpack_jax.tokenizer import EOT_ID, get_tokenizer
from train import data, sources, text_dataset

WORDS = ("the cat sat on a mat while language models learn sense vectors from text and every "
         "document ends with one token , . ; Backpack weights contextual senses 42 7").split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 120))) for _ in range(n)]


def _write_corpus(root: Path) -> list[str]:
    """Writes every supported layout plus bad input; returns the texts that should be kept."""
    texts = _texts(24, seed=0)
    (root / "txt").mkdir(parents=True)
    for i, text in enumerate(texts[:6]):
        (root / "txt" / f"doc{i}.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t}) for t in texts[6:14]]
    lines[3:3] = ["", "{not json", json.dumps({"title": "no text field"})]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:  # like an OpenWebText subset file
        for i, text in enumerate(texts[14:20]):
            data_bytes = text.encode()
            member = tarfile.TarInfo(f"subset/{i:04d}.txt")
            member.size = len(data_bytes)
            tar.addfile(member, io.BytesIO(data_bytes))
    (root / "urlsf_subset00-1_data.xz").write_bytes(buffer.getvalue())
    for i, text in enumerate(texts[20:]):
        (root / f"plain{i}.xz").write_bytes(lzma.compress(text.encode()))
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8: skipped
    (root / "README.md").write_text("not a corpus file")  # ignored
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny corpus, built once as dataset `tiny` (25% held out)."""
    source = tmp_path_factory.mktemp("source")
    texts = _write_corpus(source)
    data_dir = tmp_path_factory.mktemp("data")
    plan = text_dataset.local_text_plan(source, heldout_fraction=0.25, seed=0)
    text_dataset.build("tiny", plan, data_dir)
    return source, data_dir, texts


def _records(name: str, split: str, data_dir) -> list[list[int]]:
    source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    return [source[i]["tokens"].tolist() for i in range(len(source))]


def _stream(name: str, split: str, data_dir) -> np.ndarray:
    return np.concatenate([doc + [EOT_ID] for doc in _records(name, split, data_dir)])


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


# Building -------------------------------------------------------------------------------------

def test_build_keeps_every_good_document_and_counts_the_bad(corpus):
    _, data_dir, texts = corpus
    builder = tfds.builder("tiny", data_dir=os.fspath(data_dir))
    assert set(builder.info.splits) == {"train", "heldout"}
    tok = get_tokenizer()
    stored = [tok.decode(doc) for split in ("train", "heldout")
              for doc in _records("tiny", split, data_dir)]
    assert Counter(stored) == Counter(texts)
    counts = builder.info.metadata["splits"]
    assert sum(c["skipped_documents"] for c in counts.values()) == 3  # latin-1, bad JSON, no text
    for split in ("train", "heldout"):
        records = _records("tiny", split, data_dir)
        assert counts[split]["documents"] == len(records) > 0
        assert counts[split]["tokens"] == sum(map(len, records))
    assert "local text files" in builder.info.metadata["source"]


def test_small_corpus_still_holds_out_its_lowest_ranked_document(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    texts = {f"doc{i}.txt": f"document number {i} of a small folder." for i in range(8)}
    for name, text in texts.items():
        (source / name).write_text(text)
    ranks = {name: sources.HeldoutSelector(0.0, 0, True).rank(name) for name in texts}
    fraction = min(ranks.values()) / 2  # no key falls below it
    plan = text_dataset.local_text_plan(source, heldout_fraction=fraction, seed=0)
    text_dataset.build("small", plan, tmp_path / "data")
    tok = get_tokenizer()
    heldout = [tok.decode(d) for d in _records("small", "heldout", tmp_path / "data")]
    train = [tok.decode(d) for d in _records("small", "train", tmp_path / "data")]
    assert heldout == [texts[min(ranks, key=ranks.get)]]
    assert sorted(train + heldout) == sorted(texts.values())
    metadata = tfds.builder("small", data_dir=os.fspath(tmp_path / "data")).info.metadata
    assert metadata["heldout_fraction"] == fraction
    assert min(ranks.values()) < metadata["heldout_threshold"] < sorted(ranks.values())[1]


def test_heldout_choice_is_seeded_and_independent_of_workers(corpus, tmp_path):
    source, data_dir, _ = corpus
    plan = text_dataset.local_text_plan(source, heldout_fraction=0.25, seed=0)
    text_dataset.build("tiny", plan, tmp_path, workers=2)
    for split in ("train", "heldout"):
        assert _records("tiny", split, tmp_path) == _records("tiny", split, data_dir)
    other = text_dataset.local_text_plan(source, heldout_fraction=0.25, seed=1)
    text_dataset.build("tiny_seed1", other, tmp_path)
    assert _records("tiny_seed1", "heldout", tmp_path) != _records("tiny", "heldout", data_dir)


def test_large_splits_are_sharded_in_order_without_tensorflow(corpus, tmp_path, monkeypatch):
    """TFDS's own writer spills splits over 1 GB to bucket files through TensorFlow; ours streams
    (forcing TFDS's spill here would fail if it were used)."""
    source, data_dir, _ = corpus
    monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    monkeypatch.setattr(text_dataset, "SHARD_BYTES", 500)
    plan = text_dataset.local_text_plan(source, heldout_fraction=0.25, seed=0)
    text_dataset.build("tiny", plan, tmp_path)
    info = tfds.builder("tiny", data_dir=os.fspath(tmp_path)).info.splits["train"]
    assert info.num_shards > 3
    assert _records("tiny", "train", tmp_path) == _records("tiny", "train", data_dir)


def test_jsonl_byte_ranges_cover_every_line_once(tmp_path, monkeypatch):
    texts = _texts(30, seed=5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    whole = [d for s in sources.local_text_shards(tmp_path) for d in s.documents(sources.keep_all)]
    monkeypatch.setattr(sources, "JSONL_SHARD_BYTES", 97)
    shards = sources.local_text_shards(tmp_path)
    assert len(shards) > 10
    assert [d for s in shards for d in s.documents(sources.keep_all)] == whole
    assert [text for _, text in whole] == texts


def test_truncated_xz_archive_keeps_documents_before_the_damage(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for i, text in enumerate(_texts(40, seed=6)):
            member = tarfile.TarInfo(f"{i}.txt")
            member.size = len(text.encode())
            tar.addfile(member, io.BytesIO(text.encode()))
    (tmp_path / "cut.xz").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    documents = list(sources.XzShard(tmp_path / "cut.xz", "cut.xz").documents(sources.keep_all))
    assert documents[-1] == ("cut.xz", None)
    assert all(text for _, text in documents[:-1])


def test_no_tensorflow_needed(corpus):
    next(data.make_batches("tiny", "train", seq_len=8, batch_size=2, seed=0,
                           data_dir=corpus[1]))
    assert "tensorflow" not in sys.modules


# Batches --------------------------------------------------------------------------------------

def test_eval_batches_are_the_stream_in_order(corpus):
    data_dir = corpus[1]
    seq_len, batch = 16, 3
    stream = _stream("tiny", "heldout", data_dir)
    n_windows = data.count_windows("tiny", "heldout", seq_len=seq_len, data_dir=data_dir)
    assert n_windows == len(stream) // (seq_len + 1)
    iterator = data.make_eval_batches("tiny", seq_len=seq_len, batch_size=batch, data_dir=data_dir)
    batches = list(iterator)
    assert iterator.num_batches == len(batches) == n_windows // batch
    windows = stream[: len(batches) * batch * (seq_len + 1)].reshape(-1, seq_len + 1)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(inputs, windows[:, :-1])
    np.testing.assert_array_equal(targets, windows[:, 1:])


def test_each_epoch_is_a_new_permutation_of_all_windows(corpus):
    data_dir = corpus[1]
    seq_len = 16
    stream = _stream("tiny", "train", data_dir)
    n = len(stream) // (seq_len + 1)
    all_windows = {tuple(w) for w in stream[: n * (seq_len + 1)].reshape(n, -1)[:, :-1]}
    iterator = data.make_batches("tiny", "train", seq_len=seq_len, batch_size=1, seed=7,
                                 data_dir=data_dir, num_epochs=2)
    rows = [tuple(b["inputs"][0]) for b in iterator]
    assert len(rows) == 2 * n
    assert set(rows[:n]) == set(rows[n:]) == all_windows
    assert rows[:n] != rows[n:]


def test_shuffle_is_deterministic_by_seed(corpus):
    def first(seed):
        return _take(data.make_batches("tiny", "train", seq_len=8, batch_size=4, seed=seed,
                                       data_dir=corpus[1]), 3)

    _assert_same_batches(first(0), first(0))
    assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])


def test_resumed_iterator_sees_the_same_batches(corpus):
    def fresh():
        return data.make_batches("tiny", "train", seq_len=8, batch_size=4, seed=3,
                                 data_dir=corpus[1])

    iterator = fresh()
    per_epoch = data.count_windows("tiny", "train", seq_len=8, data_dir=corpus[1]) // 4
    _take(iterator, per_epoch + 2)  # past an epoch boundary
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 5)
    resumed = fresh()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), expected)

    other_seed = data.make_batches("tiny", "train", seq_len=8, batch_size=4, seed=4,
                                   data_dir=corpus[1])
    with pytest.raises(ValueError, match="another pipeline.*seed"):
        other_seed.set_state(state)


def test_processes_read_interleaved_rows_of_the_global_batch(corpus):
    kwargs = dict(seq_len=8, batch_size=4, seed=0, data_dir=corpus[1])
    global_batches = _take(data.make_batches("tiny", "train", **kwargs), 4)
    for index in range(2):
        local = _take(data.make_batches("tiny", "train", process_index=index, process_count=2,
                                        **kwargs), 4)
        for g, b in zip(global_batches, local, strict=True):
            assert b["inputs"].shape == (2, 8)
            np.testing.assert_array_equal(b["inputs"], g["inputs"][index::2])


def test_finite_runs_agree_on_the_number_of_batches(corpus):
    counts = [len(list(data.make_batches("tiny", "train", seq_len=8, batch_size=6, seed=0,
                                         data_dir=corpus[1], num_epochs=1, process_index=p,
                                         process_count=3))) for p in range(3)]
    windows = data.count_windows("tiny", "train", seq_len=8, data_dir=corpus[1])
    assert counts == [windows // 6] * 3


# TFDS catalog text datasets ---------------------------------------------------------------------

CATALOG_TEXTS = _texts(12, seed=9)


class TinyTextCatalog(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS builder with a `text` feature, standing in for lm1b or wikipedia."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up (see train.text_dataset)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "id": np.int32}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 9), "test": self._generate_examples(9, 12)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"text": CATALOG_TEXTS[i], "id": i}


def test_catalog_text_dataset_is_tokenized_on_first_use(tmp_path):
    TinyTextCatalog(data_dir=os.fspath(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=tmp_path / "downloads",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    batch = next(data.make_batches("tiny_text_catalog", "train", seq_len=8, batch_size=2, seed=0,
                                   data_dir=tmp_path))
    assert batch["inputs"].shape == (2, 8)
    assert "tokenized_tiny_text_catalog" in data.available_datasets(tmp_path)
    tok = get_tokenizer()
    for split, texts in (("train", CATALOG_TEXTS[:9]), ("test", CATALOG_TEXTS[9:])):
        decoded = [tok.decode(doc) for doc in _records("tokenized_tiny_text_catalog", split,
                                                        tmp_path)]
        assert sorted(decoded) == sorted(texts)
    assert data.count_windows("tiny_text_catalog", "test", seq_len=8, data_dir=tmp_path) > 0


# Bad input --------------------------------------------------------------------------------------

def test_empty_or_missing_source_directory(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"no \.txt, \.jsonl, \.xz files under .* \(1 other"):
        text_dataset.local_text_plan(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_dataset.local_text_plan(tmp_path / "missing")


def test_corpus_of_only_unreadable_files_fails_naming_the_split(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    plan = text_dataset.local_text_plan(tmp_path / "src", heldout_fraction=0.0)
    with pytest.raises(ValueError, match="split 'train' of bad would be empty .1 unreadable"):
        text_dataset.build("bad", plan, tmp_path / "data")
    assert not text_dataset.is_built("bad", tmp_path / "data")


def test_sequence_longer_than_the_split(corpus):
    with pytest.raises(ValueError, match=r"split 'heldout' of 'tiny' has \d+ tokens .* needs "):
        data.make_batches("tiny", "heldout", seq_len=100_000, batch_size=2, seed=0,
                          data_dir=corpus[1])


def test_unknown_dataset_lists_what_exists(corpus):
    with pytest.raises(ValueError, match=r"no prepared dataset 'nope' in .*available: tiny"):
        data.make_batches("nope", "train", seq_len=8, batch_size=2, seed=0, data_dir=corpus[1])
    with pytest.raises(ValueError, match="no prepared dataset 'mnist'"):
        data.count_windows("mnist", "train", seq_len=8, data_dir=corpus[1])


def test_unknown_split_lists_the_splits(corpus):
    with pytest.raises(ValueError, match="no split 'validation'; splits: .*heldout"):
        data.count_windows("tiny", "validation", seq_len=8, data_dir=corpus[1])


def test_batch_not_divisible_by_process_count(corpus):
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by process_count 4"):
        data.make_batches("tiny", "train", seq_len=8, batch_size=6, seed=0, data_dir=corpus[1],
                          process_count=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed=-1), "seed must be in"),
    (dict(num_epochs=0), "num_epochs must be positive"),
    (dict(process_index=2, process_count=2), "process_index 2 not in"),
    (dict(seq_len=0), "must be positive"),
])
def test_bad_batch_arguments(corpus, kwargs, message):
    arguments = dict(seq_len=8, batch_size=2, seed=0, data_dir=corpus[1]) | kwargs
    with pytest.raises(ValueError, match=message):
        data.make_batches("tiny", "train", **arguments)


def test_bad_dataset_names_and_existing_datasets(corpus):
    source, data_dir, _ = corpus
    plan = text_dataset.local_text_plan(source)
    with pytest.raises(ValueError, match="must match"):
        text_dataset.build("My-Data", plan, data_dir)
    with pytest.raises(ValueError, match="TFDS catalog dataset"):
        text_dataset.build("mnist", plan, data_dir)
    with pytest.raises(FileExistsError, match="already exists"):
        text_dataset.build("tiny", plan, data_dir)


# CLI and defaults -------------------------------------------------------------------------------

def test_cli_prepare_and_inspect(corpus, tmp_path, capsys):
    data.main(["prepare", "--source", os.fspath(corpus[0]), "--name", "cli_tiny",
               "--data_dir", os.fspath(tmp_path), "--heldout_fraction", "0.25", "--workers", "1"])
    data.main(["inspect", "cli_tiny", "--data_dir", os.fspath(tmp_path), "--seq_len", "16",
               "--batch_size", "2"])
    out = capsys.readouterr().out
    assert "dataset cli_tiny at" in out and "skipped" in out
    assert "Downloading" not in out and "Preparing dataset cli_tiny from local text files" in out
    assert "train: " in out and "heldout: " in out and "windows of seq_len+1=17" in out
    assert "--- train batch row 1" in out
    with pytest.raises(SystemExit) as exit_info:
        data.main(["prepare", "--help"])
    assert exit_info.value.code == 0


def test_cli_inspect_of_a_missing_dataset_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data.main(["inspect", "nothing", "--data_dir", os.fspath(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: no prepared dataset 'nothing' in {tmp_path}; available: none. Make one with "
        f"`python -m train.data prepare --source DIR --name NAME --data_dir {tmp_path}`\n")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.resolve_data_dir(None) == Path("~/.cache/backpack_jax/tensorflow_datasets"
                                               ).expanduser()
    monkeypatch.setenv(data.DATA_DIR_ENV, os.fspath(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert data.resolve_data_dir("/elsewhere") == Path("/elsewhere")


@pytest.mark.slow
def test_default_corpus_builds_once_under_concurrent_first_use(tmp_path):
    build = ("import sys; from train.default_corpus import ensure_default_corpus; "
             "ensure_default_corpus(sys.argv[1])")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.fspath(repo),
                                                        os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.Popen([sys.executable, "-c", build, os.fspath(tmp_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=600) == 0, run.stderr.read().decode()[-2000:]
    (name,) = data.available_datasets(tmp_path)
    counts = tfds.builder(name, data_dir=os.fspath(tmp_path)).info.metadata["splits"]
    assert counts["train"]["tokens"] > 400_000 and counts["heldout"]["tokens"] > 10_000
    batch = next(data.make_batches(None, "train", seq_len=512, batch_size=8, seed=0,
                                   data_dir=tmp_path))
    assert batch["inputs"].shape == (8, 512)
    text = get_tokenizer().decode(batch["inputs"][0])
    assert sum(text.count(w) for w in (" the ", " of ", " a ")) > 5  # English prose
    evaluation = data.make_eval_batches("default", seq_len=512, batch_size=8, data_dir=tmp_path)
    assert evaluation.num_batches == len(list(evaluation)) > 0
