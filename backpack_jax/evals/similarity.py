"""Lexical similarity (paper §5, Table 4, Appendix C): do single sense vectors rank word pairs as
people do?

    python -m backpack_jax.evals.similarity --checkpoint DIR \
        --data SimLex-999.txt SimVerb-3500.txt RG65.csv WS353.csv [--format F ...] \
        [--batch 256] [--json PATH] [--plot PNG]

Each pair is scored by a cosine between the two words' vectors and the scores are compared with
the human ones by Spearman's rho. Rows (methods), each for two ways of representing a word of
several tokens, its first token ("first") or the mean over its tokens ("mean"):

- `Sim_k`: the cosine of sense k of both words, for every sense k (the paper reports 12 and 14);
- `Sim_min` / `Sim_max`: the least / greatest of those K same-sense cosines (the authors'
  MinPair / MaxPair; the paper reports Sim_min);
- `Sim_min_all` / `Sim_max_all`: the least / greatest cosine over all K x K pairs of a sense of
  one word and a sense of the other (the authors' MinAll / MaxAll);
- `Embedding`: the cosine of the input embeddings E[x].

Words are tokenized with a leading space (" nurse"). Each distinct word's vectors are computed
once, in batches of `--batch` words on the device. The datasets are not shipped; the four files
are read in their distributed formats (`FORMATS`), chosen by file name or `--format`. For a
backpack-gpt2-shaped model the paper's rows are printed under ours.

- `read_dataset(path, format=None)` / `read_datasets(paths, formats)`: the human-scored pairs.
- `word_vectors(...)`: unit sense and embedding vectors of words, first and mean of subwords.
- `evaluate(params, config, tokenizer, datasets)`: the table of rho and every pair's cosines.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from backpack_jax import (
    atomic,
    batching,
    checkpoint,
    checks,
    cli,
    model,
    senses,
    tokenizer as tokenization,
)
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer

FORMATS = ("simlex", "simverb", "rg65", "ws353")
# Lower-case pieces of a file name that give its format away.
NAME_HINTS = {"simlex": ("simlex",), "simverb": ("simverb",), "rg65": ("rg65",),
              "ws353": ("ws353", "wordsim", "combined")}
# The paper's column of each format.
COLUMNS = {"simlex": "SL999", "simverb": "SV3500", "rg65": "RG65", "ws353": "WS353"}
REPRESENTATIONS = senses.SUBWORD_CHOICES  # ("first", "mean")
AGGREGATES = ("Sim_min", "Sim_max", "Sim_min_all", "Sim_max_all")
# Table 4: Spearman rho on SL999 / SV3500 / RG65 / WS353 (sense indices 0-based).
PAPER = {
    "Backpack Sim_12": (0.522, 0.471, 0.754, 0.749),
    "Backpack Sim_14": (0.500, 0.502, 0.591, 0.655),
    "Backpack Sim_min": (0.540, 0.471, 0.653, 0.607),
    "word2vec": (0.442, 0.367, 0.679, 0.684),
    "GPT2-1.5B embeddings": (0.523, 0.418, 0.670, 0.706),
    "GPT-J-6B embeddings": (0.492, 0.374, 0.766, 0.673),
    "Transformer 124M embeddings": (0.478, 0.363, 0.634, 0.681),
}


# ------------------------------------------------------------------------------- datasets

@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a format keeps its fields: by header name, or by index when it has no header."""

    separator: str
    header: tuple[str, str, str] | None  # names of the word1, word2 and score columns
    columns: tuple[int, int, int] = (0, 1, 2)  # without a header


LAYOUTS = {
    "simlex": _Layout("\t", ("word1", "word2", "SimLex999")),
    "simverb": _Layout("\t", None, (0, 1, 3)),
    "rg65": _Layout(";", None, (0, 1, 2)),
    "ws353": _Layout(",", ("Word 1", "Word 2", "Human (mean)")),
}
# The form most copies circulate in (gensim ships SimLex-999 and WordSim-353 so): `#` comment
# lines, then `word1<TAB>word2<TAB>score`. Recognised by content, whatever the dataset.
THREE_COLUMNS = _Layout("\t", None, (0, 1, 2))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _three_columns(lines: list[tuple[int, str]]) -> bool:
    """Whether the file opens with a `#` comment (no original layout has one) or its first line
    is `word<TAB>word<TAB>number`."""
    if lines and lines[0][1].lstrip().startswith("#"):
        return True
    first = lines[0][1] if lines else ""
    fields = first.split("\t")
    return len(fields) == 3 and _is_number(fields[2].strip())


@dataclasses.dataclass(frozen=True)
class WordPairs:
    """A dataset's pairs and human scores; `lines_L` are the file lines they came from."""

    name: str  # its column in the table
    path: str
    format: str
    words1_L: list[str]
    words2_L: list[str]
    scores_L: np.ndarray  # float64
    lines_L: list[int]

    def where(self, p: int) -> str:
        return f"{self.path}:{self.lines_L[p]}"


def detect_format(path: str | pathlib.Path) -> str:
    """The dataset named by the file name (SimLex-999.txt, SimVerb-3500.txt, RG65.csv, WS353.csv,
    wordsim* or WordSim353's combined.csv), case-insensitively."""
    name = pathlib.Path(path).name.lower()
    hits = [f for f, hints in NAME_HINTS.items() if any(h in name for h in hints)]
    if len(hits) != 1:
        raise ValueError(f"{path}: cannot tell the dataset format from the file name; give "
                         f"--format, one of {', '.join(FORMATS)}")
    return hits[0]


def read_dataset(path: str | pathlib.Path, format: str | None = None,
                 name: str | None = None) -> WordPairs:
    """Reads one file in its distributed format (see `LAYOUTS`) or the common three-column
    form (`THREE_COLUMNS`, `#` comments allowed); blank lines are skipped."""
    format = detect_format(path) if format is None else format
    if format not in LAYOUTS:
        raise ValueError(f"{path}: unknown dataset format {format!r}; choose one of "
                         f"{', '.join(FORMATS)}")
    layout = LAYOUTS[format]
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if _three_columns(lines):
        layout = THREE_COLUMNS
        lines = [(n, line) for n, line in lines if not line.lstrip().startswith("#")]
    columns = layout.columns
    if layout.header is not None and lines:
        n, line = lines.pop(0)
        found = [f.strip().lower() for f in line.split(layout.separator)]
        try:
            columns = tuple(found.index(c.lower()) for c in layout.header)
        except ValueError:
            raise ValueError(f"{path}:{n}: expected a {format} header with the columns "
                             f"{list(layout.header)}, got {line!r}") from None
    words1, words2, scores, numbers = [], [], [], []
    for n, line in lines:
        fields = [f.strip() for f in line.split(layout.separator)]
        if len(fields) <= max(columns):
            raise ValueError(f"{path}:{n}: malformed {format} line, expected at least "
                             f"{max(columns) + 1} {layout.separator!r}-separated fields, got "
                             f"{len(fields)}: {line!r}")
        w1, w2, score = (fields[c] for c in columns)
        if not w1 or not w2:
            raise ValueError(f"{path}:{n}: malformed {format} line, a word is empty: {line!r}")
        try:
            value = float(score)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise ValueError(f"{path}:{n}: the score {score!r} is not a number")
        words1.append(w1)
        words2.append(w2)
        scores.append(value)
        numbers.append(n)
    if not scores:
        raise ValueError(f"{path}: no word pairs in the file (empty, or only a header)")
    return WordPairs(COLUMNS[format] if name is None else name, str(path), format, words1,
                     words2, np.asarray(scores, np.float64), numbers)


def read_datasets(paths: Sequence[str | pathlib.Path],
                  formats: Sequence[str] | None = None) -> list[WordPairs]:
    """Reads several files; `formats` has one format per file, one for all, or None (from the
    file names). Columns are named as in the paper (SL999, ...), with the file name added where
    two files share a format."""
    if not paths:
        raise ValueError("no dataset files given")
    if formats is None or len(formats) == 0:
        formats = [detect_format(p) for p in paths]
    elif len(formats) == 1:
        formats = list(formats) * len(paths)
    elif len(formats) != len(paths):
        raise ValueError(f"give one --format for all files or one per file: {len(formats)} "
                         f"formats for {len(paths)} files")
    if len({pathlib.Path(p).resolve() for p in paths}) != len(paths):
        raise ValueError(f"a dataset file is given twice: {[str(p) for p in paths]}")
    shared = {f for f in formats if list(formats).count(f) > 1}
    return [read_dataset(p, f, f"{COLUMNS[f]} ({pathlib.Path(p).name})" if f in shared
                         else None) for p, f in zip(paths, formats, strict=True)]


# ------------------------------------------------------------------------------ word vectors

@dataclasses.dataclass(frozen=True)
class WordVectors:
    """Unit-length vectors of W words, on the device, per representation ("first"/"mean")."""

    senses_WxKxD: dict[str, jax.Array]
    embedding_WxD: dict[str, jax.Array]


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("config",))
def _word_batch(params: Params, ids_BxU: jax.Array, count_B: jax.Array, *,
                config: BackpackConfig) -> dict[str, tuple[jax.Array, jax.Array]]:
    senses_BxUxKxD = model.sense_network(params, ids_BxU, config)
    embedding_BxUxD = model.embedding_VxD(params)[ids_BxU]
    keep_BxU = jnp.arange(ids_BxU.shape[1]) < count_B[:, None]

    def mean(x_BxUx_):
        ones = (1,) * (x_BxUx_.ndim - 2)
        return (jnp.where(keep_BxU.reshape(*keep_BxU.shape, *ones), x_BxUx_, 0).sum(1)
                / count_B.reshape(-1, *ones))

    return {"first": (_unit(senses_BxUxKxD[:, 0]), _unit(embedding_BxUxD[:, 0])),
            "mean": (_unit(mean(senses_BxUxKxD)), _unit(mean(embedding_BxUxD)))}


def word_vectors(params: Params, config: BackpackConfig, word_ids: Sequence[Sequence[int]], *,
                 batch_size: int = 256, progress: bool = True) -> WordVectors:
    """Sense and embedding vectors of each word (given as its token ids), normalised to length
    1, of its first token and averaged over its tokens. Words are padded to the longest one and
    run `batch_size` at a time through the sense network (`batching.windows`), one compiled
    call per batch."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be >= 1, got {batch_size}")
    if not word_ids or any(len(ids) == 0 for ids in word_ids):
        raise ValueError("every word needs at least one token id")
    W, U = len(word_ids), max(len(ids) for ids in word_ids)
    ids_WxU = np.zeros((W, U), np.int32)  # padding columns: token 0, masked by the count
    count_W = np.asarray([len(ids) for ids in word_ids], np.int32)
    for w, ids in enumerate(word_ids):
        ids_WxU[w, :len(ids)] = ids
    checks.validate_token_ids(ids_WxU, config, what="word token ids")
    out: dict[str, list[tuple[jax.Array, jax.Array]]] = {r: [] for r in REPRESENTATIONS}
    with tqdm(total=W, desc="word vectors", unit="word", disable=not progress) as bar:
        for win in batching.windows(W, batch_size):
            got = _word_batch(params, jnp.asarray(ids_WxU[win.start:win.stop]),
                              jnp.asarray(count_W[win.start:win.stop]), config=config)
            for r in REPRESENTATIONS:
                out[r].append(tuple(x[win.fresh] for x in got[r]))
            bar.update(win.stop - win.start - win.new)
    return WordVectors(
        {r: jnp.concatenate([s for s, _ in out[r]]) for r in REPRESENTATIONS},
        {r: jnp.concatenate([e for _, e in out[r]]) for r in REPRESENTATIONS})


@jax.jit
def _pair_cosines(senses_WxKxD, embedding_WxD, a_L, b_L):
    all_LxKxK = jnp.einsum("pkd,pld->pkl", senses_WxKxD[a_L], senses_WxKxD[b_L],
                           precision=jax.lax.Precision.HIGHEST)
    same_LxK = jnp.diagonal(all_LxKxK, axis1=1, axis2=2)
    embedding_L = jnp.einsum("pd,pd->p", embedding_WxD[a_L], embedding_WxD[b_L],
                             precision=jax.lax.Precision.HIGHEST)
    return (same_LxK, same_LxK.min(-1), same_LxK.max(-1), all_LxKxK.min((1, 2)),
            all_LxKxK.max((1, 2)), embedding_L)


def method_names(num_senses: int) -> list[str]:
    """The table's rows: every method under both subword representations."""
    methods = [f"Sim_{k}" for k in range(num_senses)] + [*AGGREGATES, "Embedding"]
    return [f"{m} ({r})" for m in methods for r in REPRESENTATIONS]


def pair_cosines(vectors: WordVectors, a_L: Sequence[int], b_L: Sequence[int]
                 ) -> dict[str, np.ndarray]:
    """Every method's cosine [P] for the pairs of words (a_L[p], b_L[p]), by row name."""
    out = {}
    a, b = jnp.asarray(a_L, jnp.int32), jnp.asarray(b_L, jnp.int32)
    for r in REPRESENTATIONS:
        same_LxK, *rest = (np.asarray(x, np.float64) for x in _pair_cosines(
            vectors.senses_WxKxD[r], vectors.embedding_WxD[r], a, b))
        for k in range(same_LxK.shape[1]):
            out[f"Sim_{k} ({r})"] = same_LxK[:, k]
        for m, cosines_L in zip([*AGGREGATES, "Embedding"], rest, strict=True):
            out[f"{m} ({r})"] = cosines_L
    return out


# ---------------------------------------------------------------------------------- evaluate

@dataclasses.dataclass(frozen=True)
class Similarity:
    """Spearman's rho per method (rows) and dataset (columns), and what it was computed from."""

    table: cli.Table
    cosines: dict[str, dict[str, np.ndarray]]  # dataset name -> row name -> [P]
    word_ids: dict[str, list[int]]  # every distinct word's tokens


def _tokenize(datasets: Sequence[WordPairs], tokenizer: Any) -> dict[str, list[int]]:
    """Each distinct word's tokens (with a leading space); a word without any is an error at
    its first file line."""
    ids_of: dict[str, list[int]] = {}
    for d in datasets:
        for p, pair in enumerate(zip(d.words1_L, d.words2_L, strict=True)):
            for word in pair:
                if word not in ids_of:
                    ids = tokenization.word_ids(word, tokenizer) if word.strip() else []
                    if not ids:
                        raise ValueError(f"{d.where(p)}: the word {word!r} tokenizes to nothing")
                    ids_of[word] = ids
    return ids_of


def evaluate(params: Params, config: BackpackConfig, tokenizer: Any,
             datasets: Sequence[WordPairs], *, batch_size: int = 256,
             progress: bool = True) -> Similarity:
    """Spearman's rho between each method's cosines and the human scores, for each dataset."""
    spearmanr = cli.require("scipy.stats", "lexical similarity (Spearman's rho)").spearmanr
    names = [d.name for d in datasets]
    if not datasets or len(set(names)) != len(names):
        raise ValueError(f"give one or more datasets with distinct names, got {names}")
    word_ids = _tokenize(datasets, tokenizer)
    index = {w: i for i, w in enumerate(word_ids)}
    vectors = word_vectors(params, config, list(word_ids.values()), batch_size=batch_size,
                           progress=progress)
    cosines = {d.name: pair_cosines(vectors, [index[w] for w in d.words1_L],
                                    [index[w] for w in d.words2_L]) for d in datasets}
    several = sum(len(ids) > 1 for ids in word_ids.values())
    table = cli.Table(
        "Spearman rho of cosine similarity against human scores (paper Table 4)", names,
        notes=[f"{len(word_ids)} distinct words, {several} of several tokens ('first': the "
               "first token's vectors, 'mean': the mean over its tokens); pairs: "
               + ", ".join(f"{d.name} {len(d.scores_L)}" for d in datasets),
               "Sim_min/Sim_max/Sim_min_all/Sim_max_all: the authors' MinPair/MaxPair/MinAll/"
               "MaxAll; Embedding: the input embeddings E[x]"])
    for row in method_names(config.num_senses):
        table.add(row, [float(spearmanr(cosines[d.name][row], d.scores_L)[0])
                        for d in datasets])
    return Similarity(table, cosines, word_ids)


def paper_table(datasets: Sequence[WordPairs]) -> cli.Table:
    """The paper's Table 4 rows under our columns (each column takes its format's number)."""
    table = cli.Table("paper, Table 4 (backpack-gpt2 and baselines)",
                         [d.name for d in datasets])
    for name, values in PAPER.items():
        table.add(f"paper: {name}", [values[FORMATS.index(d.format)] for d in datasets])
    return table


# -------------------------------------------------------------------------------------- plot

def plot(table: cli.Table, path: str) -> None:
    """A heat map of rho, methods down and datasets across, one panel per representation."""
    plt = atomic.pyplot()
    methods = [name.rsplit(" (", 1)[0] for name in table.rows if name.endswith("(first)")]
    rho_grid = np.array([[table.rows[f"{m} ({r})"] for m in methods] for r in REPRESENTATIONS],
                         dtype=np.float64)
    limit = max(float(np.nanmax(np.abs(rho_grid), initial=0.0)), 1e-3)
    C = len(table.columns)
    fig, axes = plt.subplots(1, len(REPRESENTATIONS), squeeze=False, layout="constrained",
                             figsize=(2 + 1.1 * C * len(REPRESENTATIONS),
                                      1.5 + 0.3 * len(methods)))
    for ax, r, rho_panel in zip(axes[0], REPRESENTATIONS, rho_grid, strict=True):
        image = ax.imshow(rho_panel, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        for (m, c), value in np.ndenumerate(rho_panel):
            ax.text(c, m, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{r} subword")
        ax.set_xticks(range(C), table.columns, rotation=30, ha="right")
        ax.set_yticks(range(len(methods)), methods if r == REPRESENTATIONS[0] else [])
    fig.colorbar(image, ax=axes, shrink=0.8, label="Spearman rho")
    atomic.save_figure(fig, path)


# ----------------------------------------------------------------------------------- command

def _body(args: argparse.Namespace) -> dict[str, Any]:
    datasets = read_datasets(args.data, args.format)
    params, config = checkpoint.load(args.checkpoint)
    result = evaluate(params, config, get_tokenizer(), datasets, batch_size=args.batch)
    paper = paper_table(datasets) if cli.is_backpack_gpt2(config) else None
    shown = cli.Table(result.table.title, result.table.columns, dict(result.table.rows),
                         notes=result.table.notes)
    for name, values in ({} if paper is None else paper.rows).items():
        shown.add(name, values)
    print(shown.format())
    if args.plot:
        plot(result.table, args.plot)
        print(f"wrote {args.plot}")
    return {"table": result.table.to_json(),
            "paper": None if paper is None else paper.to_json(),
            "datasets": [{"name": d.name, "path": d.path, "format": d.format,
                          "pairs": len(d.scores_L)} for d in datasets],
            "words": len(result.word_ids),
            "multi_token_words": sum(len(ids) > 1 for ids in result.word_ids.values())}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.evals.similarity",
                   "The paper's lexical similarity (Table 4): Spearman rho of sense and embedding "
                   "cosines against human word-pair scores.")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="SimLex-999.txt, SimVerb-3500.txt, RG65.csv, WS353.csv (any subset)")
    p.add_argument("--format", nargs="+", choices=FORMATS, metavar="F",
                   help=f"each file's format ({', '.join(FORMATS)}): one for all files or one "
                        "per file (default: from the file names)")
    p.add_argument("--batch", type=int, default=256, help="words per device call")
    p.add_argument("--plot", metavar="PNG", help="heat map of rho per method and dataset")
    return cli.run(p, argv, _body)


if __name__ == "__main__":
    main()
