"""Reading Backpack sense vectors and their weights: the paper's interpretability tools.

- `word_senses`: the K sense vectors [K, D] of a word (a multi-token word needs an explicit
  `subword="first"|"mean"`, the paper's two conventions).
- `project_senses`: the words each sense promotes / suppresses most, ranked by E @ sense.
- `contextualization`: the weights alpha [B, K, S, S] the model puts on each (sense, position).
- `run_with_contextualization`: logits under a given alpha (HF's
  `run_with_custom_contextualization`).

Editing senses is `backpack_jax.interventions`; the paper's topic control is `backpack_jax.topic`.

    python -m backpack_jax.senses --checkpoint PATH --word nurse --top 10
    python -m backpack_jax.senses --checkpoint PATH --text "The nurse said" --plot alpha.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax import atomic, checkpoint, checks, cli, model
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer, word_ids

SUBWORD_CHOICES = ("first", "mean")


# ----------------------------------------------------------------------------- reading senses

@dataclasses.dataclass(frozen=True)
class WordSenses:
    word: str
    token_ids: list[int]  # how the word was tokenized
    pieces: list[str]  # the text of each token
    senses_KxD: jax.Array  # of the single token, or of the chosen subword rule


def word_senses(params: Params, config: BackpackConfig, word: str, tokenizer: Any, *,
                subword: str | None = None, leading_space: bool = True) -> WordSenses:
    """The sense vectors [K, D] of `word`.

    A word of several tokens has no single sense vector; `subword="first"` takes the first
    token's senses and `subword="mean"` averages them over its tokens. Without either, it is an
    error that lists the tokens.
    """
    if subword is not None and subword not in SUBWORD_CHOICES:
        raise ValueError(f"subword must be one of {SUBWORD_CHOICES} or None, got {subword!r}")
    ids = word_ids(word, tokenizer, leading_space)
    pieces = [tokenizer.decode([i]) for i in ids]
    if len(ids) > 1 and subword is None:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens: {pieces} (ids {ids}); choose how to combine their "
            f"senses with subword='first' or subword='mean' (CLI: --subword first|mean)")
    senses_CxKxD = model.sense_vectors(params, config, ids)
    senses = senses_CxKxD[0] if subword in (None, "first") else senses_CxKxD.mean(axis=0)
    return WordSenses(word=word, token_ids=ids, pieces=pieces, senses_KxD=senses)


@dataclasses.dataclass(frozen=True)
class SenseProjection:
    """For each sense, the words its projection E @ sense ranks highest and lowest."""

    promoted_ids_KxW: np.ndarray
    promoted_logits_KxW: np.ndarray
    suppressed_ids_KxW: np.ndarray  # most negative first
    suppressed_logits_KxW: np.ndarray


@functools.partial(jax.jit, static_argnames=("top", "vocab_limit"))
def _project(embedding_VxD, senses_KxD, *, top, vocab_limit):
    logits_KxV = jnp.einsum("kd,vd->kv", senses_KxD, embedding_VxD[:vocab_limit],
                            precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(logits_KxV, top), jax.lax.top_k(-logits_KxV, top)


def project_senses(params: Params, senses_KxD: jax.Array, *, top: int = 10,
                   vocab_limit: int | None = None) -> SenseProjection:
    """Ranks the vocabulary (ids below `vocab_limit`, e.g. the tokenizer's size, so that the
    model's never-trained padding rows are left out) by E @ sense for each sense."""
    embedding_VxD = model.embedding_VxD(params)
    vocab = embedding_VxD.shape[0]
    vocab_limit = vocab if vocab_limit is None else min(vocab_limit, vocab)
    if not 1 <= top <= vocab_limit:
        raise ValueError(f"top must be in [1, {vocab_limit}], got {top}")
    (hi, hi_ids), (lo, lo_ids) = _project(embedding_VxD, jnp.asarray(senses_KxD),
                                          top=top, vocab_limit=vocab_limit)
    return SenseProjection(np.asarray(hi_ids), np.asarray(hi), np.asarray(lo_ids),
                           -np.asarray(lo))


def show_token(tokenizer: Any, token: int) -> str:
    text = tokenizer.decode([int(token)]) if token < tokenizer.n_vocab else f"<|{token}|>"
    return text.strip() or repr(text)


def sense_rows(projection: SenseProjection, tokenizer: Any,
               senses: Sequence[int] | None = None) -> list[list[str]]:
    """One row per sense: its index, the words it promotes most, and those it suppresses most."""
    K = projection.promoted_ids_KxW.shape[0]
    return [[str(k), ", ".join(show_token(tokenizer, t) for t in projection.promoted_ids_KxW[k]),
             ", ".join(show_token(tokenizer, t) for t in projection.suppressed_ids_KxW[k])]
            for k in (range(K) if senses is None else senses)]


def format_sense_table(projection: SenseProjection, tokenizer: Any,
                       senses: Sequence[int] | None = None) -> str:
    """`sense_rows` as a text table under a header."""
    rows = [["sense", "promotes (highest E @ sense first)", "suppresses (lowest first)"],
            *sense_rows(projection, tokenizer, senses)]
    widths = [max(len(r[c]) for r in rows) for c in range(2)]
    lines = [f"{r[0]:>{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------- contextualization

def _as_batch(token_ids: Any) -> jax.Array:
    ids = np.asarray(token_ids, dtype=np.int32)
    return jnp.asarray(ids[None] if ids.ndim == 1 else ids)


def contextualization(params: Params, config: BackpackConfig, token_ids: Any, *,
                      sense_edit: Any = None) -> np.ndarray:
    """alpha [B, K, S, S] of token ids [S] or [B, S]: alpha[b, k, i, j] is how much position i's
    prediction uses sense k of the token at position j (each row sums to 1 over j <= i)."""
    out = model.apply(params, _as_batch(token_ids), config, return_contextualization=True,
                      sense_edit=sense_edit)
    return np.array(out.contextualization)  # a writable copy (to edit, then run_with_...)


def run_with_contextualization(params: Params, config: BackpackConfig, token_ids: Any,
                               alpha_BxKxSxS: Any, *, sense_edit: Any = None) -> jax.Array:
    """Logits [B, S, V] with the given contextualization weights in place of the model's (the
    HF model's `run_with_custom_contextualization`); e.g. edit `contextualization(...)`'s output
    to silence one sense or one source position."""
    return model.apply(params, _as_batch(token_ids), config, sense_edit=sense_edit,
                       contextualization=jnp.asarray(alpha_BxKxSxS, jnp.float32)).logits


def plot_contextualization(alpha_KxSxS: np.ndarray, labels: Sequence[str], senses: Sequence[int],
                           path: str) -> None:
    """Saves one heatmap per chosen sense: rows are predicting positions, columns the source
    tokens whose sense vectors they weight."""
    plt = atomic.pyplot()
    S = len(labels)
    cols = min(4, len(senses))
    rows = -(-len(senses) // cols)
    side = max(3.0, 0.3 * S + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(senses):]:
        ax.axis("off")
    for i, (ax, k) in enumerate(zip(axes.flat, senses, strict=False)):
        image = ax.imshow(alpha_KxSxS[k], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"sense {k}")
        ax.set_xticks(range(S), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(S), labels, fontsize=8)
        if i // cols == rows - 1 or i + cols >= len(senses):
            ax.set_xlabel("source token")
        if i % cols == 0:
            ax.set_ylabel("predicting at")
    fig.colorbar(image, ax=axes, shrink=0.8, label="alpha")
    atomic.save_figure(fig, path)


# ---------------------------------------------------------------------------------- CLI

def _parse_senses(text: str, config: BackpackConfig) -> list[int]:
    try:
        senses = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--senses must be comma-separated integers, got {text!r}") from None
    return [checks.check_sense(config, s) for s in senses]


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    p = cli.parser("backpack_jax.senses",
                   "Inspect a Backpack's sense vectors and contextualization weights.")
    p.add_argument("--word", help="print what each of this word's senses promotes")
    p.add_argument("--top", type=int, default=10, help="words per sense and direction")
    p.add_argument("--subword", choices=SUBWORD_CHOICES,
                   help="for a word of several tokens: use the first token's senses or their mean")
    p.add_argument("--no_leading_space", action="store_true",
                   help="tokenize the word as given instead of as ' word'")
    p.add_argument("--text", help="text whose contextualization weights to plot")
    p.add_argument("--plot", help="PNG path for the heatmaps of --text")
    p.add_argument("--senses", help="comma-separated sense indices (default: all)")

    def body(args: argparse.Namespace) -> dict[str, Any]:
        if not args.word and not args.text:
            p.error("give --word (sense table) and/or --text with --plot (heatmaps)")
        if args.text and not args.plot:
            p.error("--text needs --plot PATH.png to write the heatmaps to")
        params, config = checkpoint.load(args.checkpoint)
        tokenizer = get_tokenizer()
        senses = (list(range(config.num_senses)) if args.senses is None
                  else _parse_senses(args.senses, config))
        result: dict[str, Any] = {"senses": senses}
        if args.word:
            word = word_senses(params, config, args.word, tokenizer, subword=args.subword,
                               leading_space=not args.no_leading_space)
            how = "" if len(word.token_ids) == 1 else f" ({args.subword} of its tokens)"
            print(f"{word.word!r} = tokens {word.pieces} {word.token_ids}{how}")
            projection = project_senses(params, word.senses_KxD, top=args.top,
                                        vocab_limit=tokenizer.n_vocab)
            print(format_sense_table(projection, tokenizer, senses))
            result["word"] = {"text": word.word, "token_ids": word.token_ids, "rows": {
                int(k): {"promotes": projection.promoted_ids_KxW[k].tolist(),
                         "suppresses": projection.suppressed_ids_KxW[k].tolist()}
                for k in senses}}
        if args.text:
            ids = tokenizer.encode(args.text)
            if not ids:
                raise ValueError("--text is empty")
            alpha = contextualization(params, config, ids)[0]
            plot_contextualization(alpha, [tokenizer.decode([i]) for i in ids], senses,
                                   args.plot)
            print(f"wrote contextualization heatmaps of senses {senses} to {args.plot}")
        return result

    return cli.run(p, argv, body)


if __name__ == "__main__":
    main()
