"""CLI: any checkpoint (converted, training workdir or step, HF) -> a Hugging Face directory.

    python -m convert.flax_to_hf SRC OUT_HF_DIR

OUT_HF_DIR gets config.json and model.safetensors in the `stanfordnlp/backpack-gpt2` layout.
"""

from __future__ import annotations

import argparse
import sys

from backpack_jax import checkpoint, model
from backpack_jax.hf import save_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.flax_to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="converted model dir, training workdir, step dir or HF dir")
    parser.add_argument("out", help="directory for config.json + model.safetensors")
    args = parser.parse_args(argv)
    try:
        params, config = checkpoint.load(args.src)
        save_hf(params, config, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ConversionError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {model.count_params(params):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
