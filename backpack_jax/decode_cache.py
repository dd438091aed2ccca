"""The decode cache: what cached decoding keeps about the prefix, and how a call writes to it."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from backpack_jax.config import BackpackConfig


@flax.struct.dataclass
class DecodeCache:
    """Everything decoding needs about the prefix, in buffers of length T (the length budget).

    Batch and heads (or senses) share the leading axis: [BH, T, E] is exactly the operand of the
    attention products, so a decode step writes its new entries in place and the products read
    the buffer as it is.
    """

    keys: tuple[jax.Array, ...]  # per GPT-2 layer [BH, T, E]
    values: tuple[jax.Array, ...]  # per GPT-2 layer [BH, T, E]
    sense_keys_BKxTxE: jax.Array  # weight-network keys
    senses_BKxTxD: jax.Array  # sense vectors of the tokens seen so far
    edit_state: Any = None  # what a reweighting sense edit keeps about the prefix (SenseEdit)

    @classmethod
    def zeros(cls, config: BackpackConfig, batch: int, length: int,
              dtype: Any = jnp.float32) -> DecodeCache:
        kv_BHxTxE = jnp.zeros((batch * config.n_head, length, config.head_dim), dtype)
        BK = batch * config.num_senses
        return cls((kv_BHxTxE,) * config.n_layer, (kv_BHxTxE,) * config.n_layer,
                   jnp.zeros((BK, length, config.sense_head_dim), dtype),
                   jnp.zeros((BK, length, config.n_embd), dtype))

    @property
    def length(self) -> int:
        return self.senses_BKxTxD.shape[1]

    def write(self, index: jax.Array | int, kv: list[tuple[jax.Array, jax.Array]],
              sense_keys_BKxSxE: jax.Array, senses_BKxSxD: jax.Array) -> DecodeCache:
        """This cache after a call whose S new positions start at `index`: each GPT-2 layer's
        buffers `kv` (every attention writes its own, as it reads them at once) and the new
        weight-network keys and sense vectors, written here."""
        keys, values = zip(*kv, strict=True)
        return self.replace(keys=keys, values=values,
                            sense_keys_BKxTxE=write_at(self.sense_keys_BKxTxE, sense_keys_BKxSxE,
                                                       index),
                            senses_BKxTxD=write_at(self.senses_BKxTxD, senses_BKxSxD, index))


def write_at(buffer: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """Writes `new` into a cache buffer along its time axis (1) starting at `index`."""
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, index, 0))
