"""Held-out loss and perplexity, during training and for any checkpoint from the command line.

    python -m train.eval --checkpoint PATH [--data NAME] [--batches N] [--json OUT]

PATH is anything `backpack_jax.checkpoint.load` accepts: a training workdir or step, a converted
model, or a Hugging Face directory. The command prints a table in the format of the experiment
commands (`backpack_jax.evals`), with the paper's OpenWebText perplexity of Backpack-Small
beside ours for a backpack-gpt2-shaped model (paper Table 2), and writes its numbers to --json.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm import tqdm

from backpack_jax import checkpoint, cli, model
from train import data, sharding
from train.step import Batch, global_batch, make_eval_step, make_model

# Paper Table 2: Backpack-Small's perplexity on OpenWebText's held-out split.
PAPER_OWT_PERPLEXITY = 20.1


def heldout_loss(eval_step: Callable[[model.Params, Batch], jax.Array], params: model.Params,
                 mesh: Mesh, name: str | None, *, seq_len: int, batch_size: int,
                 max_batches: int | None, data_dir: str | None = None,
                 progress: bool = False) -> tuple[float, int]:
    """(mean next-token loss, batches used) over the first `max_batches` held-out batches.

    The batches are the split in order, so every evaluation sees the same tokens.
    """
    batches = data.make_eval_batches(name, data.HELDOUT, seq_len=seq_len, batch_size=batch_size,
                                     data_dir=data_dir, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    total = None
    n = min(batches.num_batches, max_batches or batches.num_batches)
    for local in tqdm(itertools.islice(batches, n), total=n, desc="held-out", unit="batch",
                      disable=not progress or jax.process_index() != 0, leave=False):
        loss = eval_step(params, global_batch(local, mesh, batch_size))
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError(f"the {data.HELDOUT!r} split of {name or data.DEFAULT_NAME!r} has no "
                         f"whole batch of {batch_size} x {seq_len + 1} tokens")
    return float(total) / n, n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the command; returns what --json writes."""
    p = cli.parser("train.eval", __doc__)
    p.add_argument("--data", default=None,
                   help="dataset name (default: the embedded Python-docs corpus)")
    p.add_argument("--data_dir", default=None, help="TFDS data directory")
    p.add_argument("--batches", type=int, default=None,
                   help="evaluate at most this many batches (default: the whole split)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq_len", type=int, default=None,
                   help="tokens per sequence (default: min(512, n_positions))")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype; logits and the loss are float32 either way")
    return cli.run(p, argv, _evaluate)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.batches is not None and args.batches < 1:
        raise ValueError(f"--batches must be positive, got {args.batches}")
    params, model_cfg = checkpoint.load(args.checkpoint)
    seq_len = args.seq_len or min(512, model_cfg.n_positions)
    if not 0 < seq_len <= model_cfg.n_positions:
        raise ValueError(f"--seq_len={seq_len} must be in [1, n_positions="
                         f"{model_cfg.n_positions}]")
    mesh = sharding.make_mesh((-1, 1, 1))
    if args.batch_size % sharding.batch_devices(mesh):
        raise ValueError(f"--batch_size={args.batch_size} must be divisible by the "
                         f"{sharding.batch_devices(mesh)} devices")
    params_shardings = sharding.tree_shardings(params, mesh)
    params = jax.device_put(params, params_shardings)
    eval_step = make_eval_step(make_model(model_cfg, args.dtype), 1, mesh, params_shardings)
    loss, n = heldout_loss(eval_step, params, mesh, args.data, seq_len=seq_len,
                           batch_size=args.batch_size, max_batches=args.batches,
                           data_dir=args.data_dir, progress=True)
    name = args.data or data.DEFAULT_NAME
    table = cli.Table(f"held-out perplexity: split {data.HELDOUT!r} of {name!r}, {n} batches "
                      f"of {args.batch_size} x {seq_len} tokens",
                      ["loss (nats/token)", "perplexity"], digits=4)
    table.add(args.checkpoint, [loss, math.exp(loss)])
    if cli.is_backpack_gpt2(model_cfg):
        table.add("paper: Backpack-Small, OpenWebText", [None, PAPER_OWT_PERPLEXITY])
    print(table.format())
    return {"checkpoint": args.checkpoint, "data": name, "split": data.HELDOUT, "batches": n,
            "batch_size": args.batch_size, "seq_len": seq_len, "loss": loss,
            "perplexity": math.exp(loss), "table": table.to_json()}


if __name__ == "__main__":
    main()
