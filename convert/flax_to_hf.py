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

from backpack_jax import checkpoint, cli, model
from convert.export import HUB_CODE_REPO, save_hf


def _is_training_run(src: pathlib.Path) -> bool:
    return bool(checkpoint.step_dirs(src)) or (src.parent.parent / "train_config.json").is_file()


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("convert.flax_to_hf", __doc__, checkpoint=False, json=False)
    p.add_argument("src", help=cli.CHECKPOINT_HELP)
    p.add_argument("out", help="new directory for the Hugging Face export")
    p.add_argument("--hub-code", action="store_true",
                   help=f"point auto_map at the authors' code on the Hub ({HUB_CODE_REPO}) "
                        f"instead of copying ours in (loading then needs the network)")
    p.add_argument("--sense_edit", metavar="PATH",
                   help="a learned sense edit (sense_delta.safetensors from "
                        "backpack_jax.evals.canonical) for the exported model to apply")
    cli.run(p, argv, _convert)


def _convert(args: argparse.Namespace) -> None:
    params, config = checkpoint.load(args.src)  # A ConversionError is a ValueError: one line.
    src = pathlib.Path(args.src).expanduser().absolute()
    save_hf(params, config, args.out, hub_code=args.hub_code,
            trained_in=src if _is_training_run(src) else None, sense_edit=args.sense_edit)
    print(f"wrote {args.out}: {model.count_params(params):,} parameters")


if __name__ == "__main__":
    main()
