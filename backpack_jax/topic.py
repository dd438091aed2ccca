"""Topic control as the paper does it (Hewitt et al., ACL 2023, §6.1, Appendix D.1, Table 12).

1. **Score** every sense vector C(x)_l of the vocabulary against a topic's bag of words b (a 0/1
   vector over the vocabulary):

       s(x, l) = b . (E C(x)_l) / max_u (E C(x)_l)[u]

   a dot product normalised by the sense's largest logit, not a softmax. The denominators [V, K]
   do not depend on the topic: `sense_max_logits` computes them once (V*K*V*D multiply-adds,
   3.1e13 for backpack-gpt2, in chunked matmuls with a progress bar). The numerators are cheap:
   b . (E C) = (sum of b's rows of E) . C.
2. **Group** (`sense_weights`): the 0.95, 0.80 and 0.60 quantiles of all V*K scores split the
   senses into four groups, which get the initial weights delta of a strength (Table 11), highest
   group first: 1: 1.5, 1.5, 1.3, 1; 2: 2.2, 2.2, 1.5, 1; 3: 3.3, 3.3, 3, 1 (0 leaves all at 1).
3. **Weight and anneal** (`TopicControl`): o_i = sum_j sum_l alpha[l,i,j] delta'[l,i,j] C(x_j)_l.
   delta is annealed back to 1 as the topic appears in the text, as the authors' code computes it
   (the printed equations 18-20 garble this step): for sense l of the token at position j
   (counted from the text's first real token),

       a[l,i,j] = sum over the tokens m <= i of the text of max((E C(x_j)_l)[x_m], 0)
       w = sigmoid(6 - f a) (1 + j / 100),    delta' = w delta + (1 - w)

   with f = (largest delta of the strength) / 7.5: the authors' test_topic.py passes
   `annealing_scale=max(modifiers)/7.5` and their mask_annealing computes
   `sigmoid(-annealing_scale * sims + 6)`. `TopicControl.fixed` is the non-annealed variant: a
   plain `SenseIntervention` scaling sense l of token x by delta[x, l].

`TopicControl` is a sense edit (`sense_edit=` of `model.apply` and `generate.generate`) that
rescales alpha through the model's `reweight` hook. In generation the annealing runs per step on
the device inside the cached decode: the cache keeps the ids so far and a, and each step adds
only the new token's terms (no recomputation of the prefix); a full pass of `model.apply`
computes the same a from the whole sequence.

`cached_max_logits` keeps the denominators in a file, checked against the parameters when read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from backpack_jax import atomic, batching, checks, interventions, model
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import ReweightInputs, SenseEdit
from backpack_jax.interventions import SenseIntervention
from backpack_jax.model import Params
from backpack_jax.tokenizer import single_token

# Table 10: each topic's bag of words, in the paper's (and the classifier's array) order.
TOPICS: dict[str, tuple[str, ...]] = {
    "arts_culture": ("arts", "culture"),
    "business_entrepreneurs": ("business", "entrepreneurs"),
    "celebrity_pop_culture": ("celebrity", "pop", "culture"),
    "diaries_daily_life": ("diaries", "daily", "life"),
    "family": ("family",),
    "fashion_style": ("fashion", "style"),
    "film_tv_video": ("film", "tv", "video"),
    "fitness_health": ("fitness", "health"),
    "food_dining": ("food", "dining"),
    "gaming": ("gaming",),
    "music": ("music",),
    "news_social_concern": ("news", "social", "concern"),
    "other_hobbies": ("hobbies",),
    "relationships": ("relationships",),
    "sports": ("sports",),
    "travel_adventure": ("travel", "adventure"),
    "youth_student_life": ("youth", "student", "life"),
}
# Table 11: the initial weight of each quantile group (highest scores first) per strength.
STRENGTHS: dict[int, tuple[float, float, float, float]] = {
    0: (1.0, 1.0, 1.0, 1.0), 1: (1.5, 1.5, 1.3, 1.0), 2: (2.2, 2.2, 1.5, 1.0),
    3: (3.3, 3.3, 3.0, 1.0)}
QUANTILES = (0.95, 0.80, 0.60)  # the group boundaries, highest first
ANNEAL_OFFSET = 6.0  # w = sigmoid(ANNEAL_OFFSET - f a) ...
ANNEAL_DIVISOR = 7.5  # ... with f = max(delta) / ANNEAL_DIVISOR
POSITION_SCALE = 100.0  # ... times (1 + j / POSITION_SCALE)
# Rows of one scoring matmul (tokens x senses): XLA:CPU reached its GEMM rate from 1024 to 2048.
SCORE_ROWS = 2048
CACHE_CHECK_ROWS = 3  # rows of a cached `sense_max_logits` recomputed to check its weights


def bag_token_ids(words: Sequence[str], tokenizer: Any) -> tuple[list[int], dict[str, str]]:
    """The token ids of " word" for each word that is one token, and why each other word was
    skipped (a bag of words is a set of vocabulary entries, and " diaries" is " di" + "aries")."""
    ids, skipped = [], {}
    for word in words:
        try:
            ids.append(single_token(word, tokenizer, "a word of a topic's bag"))
        except ValueError as e:
            skipped[word] = str(e)
    if not ids:
        raise ValueError(f"no word of the bag {list(words)} is a single token with its leading "
                         "space, so the bag is empty")
    return sorted(set(ids)), skipped


# ------------------------------------------------------------------------------------- scores

@functools.partial(jax.jit, static_argnames=("config", "with_max"))
def _score_chunk(params, ids_C, bags_ZxD, *, config, with_max):
    """For C tokens: each of the Z bags' logit sum b . (E C(x)_l) [Z, C, K], and
    max_u (E C(x)_l)[u] [C, K]."""
    senses_CxKxD = model.sense_network(params, ids_C[None], config)[0]
    bags_ZxCxK = jnp.einsum("zd,ckd->zck", bags_ZxD, senses_CxKxD,
                            precision=jax.lax.Precision.HIGHEST)
    if not with_max:
        return bags_ZxCxK, None
    C, K, D = senses_CxKxD.shape
    # E @ senses^T rather than senses @ E^T: XLA:CPU runs this orientation at its GEMM rate.
    logits_VxCK = model.embedding_VxD(params) @ senses_CxKxD.reshape(C * K, D).T
    return bags_ZxCxK, logits_VxCK.max(axis=0).reshape(C, K)


def _vocabulary_pass(params: Params, config: BackpackConfig, bags_ZxD: np.ndarray,
                     with_max: bool, start: int, stop: int, progress: bool, desc: str
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Runs `_score_chunk` over the tokens [start, stop), SCORE_ROWS / K tokens at a time
    (`batching.windows`): ([Z, stop - start, K], [stop - start, K] or None)."""
    n, K = stop - start, config.num_senses
    bags_ZxVxK = np.empty((len(bags_ZxD), n, K), np.float32)
    max_VxK = np.empty((n, K), np.float32) if with_max else None
    with tqdm(total=n, desc=desc, unit="token", disable=not progress) as bar:
        for w in batching.windows(n, max(1, SCORE_ROWS // K)):
            ids_C = jnp.arange(start + w.start, start + w.stop, dtype=jnp.int32)
            bags_ZxCxK, max_CxK = _score_chunk(params, ids_C, jnp.asarray(bags_ZxD, jnp.float32),
                                               config=config, with_max=with_max)
            bags_ZxVxK[:, w.start:w.stop] = np.asarray(bags_ZxCxK)  # waits: the bar shows work
            if with_max:
                max_VxK[w.start:w.stop] = np.asarray(max_CxK)
            bar.update(w.stop - w.start - w.new)
    return bags_ZxVxK, max_VxK


def _check_range(config: BackpackConfig, start: int, stop: int | None) -> int:
    stop = config.vocab_size if stop is None else stop
    if not 0 <= start < stop <= config.vocab_size:
        raise ValueError(f"token range [{start}, {stop}) is empty or outside the vocabulary "
                         f"[0, {config.vocab_size})")
    return stop


def sense_max_logits(params: Params, config: BackpackConfig, *, start: int = 0,
                     stop: int | None = None, progress: bool = True) -> np.ndarray:
    """max_u (E C(x)_l)[u], the largest logit of each sense vector over the whole vocabulary,
    for the tokens x in [start, stop) (default all): [stop - start, K] float32.

    The scores' denominators, the same for every topic: compute them once and keep them (the
    topic command's --score_cache). Chunked matmuls on the default device.
    """
    stop = _check_range(config, start, stop)
    no_bags = np.zeros((0, config.n_embd), np.float32)
    return _vocabulary_pass(params, config, no_bags, True, start, stop, progress,
                            "sense max logits")[1]


def cached_max_logits(params: Params, config: BackpackConfig, path: str | os.PathLike | None,
                      *, progress: bool = True) -> np.ndarray:
    """`sense_max_logits` of the whole vocabulary: read from `path` when it holds them for
    these weights, else computed (and written to `path`, atomically, when given).

    A cached table must have this model's shape [V, K], be finite, and agree with a few rows
    recomputed from the parameters, so that a table from other weights is caught.
    """
    V, K = config.vocab_size, config.num_senses
    if path is None or not os.path.exists(path):
        max_VxK = sense_max_logits(params, config, progress=progress)
        if path is not None:
            with atomic.atomic_path(path) as tmp:
                np.save(tmp, max_VxK)
            print(f"wrote the sense max logits to {path}")
        return max_VxK
    try:
        max_VxK = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"score cache {path} is not a readable .npy file: {e}") from None
    if max_VxK.shape != (V, K) or max_VxK.dtype != np.float32:
        raise ValueError(f"score cache {path} holds a {max_VxK.dtype} array of shape "
                         f"{max_VxK.shape}; this model needs float32 {(V, K)} (vocab_size, "
                         "num_senses): delete it or name another file")
    if not np.isfinite(max_VxK).all():
        raise ValueError(f"score cache {path} holds non-finite values")
    for v in np.linspace(0, V - 1, CACHE_CHECK_ROWS).astype(int):
        row_K = sense_max_logits(params, config, start=int(v), stop=int(v) + 1,
                                 progress=False)[0]
        if not np.allclose(row_K, max_VxK[v], rtol=1e-3, atol=1e-5):
            raise ValueError(f"score cache {path} was computed for other weights: token {v} "
                             f"has {max_VxK[v].tolist()}, these weights give {row_K.tolist()}; "
                             "delete it or name another file")
    print(f"read the sense max logits from {path}")
    return max_VxK


def topic_scores(params: Params, config: BackpackConfig, bags: Sequence[Sequence[int]], *,
                 max_logits_VxK: np.ndarray | None = None, zero_from: int | None = None,
                 progress: bool = True) -> np.ndarray:
    """The paper's scores s(x, l) = b . (E C(x)_l) / max_u (E C(x)_l)[u] of every token x and
    sense l, for each bag of token ids b: [len(bags), V, K] float32.

    `max_logits_VxK` (from `sense_max_logits`) saves the expensive part; without it, it is
    computed in the same pass. Tokens from `zero_from` on score 0: the authors' code scored only
    the ids below <|endoftext|> (50256), leaving it and the padding rows at 0.
    """
    V, K = config.vocab_size, config.num_senses
    if not bags or any(not b for b in bags):
        raise ValueError("every bag of words needs at least one token id")
    if max_logits_VxK is not None and np.shape(max_logits_VxK) != (V, K):
        raise ValueError(f"max_logits_VxK has shape {np.shape(max_logits_VxK)}, expected "
                         f"{(V, K)} for this model")
    if zero_from is not None and not 0 <= zero_from <= V:
        raise ValueError(f"zero_from={zero_from} is outside [0, {V}]")
    e_VxD = np.asarray(model.embedding_VxD(params), np.float32)
    bags_ZxD = np.stack([e_VxD[sorted({checks.check_token(config, t) for t in b})].sum(0)
                         for b in bags])
    numer_ZxVxK, max_VxK = _vocabulary_pass(params, config, bags_ZxD, max_logits_VxK is None,
                                            0, V, progress, "topic scores")
    max_VxK = np.asarray(max_logits_VxK if max_VxK is None else max_VxK, np.float32)
    if (max_VxK == 0).any():
        v, k = np.argwhere(max_VxK == 0)[0]
        raise ValueError(f"sense {k} of token {v} has a largest logit of 0: its score is "
                         "undefined")
    scores_ZxVxK = numer_ZxVxK / max_VxK
    if zero_from is not None:
        scores_ZxVxK[:, zero_from:] = 0.0
    return scores_ZxVxK


def sense_weights(scores_VxK: np.ndarray, strength: int | Sequence[float]) -> np.ndarray:
    """delta [V, K]: the weight of each (token, sense) by its quantile group of `scores_VxK`.

    `strength` is one of the paper's (0-3, Table 11) or four weights of your own, for scores
    above the 0.95 quantile, above the 0.80, above the 0.60, and the rest.
    """
    if isinstance(strength, (int, np.integer)) and not isinstance(strength, bool):
        if strength not in STRENGTHS:
            raise ValueError(f"strength {strength} is not one of the paper's {list(STRENGTHS)}; "
                             "pass four weights for others")
        strength = STRENGTHS[int(strength)]
    deltas = tuple(float(d) for d in strength)
    if len(deltas) != 4:
        raise ValueError(f"give four group weights (highest scores first), got {deltas}")
    scores_VxK = np.asarray(scores_VxK)
    q95, q80, q60 = np.quantile(scores_VxK, QUANTILES)
    return np.select([scores_VxK > q95, scores_VxK > q80, scores_VxK > q60], deltas[:3],
                     deltas[3]).astype(np.float32)


# ----------------------------------------------------------------------- weighting, annealing

@flax.struct.dataclass
class AnnealState:
    """What `TopicControl` keeps about the prefix in the decode cache (T = its length)."""

    ids_BxT: jax.Array  # int32 token ids so far (0 in slots not yet written)
    a_BxKxT: jax.Array  # a[l, i, j] at the last position i fed


def _real_BxT(inputs: ReweightInputs, batch: int) -> jax.Array:
    """Which positions hold real tokens of the text so far: those the last query attends to
    (every earlier real token, and itself; not padding, not the future)."""
    attend_BxT = inputs.attend_BxSxT[:, -1]
    return jnp.broadcast_to(attend_BxT, (batch, attend_BxT.shape[-1]))


def _topic_sums(inputs: ReweightInputs, state: AnnealState | None
                ) -> tuple[jax.Array, AnnealState]:
    """a[l, i, j] = sum over the real tokens m <= i of relu((E C(x_j)_l)[x_m]), for the S new
    positions i and every position j: [B, K, S, T]; and the state after the last of them.

    The new tokens add their terms to every position's senses (a running sum over them); the
    new positions' senses also meet the tokens before them, once. Without a state there are
    none (a full pass, or prefill).
    """
    ids_BxS = inputs.input_ids_BxS.astype(jnp.int32)
    B, S = ids_BxS.shape
    BK, T, D = inputs.senses_BKxTxD.shape
    K, c = BK // B, inputs.cache_index
    senses_BxKxTxD = inputs.senses_BKxTxD.reshape(B, K, T, D)
    e_VxD = inputs.wte_VxD
    real_BxT = _real_BxT(inputs, B)
    ids_BxT = jnp.zeros((B, T), jnp.int32) if state is None else state.ids_BxT
    ids_BxT = jax.lax.dynamic_update_slice(ids_BxT, ids_BxS, (0, c))

    new_BxKxTxS = jnp.einsum("bktd,bsd->bkts", senses_BxKxTxD, e_VxD[ids_BxS].astype(
        senses_BxKxTxD.dtype), preferred_element_type=jnp.float32)
    real_new_BxS = jax.lax.dynamic_slice(real_BxT, (0, c), (B, S))
    new_BxKxTxS = jax.nn.relu(new_BxKxTxS) * real_new_BxS[:, None, None, :]
    a_BxKxSxT = jnp.cumsum(new_BxKxTxS, axis=-1).transpose(0, 1, 3, 2)

    if state is not None:
        senses_new_BxKxSxD = jax.lax.dynamic_slice(senses_BxKxTxD, (0, 0, c, 0), (B, K, S, D))
        old_BxKxSxT = jnp.einsum("bksd,btd->bkst", senses_new_BxKxSxD, e_VxD[ids_BxT].astype(
            senses_BxKxTxD.dtype), preferred_element_type=jnp.float32)
        before_BxT = real_BxT & (jnp.arange(T) < c)
        old_BxKxS = (jax.nn.relu(old_BxKxSxT) * before_BxT[:, None, None, :]).sum(-1)
        earlier_BxKxT = jax.lax.dynamic_update_slice(state.a_BxKxT, old_BxKxS, (0, 0, c))
        a_BxKxSxT = a_BxKxSxT + earlier_BxKxT[:, :, None, :]
    return a_BxKxSxT, AnnealState(ids_BxT=ids_BxT, a_BxKxT=a_BxKxSxT[:, :, -1])


@flax.struct.dataclass
class TopicControl(SenseEdit):
    """The paper's topic control with annealing, as a sense edit: the senses stay as they are and
    alpha[l, i, j] becomes alpha[l, i, j] delta'[l, i, j] (see the module docstring).

    A pytree of arrays: another topic or strength of the same model does not recompile. Build
    it with `from_weights(sense_weights(...))` or `topic_control`; `fixed` gives the
    non-annealed variant.
    """

    delta_VxK: jax.Array  # initial weight of sense k of token v (1 = untouched)
    annealing_scale: jax.Array  # f: float32 scalar

    @classmethod
    def from_weights(cls, delta_VxK: Any) -> TopicControl:
        """With f = max(delta) / 7.5, as the authors set it for each strength."""
        delta_VxK = jnp.asarray(delta_VxK, jnp.float32)
        return cls(delta_VxK=delta_VxK,
                   annealing_scale=jnp.max(delta_VxK) / jnp.float32(ANNEAL_DIVISOR))

    def reweight(self, alpha_BxKxSxT: jax.Array, inputs: ReweightInputs,
                 state: AnnealState | None) -> tuple[jax.Array, AnnealState]:
        a_BxKxSxT, state = _topic_sums(inputs, state)
        B, T = state.ids_BxT.shape
        # j: the position in the text, counted from each row's first real token.
        first_B = jnp.argmax(_real_BxT(inputs, B), axis=1)
        j_BxT = jnp.maximum(jnp.arange(T) - first_B[:, None], 0)
        w_BxKxSxT = jax.nn.sigmoid(ANNEAL_OFFSET - self.annealing_scale * a_BxKxSxT) * (
            1.0 + j_BxT / POSITION_SCALE)[:, None, None, :]
        delta_BxKx1xT = self.delta_VxK[state.ids_BxT].transpose(0, 2, 1)[:, :, None, :]
        return alpha_BxKxSxT * (w_BxKxSxT * delta_BxKx1xT + (1.0 - w_BxKxSxT)), state

    def fixed(self, config: BackpackConfig) -> SenseIntervention:
        """Without annealing: sense l of token x scaled by delta[x, l] wherever x occurs."""
        if self.delta_VxK.shape != (config.vocab_size, config.num_senses):
            raise ValueError(f"delta has shape {self.delta_VxK.shape}, expected "
                             f"{(config.vocab_size, config.num_senses)} for this model")
        return interventions.no_intervention(config).replace(scale_VxK=self.delta_VxK)


def topic_control(params: Params, config: BackpackConfig, bag_ids: Sequence[int],
                  strength: int | Sequence[float], *, max_logits_VxK: np.ndarray | None = None,
                  zero_from: int | None = None, progress: bool = True) -> TopicControl:
    """The paper's topic control for one bag of token ids (`bag_token_ids`) in one call:
    scores, quantile groups, and the annealed weights of `strength`."""
    scores_VxK = topic_scores(params, config, [bag_ids], max_logits_VxK=max_logits_VxK,
                              zero_from=zero_from, progress=progress)[0]
    return TopicControl.from_weights(sense_weights(scores_VxK, strength))
