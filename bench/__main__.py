"""python -m bench [--quick] [--json PATH] [--only forward|generation|training ...]

Prints a Markdown table (see BENCHMARKS.md); with --json, also writes every figure to PATH.
"""

from __future__ import annotations

import argparse
import importlib.util

from backpack_jax import cli

PARTS = ("forward", "generation", "training")
# The PyTorch reference needs these; they come with the `bench` extra.
EXTRA = ("torch", "transformers")


def missing_extra() -> list[str]:
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("bench", __doc__.split("\n")[2], checkpoint=False)
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, 64 instead of 256 new tokens (a smoke run)")
    p.add_argument("--only", action="append", choices=PARTS,
                   help="run only these parts (repeatable); default all")
    p.add_argument("--new_tokens", type=int, default=None,
                   help="tokens to generate after the 32-token prompt (default 256; 64 quick)")
    cli.run(p, argv, _bench)


def _bench(args: argparse.Namespace) -> dict:
    if missing := missing_extra():
        raise cli.MissingExtraError(f"python -m bench needs {' and '.join(missing)}: "
                                    f'pip install -e ".[bench]"')
    # Imported only now: it loads torch and jax, which --help and the check above must not need.
    from bench import suite

    parts = [p for p in PARTS if not args.only or p in args.only]
    results = suite.run(args.quick, parts, args.new_tokens)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
