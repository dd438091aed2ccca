"""Model editing with canonical examples (Hewitt et al. 2024, arXiv 2402.06155): sense
finetuning or full finetuning from a few examples, scored out of distribution under a degradation
budget, as the authors' released code does.

    python -m backpack_jax.evals.canonical --checkpoint ID_OR_DIR --train FILE --eval FILE \
        --background FILE [--method senses|full] [--loss good] [--threshold T] \
        [--league 1e-4] [--ensemble ID_OR_DIR] --out DIR [--json PATH]

Before training and after every epoch: the intervention score on `--eval` (mean loss, or the
failure rate with `--threshold`; lower is better) and the general loss on `--background`. A
league L keeps the epochs whose general loss stays below (1 + L) x the initial one; the released
code reports the last such epoch, and the best such epoch is reported beside it. The edit of the
`--league` epoch is written to OUT/sense_delta.safetensors (`sense_finetune.load_delta`).
`--ensemble` adds that edit to another causal LM: log p_other + w (log p_edited - log
p_unedited) over the shared vocabulary, w the largest of 1.0, 0.9, ... within the league.

- `leagues(stats, leagues)`: the league selection of a run's per-epoch stats.
- `ensemble_scorer(...)`: the ensemble's next-token losses, for `sense_finetune`'s evaluations.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax import atomic, checkpoint, cli, sense_finetune as sf
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import N_VOCAB, get_tokenizer

LEAGUES = (1e-3, 1e-4, 1e-5)  # the released code's (utils.LEAGUES)
SHOWN_PAIRS = 40  # selected senses printed; results.json has them all


def leagues(stats: Sequence[dict], budget: Sequence[float] = LEAGUES) -> dict[str, dict]:
    """Per league L: the last epoch (the released code's pick) and the best-scoring epoch whose
    general loss is below (1 + L) x the initial general loss (stats[0]); the initial model is
    always within, so each league has a pick."""
    initial = stats[0]["general"]
    out = {}
    for league in budget:
        within = [s for s in stats if s["general"] < initial * (1 + league)]
        if not within:  # only if the initial loss is <= 0
            raise ValueError(f"no epoch within league {league}: initial general loss {initial}")
        best = min(within, key=lambda s: s["intervention"])
        out[f"{league:g}"] = {"last": within[-1], "best": best}
    return out


# -------------------------------------------------------------------------------- ensemble

@functools.partial(jax.jit, static_argnames="config")
def _log_ratio_BxSxV(params: Params, ids_BxS: jax.Array, edit: sf.SenseDelta,
                     config: BackpackConfig) -> jax.Array:
    edited, plain = (jax.nn.log_softmax(sf.edited_logits(params, config, ids_BxS, e))
                     for e in (edit, None))
    return edited - plain


def load_other(id_or_dir: str) -> Any:
    """Any causal LM transformers loads (Hub id or directory), in float32, eval mode."""
    transformers = cli.require("transformers", "--ensemble")
    try:
        other = transformers.AutoModelForCausalLM.from_pretrained(id_or_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--ensemble {id_or_dir}: transformers cannot load it: "
                         f"{str(e).splitlines()[0]}") from e
    return other.float().eval()


def ensemble_scorer(other: Any, params: Params, config: BackpackConfig, edit: sf.SenseDelta,
                    weight: float) -> Callable:
    """`nll_fn(ids_BxS) -> nll_BxS` of log p_other + weight (log p_edited - log p_unedited),
    renormalised over the first min(V_other, V_backpack, 50257) token ids (the released code
    adds to the other model's logits, which renormalises the same way)."""
    import torch

    def nll(ids_BxS: np.ndarray) -> np.ndarray:
        ids_BxS = np.asarray(ids_BxS)
        with torch.no_grad():
            other_BxSxV = torch.log_softmax(
                other(torch.as_tensor(ids_BxS, dtype=torch.long)).logits.float(), -1).numpy()
        V = min(other_BxSxV.shape[-1], config.vocab_size, N_VOCAB)
        combined_BxSxV = other_BxSxV[..., :V].astype(np.float64)
        if weight:
            ratio = np.asarray(_log_ratio_BxSxV(params, jnp.asarray(ids_BxS), edit, config))
            combined_BxSxV = combined_BxSxV + weight * ratio[..., :V]
        return np.asarray(sf.next_token_nll(jnp.asarray(combined_BxSxV, jnp.float32),
                                            jnp.asarray(ids_BxS)))
    return nll


def ensemble(other: Any, params: Params, config: BackpackConfig, edit: sf.SenseDelta,
             evaluate: Callable[[Callable], dict], general: Callable[[Callable], float],
             league: float) -> dict[str, Any]:
    """The released code's ensemble run: `evaluate` the other model alone (w = 0); take the
    first w of 1.0, 0.9, ..., 0.1 whose `general` loss is below (1 + league) x the other
    model's (0 if none is); `evaluate` the ensemble with it."""
    initial = evaluate(ensemble_scorer(other, params, config, edit, 0.0))
    bound = initial["general"] * (1 + league)
    weight = next((w / 10 for w in range(10, 0, -1)
                   if general(ensemble_scorer(other, params, config, edit, w / 10)) < bound), 0.0)
    edited = evaluate(ensemble_scorer(other, params, config, edit, weight)) if weight else initial
    return {"initial": initial, "weight": weight, "edited": edited}


# -------------------------------------------------------------------------------- command

def _table(title: str, rows: dict[str, dict], columns: Sequence[str]) -> cli.Table:
    t = cli.Table(title, list(columns), digits=4)
    for name, row in rows.items():
        t.add(name, [row.get(c) for c in columns])
    return t


def _body(args: argparse.Namespace) -> dict[str, Any]:
    out = pathlib.Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out}: directory does not exist")
    if args.ensemble and args.method != "senses":
        raise ValueError("--ensemble needs --method senses (it adds the learned sense edit)")
    params, config = checkpoint.load(args.checkpoint)
    tok = get_tokenizer()
    train = sf.read_examples(args.train, tok, config)
    kind = "pair" if len(train[0].texts) == 2 else "suffix"
    evals = sf.read_examples(args.eval, tok, config, kind)
    background = sf.read_examples(args.background, tok, config, "text")[:args.background_limit]
    train_background = (sf.read_examples(args.train_background, tok, config, "text")
                        [:args.background_limit] if args.train_background else background)
    hard = sf.read_examples(args.hard_negative, tok, config, "suffix") if (
        args.hard_negative) else None
    targeted = sf.read_examples(args.targeted, tok, config, "text") if args.targeted else None
    settings = sf.Settings(loss=args.loss, epochs=args.epochs, lr=args.lr,
                           grad_acc_steps=args.grad_acc_steps, kl_weight=args.kl_weight,
                           seed=args.seed)

    def general(nll_fn: Callable) -> float:
        return sf.text_loss(nll_fn, background, config, args.batch_size)

    def evaluate(nll_fn: Callable) -> dict[str, float]:
        row = {"intervention": sf.intervention_score(nll_fn, evals, config, args.loss,
                                                     args.threshold, args.batch_size),
               "general": general(nll_fn)}
        if hard is not None:  # the released code's: mean summed suffix loss, no threshold
            row["hard_negative"] = sf.intervention_score(nll_fn, hard, config, "good", None,
                                                         args.batch_size)
        if targeted is not None:
            row["targeted"] = sf.text_loss(nll_fn, targeted, config, args.batch_size)
        return row

    result: dict[str, Any] = {"method": args.method, "settings": dataclasses.asdict(settings),
                              "train": args.train, "eval": args.eval,
                              "background": args.background, "threshold": args.threshold}
    selection = None
    if args.method == "senses":
        selection = sf.select_senses(params, config, train, train_background, loss=args.loss,
                                     per_example=args.senses_per_example, lam=args.lam)
        rows = selection.rows(tok)
        print(f"selected senses ({len(rows)} pairs from {len(train)} example(s)):")
        print(f"  {'token':>18} {'id':>6} {'sense':>5} {'score':>10}")
        for r in rows[:SHOWN_PAIRS]:
            print(f"  {r['text']!r:>18} {r['token']:>6} {r['sense']:>5} {r['score']:>10.4f}")
        if len(rows) > SHOWN_PAIRS:
            print(f"  ... and {len(rows) - SHOWN_PAIRS} more (all in results.json)")
        result["selection"] = rows
    stats, states = sf.finetune(params, config, train, settings, selection=selection,
                                background=train_background, evaluate=evaluate)
    picked = leagues(stats, sorted({*LEAGUES, args.league}, reverse=True))
    epochs = _table(f"{'sense' if selection else 'full'} finetuning, per epoch (lower is "
                    f"better)",
                    {("initial" if s["epoch"] == 0 else f"epoch {s['epoch']}"): s
                     for s in stats},
                    ["intervention", "general", *(["hard_negative"] if hard else []),
                     *(["targeted"] if targeted else []), "train_loss"])
    league_rows = {f"league {name}, {how}: epoch {row[how]['epoch']}": row[how]
                   for name, row in picked.items() for how in ("last", "best")}
    summary = _table("league selection (last: the released code's and the paper's pick)",
                     league_rows, ["intervention", "general"])
    print(epochs.format(), summary.format(), sep="\n\n")
    result |= {"epochs": stats, "leagues": picked}
    if selection is not None:
        chosen = picked[f"{args.league:g}"]["last"]["epoch"]
        delta = states[chosen]
        edit = sf.sense_delta(config, selection.pairs, None if delta is None else delta)
        sf.save_delta(out / "sense_delta.safetensors", edit, config)
        print(f"wrote {out / 'sense_delta.safetensors'} (epoch {chosen}, league {args.league:g})")
        result["delta_epoch"] = chosen
        if args.ensemble:
            other = load_other(args.ensemble)
            ens = ensemble(other, params, config, edit, evaluate, general, args.league)
            print(_table(f"ensemble with {args.ensemble} (weight {ens['weight']:.1f})",
                         {"alone": ens["initial"], "with the edit": ens["edited"]},
                         ["intervention", "general"]).format())
            result["ensemble"] = {"model": args.ensemble, **ens}
    atomic.write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.evals.canonical",
                   "Edit a Backpack from canonical examples (sense or full finetuning) and score "
                   "it out of distribution under a degradation budget (Hewitt et al. 2024).")
    p.add_argument("--train", required=True, help="canonical examples (JSONL: prefix + suffix, "
                                                  "or prefix + suffix1 + suffix2)")
    p.add_argument("--eval", required=True, help="evaluation examples, same schema")
    p.add_argument("--background", required=True,
                   help="general text (JSONL: text) for the degradation budget")
    p.add_argument("--train_background", help="general text for the selection and the KL "
                                              "term (default: --background)")
    p.add_argument("--background_limit", type=int, default=None,
                   help="use only the first N background texts")
    p.add_argument("--hard_negative", metavar="FILE",
                   help="also score these prefix/suffix lines (the authors' *hard_neg* files: "
                        "mean suffix loss, lower is better)")
    p.add_argument("--targeted", metavar="FILE",
                   help="also score these texts (the authors' *_unconditional-* files: the "
                        "canonical statements as plain text, mean token loss)")
    p.add_argument("--out", required=True, help="directory for results.json and the edit")
    p.add_argument("--method", choices=("senses", "full"), default="senses")
    p.add_argument("--loss", choices=sf.LOSSES, default="good")
    p.add_argument("--threshold", type=float, default=None,
                   help="score the failure rate (per-example score > T) instead of the mean")
    p.add_argument("--senses_per_example", type=int, default=10)
    p.add_argument("--lambda", dest="lam", type=float, default=1000.0,
                   help="weight of the background alpha mass in the selection")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad_acc_steps", type=int, default=5)
    p.add_argument("--kl_weight", type=float, default=0.0,
                   help="weight of KL(original || tuned) on background text (the authors "
                        "sampled 0.1 to 1)")
    p.add_argument("--league", type=float, default=1e-4,
                   help="the budget whose epoch's edit is saved and ensembled")
    p.add_argument("--ensemble", metavar="ID_OR_DIR",
                   help="also score this causal LM plus the edit's log-prob change")
    p.add_argument("--batch_size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--seed", type=int, default=0)
    return cli.run(p, argv, _body)


if __name__ == "__main__":
    main()
