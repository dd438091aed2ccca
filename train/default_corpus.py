"""The embedded default corpus: English text that every Python installation carries.

It is the Python reference documentation in `pydoc_data.topics` plus the docstrings of the standard
library's modules, so training and the tests run offline on a fresh clone. Docstrings are read by
parsing source files with `ast` rather than importing modules, which could have side effects.
The text depends on the Python version, which is therefore part of the dataset name.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from train.sources import Document, KeyFilter, Shard
from train.text_dataset import BuildPlan, build, heldout_plan

DEFAULT_NAME = f"python_docs_py{sys.version_info.major}{sys.version_info.minor}"
# ~720 non-empty documents; 5% holds out ~40 of them (~40k tokens, ~75 windows of 513) for eval.
HELDOUT_FRACTION = 0.05
SEED = 0
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


@dataclasses.dataclass(frozen=True)
class PydocTopicsShard:
    """Each topic of the interactive `help()` reference is one document."""

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        from pydoc_data.topics import topics  # 0.5 MB of text: loaded only by the worker

        for topic in sorted(topics):
            if keep(f"pydoc_topics/{topic}"):
                yield f"pydoc_topics/{topic}", topics[topic]


@dataclasses.dataclass(frozen=True)
class ModuleDocstringsShard:
    """The docstrings of one stdlib source file, in source order, form one document."""

    path: Path
    key: str

    def documents(self, keep: KeyFilter) -> Iterator[Document]:
        if not keep(self.key):
            return
        try:
            tree = ast.parse(self.path.read_bytes())
        except (OSError, SyntaxError, ValueError):
            yield self.key, None
            return
        yield self.key, "\n\n".join(_docstrings(tree))


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module, class or function and of everything defined in it, depth first.

    Only statements are searched: definitions (and so docstrings) never sit inside expressions.
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _docstrings(child)


def stdlib_shards() -> list[Shard]:
    """The pydoc topics and every stdlib .py file outside tests and site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    shards: list[Shard] = [PydocTopicsShard()]
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for file in sorted(f for f in files if f.endswith(".py")):
            path = Path(directory) / file
            key = f"stdlib/{path.relative_to(root).as_posix()}"
            shards.append(ModuleDocstringsShard(path, key))
    return shards


def default_plan() -> BuildPlan:
    return heldout_plan(stdlib_shards(), heldout_fraction=HELDOUT_FRACTION, seed=SEED, metadata={
        "source": f"Python {sys.version.split()[0]} pydoc_data.topics and standard library "
                  f"docstrings",
    })


def ensure_default_corpus(data_dir: str | os.PathLike, *, workers: int | None = None) -> str:
    """Builds the default corpus into `data_dir` unless it is there already; returns its name."""
    build(DEFAULT_NAME, default_plan(), data_dir, workers=workers or os.cpu_count() or 1,
          exist_ok=True)
    return DEFAULT_NAME
