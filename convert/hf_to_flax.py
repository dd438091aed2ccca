"""CLI: Hugging Face checkpoint directory -> the project's checkpoint format.

    python -m convert.hf_to_flax SRC_HF_DIR OUT_DIR
"""

from __future__ import annotations

import argparse

from backpack_jax import checkpoint, cli, model
from backpack_jax.hf import load_hf


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("convert.hf_to_flax", __doc__, checkpoint=False, json=False)
    p.add_argument("src", help="HF directory: config.json + model.safetensors (or sharded "
                               "safetensors with an index, or pytorch_model.bin)")
    p.add_argument("out", help="new directory for config.json + params/ (Orbax)")
    cli.run(p, argv, _convert)


def _convert(args: argparse.Namespace) -> None:
    params, config = load_hf(args.src)  # A ConversionError is a ValueError: one line.
    checkpoint.save(args.out, params, config)
    print(f"wrote {args.out}: {model.count_params(params):,} parameters, n_layer={config.n_layer}, "
          f"n_embd={config.n_embd}, num_senses={config.num_senses}")


if __name__ == "__main__":
    main()
