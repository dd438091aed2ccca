"""Reading and editing Backpack sense vectors: the paper's interpretability and control tools.

- `word_senses`: the K sense vectors [K, D] of a word (a multi-token word needs an explicit
  `subword="first"|"mean"`, the paper's two conventions).
- `project_senses`: the words each sense promotes / suppresses most, ranked by E @ sense.
- `contextualization`: the weights alpha [B, K, S, S] the model puts on each (sense, position).
- `run_with_contextualization`: logits under a given alpha (HF's
  `run_with_custom_contextualization`).
- `SenseIntervention` (+ `scale_senses`, `replace_senses`, `compose`, `knowledge_edit`): a
  jit-friendly edit accepted as `sense_edit=` by `model.apply` and `generate.generate`.
- `softmax_topic_intervention`: a simple topic control that is not the paper's; the paper's
  (normalised scores, quantile groups, annealing) is `backpack_jax.topic`.

    python -m backpack_jax.senses --checkpoint PATH --word nurse --top 10
    python -m backpack_jax.senses --checkpoint PATH --text "The nurse said" --plot alpha.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from backpack_jax import checkpoint, cli, model
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import SenseEdit
from backpack_jax.model import BackpackLM, Params
from backpack_jax.tokenizer import get_tokenizer, word_ids

SUBWORD_CHOICES = ("first", "mean")


def embedding_VxD(params: Params) -> jax.Array:
    return params["backpack"]["gpt2_model"]["wte"]["embedding"]


def check_sense(config: BackpackConfig, sense: Any) -> int:
    """Returns `sense` as an int, or raises if it is not a sense index of this model."""
    if isinstance(sense, bool) or not isinstance(sense, (int, np.integer)) or not (
            0 <= sense < config.num_senses):
        raise ValueError(f"sense index {sense!r} is out of range: this model has "
                         f"num_senses={config.num_senses} (valid: 0..{config.num_senses - 1})")
    return int(sense)


def check_token(config: BackpackConfig, token: Any) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not (
            0 <= token < config.vocab_size):
        raise ValueError(f"token id {token!r} is outside [0, vocab_size={config.vocab_size})")
    return int(token)


# ----------------------------------------------------------------------------- reading senses

@functools.partial(jax.jit, static_argnames=("config",))
def senses_BxSxKxD(params: Params, ids_BxS: jax.Array, *, config: BackpackConfig) -> jax.Array:
    return BackpackLM(config).apply({"params": params}, ids_BxS, method="senses")


def sense_vectors(params: Params, config: BackpackConfig, token_ids: Sequence[int]
                  ) -> jax.Array:
    """Sense vectors [C, K, D] of C tokens (they depend on the token alone, not its context)."""
    ids_Cx1 = np.asarray(token_ids, dtype=np.int32).reshape(-1, 1)  # no n_positions limit
    model.validate_token_ids(ids_Cx1, config, what="token_ids")
    return senses_BxSxKxD(params, jnp.asarray(ids_Cx1), config=config)[:, 0]


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
    senses_CxKxD = sense_vectors(params, config, ids)
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
    vocab = embedding_VxD(params).shape[0]
    vocab_limit = vocab if vocab_limit is None else min(vocab_limit, vocab)
    if not 1 <= top <= vocab_limit:
        raise ValueError(f"top must be in [1, {vocab_limit}], got {top}")
    (hi, hi_ids), (lo, lo_ids) = _project(embedding_VxD(params), jnp.asarray(senses_KxD),
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- interventions

@flax.struct.dataclass
class SenseIntervention(SenseEdit):
    """Rewrites sense vectors by token: sense k of token v becomes
    scale_VxK[v, k] * (its replacement vector if (v, k) has one, else the original).

    A pytree of arrays, so it passes through jit as data: changing the numbers does not
    recompile (changing the number of replacements does). Build with `scale_senses`,
    `replace_senses`, `knowledge_edit`, `softmax_topic_intervention`; combine with `compose`.
    """

    scale_VxK: jax.Array  # ones = no change
    replace_token_R: jax.Array  # int32 [R]; (token, sense) pairs are unique
    replace_sense_R: jax.Array  # int32 [R]
    replace_vectors_RxD: jax.Array  # float32 [R, D]

    def edit(self, input_ids_BxS: jax.Array, senses_BxSxKxD: jax.Array) -> jax.Array:
        K = senses_BxSxKxD.shape[2]
        if self.replace_token_R.shape[0]:
            hit_BxSxKxR = ((input_ids_BxS[..., None, None] == self.replace_token_R)
                           & (jnp.arange(K)[:, None] == self.replace_sense_R))
            new_BxSxKxD = self.replace_vectors_RxD[jnp.argmax(hit_BxSxKxR, axis=-1)]
            senses_BxSxKxD = jnp.where(hit_BxSxKxR.any(-1)[..., None],
                                       new_BxSxKxD.astype(senses_BxSxKxD.dtype), senses_BxSxKxD)
        scale_BxSxK = self.scale_VxK[input_ids_BxS].astype(senses_BxSxKxD.dtype)
        return senses_BxSxKxD * scale_BxSxK[..., None]


def no_intervention(config: BackpackConfig) -> SenseIntervention:
    """The identity edit (all scales 1, no replacements)."""
    return SenseIntervention(scale_VxK=jnp.ones((config.vocab_size, config.num_senses)),
                             replace_token_R=jnp.zeros((0,), jnp.int32),
                             replace_sense_R=jnp.zeros((0,), jnp.int32),
                             replace_vectors_RxD=jnp.zeros((0, config.n_embd)))


def scale_senses(config: BackpackConfig, factors: Mapping[int, Mapping[int, float]]
                 ) -> SenseIntervention:
    """Multiplies sense k of token v by factors[v][k], e.g. {nurse_id: {10: 0.0}} removes
    sense 10 of " nurse" (the paper's gender-bias experiment scaled a profession's sense 10)."""
    scale_VxK = np.ones((config.vocab_size, config.num_senses), np.float32)
    for token, per_sense in factors.items():
        for sense, factor in per_sense.items():
            scale_VxK[check_token(config, token), check_sense(config, sense)] = factor
    return no_intervention(config).replace(scale_VxK=jnp.asarray(scale_VxK))


def replace_senses(config: BackpackConfig, vectors: Mapping[int, Mapping[int, Any]]
                   ) -> SenseIntervention:
    """Sets sense k of token v to vectors[v][k] (a [D] vector), wherever token v occurs."""
    pairs, rows = [], []
    for token, per_sense in vectors.items():
        for sense, vector in per_sense.items():
            vector = np.asarray(vector, np.float32)
            if vector.shape != (config.n_embd,):
                raise ValueError(f"replacement for token {token} sense {sense} has shape "
                                 f"{vector.shape}, expected ({config.n_embd},)")
            pairs.append((check_token(config, token), check_sense(config, sense)))
            rows.append(vector)
    return _with_replacements(no_intervention(config), pairs, rows)


def _with_replacements(base: SenseIntervention, pairs: list[tuple[int, int]],
                       rows: list[np.ndarray]) -> SenseIntervention:
    D = base.replace_vectors_RxD.shape[1]
    return base.replace(
        replace_token_R=jnp.asarray([t for t, _ in pairs], jnp.int32).reshape(-1),
        replace_sense_R=jnp.asarray([k for _, k in pairs], jnp.int32).reshape(-1),
        replace_vectors_RxD=jnp.asarray(np.asarray(rows, np.float32).reshape(-1, D)))


def compose(*edits: SenseIntervention) -> SenseIntervention:
    """One intervention doing all of `edits`: scales multiply; where several replace the same
    (token, sense), the last one wins; replacements happen before scaling."""
    if not edits:
        raise ValueError("compose needs at least one SenseIntervention")
    replaced: dict[tuple[int, int], np.ndarray] = {}
    scale_VxK = np.ones(edits[0].scale_VxK.shape, np.float32)
    for e in edits:
        if e.scale_VxK.shape != scale_VxK.shape:
            raise ValueError(f"cannot compose interventions for different models: scale tables "
                             f"{scale_VxK.shape} and {e.scale_VxK.shape}")
        scale_VxK *= np.asarray(e.scale_VxK)
        for t, k, v in zip(np.asarray(e.replace_token_R), np.asarray(e.replace_sense_R),
                           np.asarray(e.replace_vectors_RxD), strict=True):
            replaced[(int(t), int(k))] = v
    base = edits[0].replace(scale_VxK=jnp.asarray(scale_VxK))
    return _with_replacements(base, list(replaced), list(replaced.values()))


def knowledge_edit(params: Params, config: BackpackConfig, word_ids: Sequence[int],
                   remove_id: int, add_id: int) -> SenseIntervention:
    """The paper's knowledge edit (§6.3): make the word's tokens evoke `add_id` (" HP") where
    they evoked `remove_id` (" Apple"). With e_r, e_a their output embeddings, every sense of
    every token of the word loses its component along e_r and gains the same amount along e_a,
    rescaled for the two norms:

        C'_l = C_l + (C_l . e_r / |e_r|^2) (e_a |e_r|^2 / |e_a|^2 - e_r)

    Senses that did not point at e_r barely change. Returned as replacement sense vectors, so it
    composes with other edits and works in `model.apply` and in generation.
    """
    word = sorted({check_token(config, t) for t in word_ids})
    if not word:
        raise ValueError("word_ids is empty")
    remove_id, add_id = check_token(config, remove_id), check_token(config, add_id)
    if remove_id == add_id:
        raise ValueError(f"remove_id and add_id are the same token ({remove_id})")
    e_V = np.asarray(embedding_VxD(params), np.float64)
    e_r, e_a = e_V[remove_id], e_V[add_id]
    r2, a2 = e_r @ e_r, e_a @ e_a
    if r2 == 0 or a2 == 0:
        raise ValueError("the removed or added token has an all-zero embedding")
    senses_UxKxD = np.asarray(sense_vectors(params, config, word), np.float64)
    along_UxK = senses_UxKxD @ e_r / r2
    edited_UxKxD = senses_UxKxD + along_UxK[..., None] * (e_a * r2 / a2 - e_r)
    return replace_senses(config, {t: dict(enumerate(edited_UxKxD[u]))
                                   for u, t in enumerate(word)})


@functools.partial(jax.jit, static_argnames=("config", "vocab_limit"))
def _softmax_topic_scores_chunk(params, ids_C, topic_ids, *, config, vocab_limit):
    senses_CxKxD = BackpackLM(config).apply({"params": params}, ids_C[:, None],
                                            method="senses")[:, 0]
    logits_CxKxV = jnp.einsum("ckd,vd->ckv", senses_CxKxD, embedding_VxD(params)[:vocab_limit],
                              precision=jax.lax.Precision.HIGHEST)
    return (jax.nn.logsumexp(logits_CxKxV[..., topic_ids], axis=-1)
            - jax.nn.logsumexp(logits_CxKxV, axis=-1))


def softmax_topic_scores(params: Params, config: BackpackConfig, topic_ids: Sequence[int], *,
                         vocab_limit: int | None = None, chunk_size: int = 64,
                         progress: bool = True) -> np.ndarray:
    """score[v, k] for every token v < vocab_limit and sense k: the log of the probability mass
    that sense k of v, read on its own through the output embeddings, puts on the topic words,

        score[v, k] = log sum_{w in topic} softmax(E @ C(v)_k)[w]    (softmax over ids < limit)

    A sense scores high only if it promotes the topic words more than all other words, so
    upweighting it shifts the model's predictions towards the topic. Computed over the
    vocabulary in chunks (memory chunk x K x V floats); the work is V * K * V * D multiply-adds
    (3e13 for backpack-gpt2), hence the progress bar.

    Not the paper's score (`topic.topic_scores`: b . (E C) divided by the sense's largest
    logit): a softmax rewards a sense only for what it promotes relative to everything else.
    """
    V = config.vocab_size
    vocab_limit = V if vocab_limit is None else min(vocab_limit, V)
    topic = sorted({check_token(config, t) for t in topic_ids})
    if not topic:
        raise ValueError("topic_ids is empty")
    if topic[-1] >= vocab_limit:
        raise ValueError(f"topic token {topic[-1]} is not below vocab_limit={vocab_limit}")
    scores = np.empty((vocab_limit, config.num_senses), np.float32)
    for start in tqdm(range(0, vocab_limit, chunk_size), desc="scoring senses",
                      disable=not progress):
        ids_C = np.arange(start, start + chunk_size, dtype=np.int32) % vocab_limit  # wraps
        chunk = _softmax_topic_scores_chunk(params, jnp.asarray(ids_C), jnp.asarray(topic),
                                    config=config, vocab_limit=vocab_limit)
        scores[start:start + chunk_size] = np.asarray(chunk)[:min(chunk_size, vocab_limit - start)]
    return scores


@dataclasses.dataclass(frozen=True)
class TopicSenses:
    intervention: SenseIntervention
    pairs_Rx2: np.ndarray  # the upweighted (token, sense) pairs, best first
    scores_R: np.ndarray


def softmax_topic_intervention(params: Params, config: BackpackConfig,
                               topic_ids: Sequence[int], *, num_pairs: int = 1000,
                               factor: float = 3.0, vocab_limit: int | None = None,
                               chunk_size: int = 64, progress: bool = True) -> TopicSenses:
    """A simple topic control, an alternative to the paper's (`backpack_jax.topic`): upweight
    the sense vectors that most promote the topic.

    Rule: the `num_pairs` (token, sense) pairs with the highest `softmax_topic_scores` get scale
    `factor` (so wherever such a token occurs in the context, that sense contributes `factor`
    times as much); every other sense keeps scale 1, and the scales stay fixed while
    generating. The paper instead normalises b . (E C) by each sense's largest logit, weights
    four quantile groups of all V*K scores, and anneals the weights back to 1 as the topic
    appears (`topic.TopicControl`). The defaults here are a starting point, not tuned values.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    scores_VxK = softmax_topic_scores(params, config, topic_ids, vocab_limit=vocab_limit,
                                      chunk_size=chunk_size, progress=progress)
    flat = np.argsort(-scores_VxK, axis=None, kind="stable")[:num_pairs]
    tokens, senses = np.unravel_index(flat, scores_VxK.shape)
    scale_VxK = np.ones((config.vocab_size, config.num_senses), np.float32)
    scale_VxK[tokens, senses] = factor
    return TopicSenses(
        intervention=no_intervention(config).replace(scale_VxK=jnp.asarray(scale_VxK)),
        pairs_Rx2=np.stack([tokens, senses], axis=1), scores_R=scores_VxK[tokens, senses])


# ---------------------------------------------------------------------------------- CLI

def _parse_senses(text: str, config: BackpackConfig) -> list[int]:
    try:
        senses = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--senses must be comma-separated integers, got {text!r}") from None
    return [check_sense(config, s) for s in senses]


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
