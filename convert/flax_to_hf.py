"""CLI: any checkpoint (converted, training workdir or step, HF) -> a Hugging Face directory.

    python -m convert.flax_to_hf SRC OUT_HF_DIR [--hub-code]

OUT_HF_DIR gets config.json and model.safetensors in the `stanfordnlp/backpack-gpt2` layout, the
PyTorch model code that `AutoModelForCausalLM.from_pretrained(OUT_HF_DIR,
trust_remote_code=True)` runs, GPT-2's tokenizer files and a model card (README.md), which says
how the model was trained when SRC is a training workdir or step.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from backpack_jax import checkpoint, model
from convert.export import HUB_CODE_REPO, save_hf


def _is_training_run(src: pathlib.Path) -> bool:
    return bool(checkpoint.step_dirs(src)) or (src.parent.parent / "train_config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.flax_to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="converted model dir, training workdir, step dir or HF dir")
    parser.add_argument("out", help="new directory for the Hugging Face export")
    parser.add_argument("--hub-code", action="store_true",
                        help=f"point auto_map at the authors' code on the Hub ({HUB_CODE_REPO}) "
                             f"instead of copying ours in (loading then needs the network)")
    args = parser.parse_args(argv)
    try:
        params, config = checkpoint.load(args.src)
        src = pathlib.Path(args.src).expanduser().absolute()
        save_hf(params, config, args.out, hub_code=args.hub_code,
                trained_in=src if _is_training_run(src) else None)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ConversionError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {model.count_params(params):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
