"""Checks of token ids and sense indices at the API boundary: JAX clamps out-of-range gathers
silently, so a bad id must be caught before it reaches the model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax.config import BackpackConfig


def validate_token_ids(input_ids: Any, config: BackpackConfig, what: str = "input_ids",
                       limit: int | None = None) -> None:
    """Checks rank, dtype, length and (when concrete) the value range of a [B, S] id array.

    JAX clamps out-of-range gathers silently, so this is the only place such ids are caught.
    """
    limit = config.vocab_size if limit is None else limit
    shape = getattr(input_ids, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{what} must be a 2-D [batch, seq] array, got shape {shape}")
    if shape[1] == 0 or shape[0] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(shape)}")
    if shape[1] > config.n_positions:
        raise ValueError(f"{what} has {shape[1]} positions but the model was built for at most "
                         f"n_positions={config.n_positions}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"{what} must hold integers, got dtype {input_ids.dtype}")
    if not isinstance(input_ids, jax.core.Tracer):
        ids = np.asarray(input_ids)
        bad = (ids < 0) | (ids >= limit)
        if bad.any():
            b, s = np.argwhere(bad)[0]
            raise ValueError(f"{what}[{b}, {s}] = {ids[b, s]} is outside [0, {limit}); "
                             f"{int(bad.sum())} id(s) out of range in total")


def check_token(config: BackpackConfig, token: Any) -> int:
    """`token` as an int, or a ValueError unless it is a token id of this model."""
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not (
            0 <= token < config.vocab_size):
        raise ValueError(f"token id {token!r} is outside [0, vocab_size={config.vocab_size})")
    return int(token)


def check_sense(config: BackpackConfig, sense: Any) -> int:
    """`sense` as an int, or a ValueError unless it is a sense index of this model."""
    if isinstance(sense, bool) or not isinstance(sense, (int, np.integer)) or not (
            0 <= sense < config.num_senses):
        raise ValueError(f"sense index {sense!r} is out of range: this model has "
                         f"num_senses={config.num_senses} (valid: 0..{config.num_senses - 1})")
    return int(sense)


def position_ids(position_ids: Any, config: BackpackConfig, B: int, S: int) -> jax.Array:
    """Positions [B, S] from None (0..S-1), [S] or [B, S], checked against n_positions."""
    if position_ids is None:
        position_ids = jnp.arange(S, dtype=jnp.int32)
    if getattr(position_ids, "ndim", None) == 1:
        position_ids = jnp.broadcast_to(position_ids, (B, S))
    if getattr(position_ids, "shape", None) != (B, S):
        raise ValueError(f"position_ids must have shape [{B}, {S}] (or [{S}]), "
                         f"got {getattr(position_ids, 'shape', None)}")
    validate_token_ids(position_ids, config, "position_ids", limit=config.n_positions)
    return position_ids


def shape(what: str, array: Any, expected: tuple[int, ...]) -> None:
    """A ValueError unless `array` is None or has the `expected` shape."""
    if array is not None and tuple(array.shape) != expected:
        raise ValueError(f"{what} must have shape {expected}, got {tuple(array.shape)}")
