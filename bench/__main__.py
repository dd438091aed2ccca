"""python -m bench [--quick] [--json PATH] [--only forward|generation|training ...]

Prints a Markdown table (see BENCHMARKS.md); with --json, also writes every figure to PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

PARTS = ("forward", "generation", "training")
# The PyTorch reference needs these; they come with the `bench` extra.
EXTRA = ("torch", "transformers")


def missing_extra() -> list[str]:
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[2])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, 64 instead of 256 new tokens (a smoke run)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write every figure to this JSON file")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only these parts (repeatable); default all")
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="tokens to generate after the 32-token prompt (default 256; 64 quick)")
    args = parser.parse_args(argv)
    if missing := missing_extra():
        print(f"error: python -m bench needs {' and '.join(missing)}: "
              f'pip install -e ".[bench]"', file=sys.stderr)
        return 1
    # Imported only now: it loads torch and jax, which --help and the check above must not need.
    from bench import suite

    parts = [p for p in PARTS if not args.only or p in args.only]
    results = suite.run(args.quick, parts, args.new_tokens)
    print(results["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\n(all figures: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
