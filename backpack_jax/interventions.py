"""Interventions on sense vectors: edits that rewrite what a token's senses are.

`SenseIntervention` is a `SenseEdit` (accepted as `sense_edit=` by `model.apply` and
`generate.generate`) that scales or replaces sense k of token v wherever v occurs. Build one with
`scale_senses`, `replace_senses` or `knowledge_edit` (the paper's §6.3) and combine them with
`compose`; `no_intervention` is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax import checks, model
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import SenseEdit
from backpack_jax.model import Params


@flax.struct.dataclass
class SenseIntervention(SenseEdit):
    """Rewrites sense vectors by token: sense k of token v becomes
    scale_VxK[v, k] * (its replacement vector if (v, k) has one, else the original).

    A pytree of arrays, so it passes through jit as data: changing the numbers does not
    recompile (changing the number of replacements does). Build with `scale_senses`,
    `replace_senses`, `knowledge_edit`, `topic.TopicControl.fixed`; combine with `compose`.
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
            scale_VxK[checks.check_token(config, token), checks.check_sense(config, sense)] = factor
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
            pairs.append((checks.check_token(config, token), checks.check_sense(config, sense)))
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
    word = sorted({checks.check_token(config, t) for t in word_ids})
    if not word:
        raise ValueError("word_ids is empty")
    remove_id, add_id = checks.check_token(config, remove_id), checks.check_token(config, add_id)
    if remove_id == add_id:
        raise ValueError(f"remove_id and add_id are the same token ({remove_id})")
    e_V = np.asarray(model.embedding_VxD(params), np.float64)
    e_r, e_a = e_V[remove_id], e_V[add_id]
    r2, a2 = e_r @ e_r, e_a @ e_a
    if r2 == 0 or a2 == 0:
        raise ValueError("the removed or added token has an all-zero embedding")
    senses_UxKxD = np.asarray(model.sense_vectors(params, config, word), np.float64)
    along_UxK = senses_UxKxD @ e_r / r2
    edited_UxKxD = senses_UxKxD + along_UxK[..., None] * (e_a * r2 / a2 - e_r)
    return replace_senses(config, {t: dict(enumerate(edited_UxKxD[u]))
                                   for u, t in enumerate(word)})
