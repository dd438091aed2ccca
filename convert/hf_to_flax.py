"""CLI: Hugging Face checkpoint directory -> the project's checkpoint format.

    python -m convert.hf_to_flax SRC_HF_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import sys

from backpack_jax import checkpoint, model
from backpack_jax.hf import load_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_flax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF directory: config.json + model.safetensors (or sharded "
                                    "safetensors with an index, or pytorch_model.bin)")
    parser.add_argument("out", help="new directory for config.json + params/ (Orbax)")
    args = parser.parse_args(argv)
    try:
        params, config = load_hf(args.src)
        checkpoint.save(args.out, params, config)
    except (ValueError, FileExistsError) as e:  # ConversionError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {model.count_params(params):,} parameters, n_layer={config.n_layer}, "
          f"n_embd={config.n_embd}, num_senses={config.num_senses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
