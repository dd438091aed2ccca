"""The command-line toolkit of every entry point: one parser (usage naming the real program,
defaults in --help), the `--checkpoint` and `--json` flags, a results table, optional extras, and
one convention for a user's mistake: a single `error: ...` line on stderr and exit status 2.

    p = cli.parser("backpack_jax.attribution", "what it does")  # --checkpoint and --json
    p.add_argument(...)
    cli.run(p, argv, body)  # body(args) -> the numbers it printed, written to --json

A parsing mistake prints the usage line(s) first, as argparse does; a mistake found later (a bad
path, checkpoint, data file or value, a missing extra) prints the error line alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from backpack_jax.atomic import write_json
from backpack_jax.config import BackpackConfig, get_model_config

USAGE_ERROR = 2  # the exit status of every user mistake, argparse's own
CHECKPOINT_HELP = ("Hub id (org/name, org/name@revision), converted model dir, training workdir or "
                   "step, or Hugging Face dir")


class MissingExtraError(ImportError):
    """An optional dependency of a command is not installed."""


# What a user's mistake raises; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingExtraError)


def fail(message: Any) -> NoReturn:
    """Ends the command for a user's mistake: one `error: ...` line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


def require(module: str, purpose: str, extra: str = "eval") -> Any:
    """Imports `module`, or raises one line saying which extra of the package provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{purpose} needs the Python package {module!r}, which is not "
                                f"installed: pip install 'backpack-jax[{extra}]'") from e


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help, unless
    the default is empty (None, False) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default" in help or action.default in (None, False, argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with this toolkit's error line: the usage, then `error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message)


def parser(module: str, description: str | None, *, checkpoint: bool = True,
           json: bool = True) -> Parser:
    """The parser of `python -m <module>` (`module` is the dotted module name, e.g.
    "backpack_jax.attribution"), with --checkpoint and --json unless turned off."""
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"module must be a dotted module name, got {module!r}")
    p = Parser(prog=f"python -m {module}", description=description,
               formatter_class=HelpFormatter)
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    if json:
        p.add_argument("--json", metavar="PATH", help="also write every number printed to this "
                                                      "file")
    return p


def run(p: argparse.ArgumentParser, argv: Sequence[str] | None,
        body: Callable[[argparse.Namespace], dict[str, Any] | None],
        errors: tuple[type[BaseException], ...] = ()) -> dict[str, Any] | None:
    """Parses `argv` (default sys.argv), runs `body` and writes what it returns to --json
    (beside the checkpoint's path). A user's mistake (`USER_ERRORS`, plus `errors`) ends the
    command through `fail`, before any work where it can: --json's directory is checked first."""
    args = p.parse_args(argv)
    path = getattr(args, "json", None)
    if path and not pathlib.Path(path).resolve().parent.is_dir():
        p.error(f"--json {path}: directory {pathlib.Path(path).parent} does not exist")
    try:
        result = body(args)
        if path:
            checkpoint = getattr(args, "checkpoint", None)
            write_json(path, result if checkpoint is None else
                       {"checkpoint": checkpoint, **(result or {})})
            print(f"wrote {path}")
    except (*USER_ERRORS, *errors) as e:
        fail(e)
    return result


# ----------------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Table:
    """Named rows of numbers under named columns; None is a cell not measured, printed n/a."""

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
            [name, *("n/a" if v is None else f"{v:.{self.digits}f}" for v in values)]
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
