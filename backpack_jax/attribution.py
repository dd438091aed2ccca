"""Exact per-word, per-sense attribution of a Backpack's prediction.

There is no bias and no nonlinearity after the weighted sum of senses, so each logit splits
exactly into one term per (context position j, sense l):

    logit_i[y] = sum_j sum_l alpha[l, i, j] * (E C(x_j)_l)[y]

`attribute` returns those terms [S, K] for one position i and target y; they add up to the
model's logit to float32 precision. A Transformer has no such account.

    python -m backpack_jax.attribution --checkpoint PATH --text "The nurse said that" \
        [--position -1] [--target " she"] [--top 10] [--plot grid.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from backpack_jax import atomic, checkpoint, checks, cli, model
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import check_edit
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer, single_token


@dataclasses.dataclass(frozen=True)
class Attribution:
    """The terms of `logit` (the model's logit of `target` at `position`) per context position
    j <= position and sense l: `contributions_SxK.sum()` equals `logit`."""

    token_ids: list[int]  # the context, positions 0..position
    position: int
    target: int
    logit: float  # the model's own logit (from model.apply)
    contributions_SxK: np.ndarray  # float64


def check_position(position: int, S: int) -> int:
    """`position` of a text of S tokens as an index in [0, S) (negative counts from the end)."""
    if not -S <= position < S:
        raise ValueError(f"position {position} is outside the text's {S} tokens "
                         f"(valid: {-S}..{S - 1})")
    return position % S


def attribute(params: Params, config: BackpackConfig, token_ids: Sequence[int], position: int,
              target: int | None = None, *, sense_edit: Any = None) -> Attribution:
    """Splits the logit of `target` (default: the model's top token) at `position` (negative
    counts from the end) into its per-position, per-sense terms. Any `sense_edit` that only
    rewrites sense vectors is allowed (an intervention, a `SenseTable`); one that reweights
    alpha (`topic.TopicControl`) is not, since the alpha the model returns is the unweighted
    one."""
    check_edit(sense_edit)
    if sense_edit is not None and sense_edit.reweights:
        raise ValueError(f"attribution under an edit that reweights alpha "
                         f"({type(sense_edit).__name__}) is not supported")
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty")
    ids_1xS = np.asarray([ids], np.int32)
    checks.validate_token_ids(ids_1xS, config, "token_ids")
    i = check_position(position, len(ids))
    if target is not None:
        target = checks.check_token(config, target)
    out = model.apply(params, ids_1xS, config, return_contextualization=True,
                      return_senses=True, sense_edit=sense_edit)
    logits_V = np.asarray(out.logits[0, i])
    target = int(np.argmax(logits_V)) if target is None else target
    e_D = np.asarray(model.embedding_VxD(params)[target], np.float64)
    alpha_KxS = np.asarray(out.contextualization[0, :, i, :i + 1], np.float64)
    senses_KxSxD = np.asarray(out.senses[0, :, :i + 1], np.float64)
    contributions_SxK = (alpha_KxS * (senses_KxSxD @ e_D)).T
    return Attribution(ids[:i + 1], i, target, float(logits_V[target]), contributions_SxK)


def _show(tokenizer: Any, token: int) -> str:
    return repr(tokenizer.decode([int(token)]))


def top_terms(attribution: Attribution, top: int) -> list[tuple[int, int, float]]:
    """The `top` (position, sense, contribution) terms of largest magnitude, largest first."""
    flat = np.argsort(-np.abs(attribution.contributions_SxK), axis=None)[:top]
    positions, senses = np.unravel_index(flat, attribution.contributions_SxK.shape)
    return [(int(j), int(k), float(attribution.contributions_SxK[j, k]))
            for j, k in zip(positions, senses, strict=True)]


def format_attribution(attribution: Attribution, tokenizer: Any, top: int = 10) -> str:
    """The logit, how much of it the top terms explain, and those terms with words and senses."""
    a = attribution
    table = cli.Table(
        f"logit of {_show(tokenizer, a.target)} after position {a.position} "
        f"({_show(tokenizer, a.token_ids[-1])}): {a.logit:.4f} = sum of "
        f"{a.contributions_SxK.size} terms (sum {a.contributions_SxK.sum():.4f})",
        ["contribution"], digits=4)
    for j, k, value in top_terms(a, top):
        table.add(f"{_show(tokenizer, a.token_ids[j])} @ {j}, sense {k}", [value])
    return table.format()


def plot_attribution(attribution: Attribution, labels: Sequence[str], path: str) -> None:
    """A word x sense grid of the contributions, diverging around 0."""
    plt = atomic.pyplot()
    c_SxK = attribution.contributions_SxK
    S, K = c_SxK.shape
    limit = max(float(np.abs(c_SxK).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(0.45 * K + 2.5, 0.35 * S + 1.8), layout="constrained")
    image = ax.imshow(c_SxK, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(K), [str(k) for k in range(K)])
    ax.set_yticks(range(S), [f"{label} @ {j}" for j, label in enumerate(labels)], fontsize=8)
    ax.set_xlabel("sense")
    ax.set_ylabel("context word")
    ax.set_title(f"contributions to logit {attribution.logit:.3f}")
    fig.colorbar(image, ax=ax, label="alpha * (E C)[target]")
    atomic.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.attribution",
                   "Which context words and senses make a Backpack's prediction: the exact terms "
                   "of one logit.")
    p.add_argument("--text", required=True, help="the context")
    p.add_argument("--position", type=int, default=-1,
                   help="the predicting position (token index; negative counts from the end)")
    p.add_argument("--target", help="the next word whose logit to split, one token as "
                                    "written (e.g. ' she'); default: the model's top token")
    p.add_argument("--top", type=int, default=10, help="terms to print")
    p.add_argument("--plot", metavar="PNG", help="write the word x sense grid here")

    def body(args: argparse.Namespace) -> dict[str, Any]:
        if args.top < 1:
            raise ValueError(f"--top must be >= 1, got {args.top}")
        params, config = checkpoint.load(args.checkpoint)
        tokenizer = get_tokenizer()
        ids = tokenizer.encode(args.text)
        target = (None if args.target is None else
                  single_token(args.target, tokenizer, "--target", leading_space=False))
        a = attribute(params, config, ids, args.position, target)
        print(format_attribution(a, tokenizer, args.top))
        if args.plot:
            plot_attribution(a, [tokenizer.decode([t]) for t in a.token_ids], args.plot)
            print(f"wrote {args.plot}")
        return {"token_ids": a.token_ids, "position": a.position, "target": a.target,
                "logit": a.logit, "contributions": a.contributions_SxK.tolist(),
                "top": [{"position": j, "sense": k, "contribution": v}
                        for j, k, v in top_terms(a, args.top)]}

    return cli.run(p, argv, body)


if __name__ == "__main__":
    main()
