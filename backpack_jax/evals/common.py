"""What every experiment command shares: the command line, a results table printed and written
as JSON, files written atomically, and the optional `[eval]` extra."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from backpack_jax import checkpoint
from backpack_jax.atomic import write_json
from backpack_jax.config import BackpackConfig, get_model_config
from backpack_jax.model import Params

EXTRA_HINT = "pip install 'backpack-jax[eval]'"


class MissingExtraError(ImportError):
    """An optional dependency of an experiment is not installed."""


def require(module: str, purpose: str) -> Any:
    """Imports `module`, or raises one line saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{purpose} needs the Python package {module!r}, which is not "
                                f"installed: {EXTRA_HINT}") from e


# ----------------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Table:
    """Named rows of numbers under named columns; None is a blank cell (not measured)."""

    title: str
    columns: list[str]
    rows: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    digits: int = 3
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, values: Sequence[float | None]) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"row {name!r} has {len(values)} values for {len(self.columns)} "
                             f"columns {self.columns}")
        self.rows[name] = [None if v is None else float(v) for v in values]

    def format(self) -> str:
        cells = [["", *self.columns]] + [
            [name, *("" if v is None else f"{v:.{self.digits}f}" for v in values)]
            for name, values in self.rows.items()]
        widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
        lines = [" | ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                            for c, (cell, w) in enumerate(zip(row, widths, strict=True)))
                 for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([self.title, *lines, *self.notes])

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns,
                "rows": {name: dict(zip(self.columns, values, strict=True))
                         for name, values in self.rows.items()},
                "notes": self.notes}


def is_backpack_gpt2(config: BackpackConfig) -> bool:
    """True when `config` has backpack-gpt2's shape, so the paper's numbers are comparable."""
    fields = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_senses",
              "sense_intermediate_scale")
    paper = get_model_config("gpt2_small")
    return all(getattr(config, f) == getattr(paper, f) for f in fields)


# ----------------------------------------------------------------------------- command line

def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every experiment takes: --checkpoint and --json."""
    p = argparse.ArgumentParser(prog=f"python -m backpack_jax.evals.{prog}",
                                description=description)
    p.add_argument("--checkpoint", required=True,
                   help="converted model dir, training workdir or step, or Hugging Face dir")
    p.add_argument("--json", metavar="PATH", help="also write every number printed to this file")
    return p


def load(path: str) -> tuple[Params, BackpackConfig]:
    return checkpoint.load(path)


def run(p: argparse.ArgumentParser, argv: Sequence[str] | None,
        body: Callable[[argparse.Namespace], dict[str, Any]]) -> dict[str, Any]:
    """Parses `argv`, runs `body`, writes its result to --json; a user error (a bad file,
    checkpoint or argument, a missing extra) exits with one line instead of a traceback."""
    args = p.parse_args(argv)
    try:
        result = body(args)
        if args.json:
            write_json(args.json, {"checkpoint": args.checkpoint, **result})
            print(f"wrote {args.json}")
    except (ValueError, FileNotFoundError, MissingExtraError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return result
