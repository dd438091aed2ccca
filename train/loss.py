"""Next-token cross-entropy over the full vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
    """Mean of -log softmax(logits)[target], in float32.

    Written as logsumexp minus the target's logit, so besides the logits only [B, S] arrays are
    made: no one-hot and no second [B, S, V] array of log-probabilities (V is 50264).
    """
    logits_BxSxV = logits_BxSxV.astype(jnp.float32)
    log_normalizer_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    target_logit_BxS = jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
    return jnp.mean(log_normalizer_BxS - target_logit_BxS)
