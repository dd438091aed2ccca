"""A per-vocabulary table of sense vectors, so that decoding skips the sense network.

Sense vectors depend on the token alone, so all V x K x D of them can be computed once. The
table costs V*K*D*4 bytes in float32: 50264 x 16 x 768 x 4 B = 2.47 GB for backpack-gpt2
(about 3.6x the model's weights). In exchange each cached decode step reads one K x D row
instead of the sense network's 45M weights (180 MB), a quarter of a step's memory traffic.

`SenseTable` is a `sense_edit` (accepted by `model.apply` and `generate.generate`): it replaces
every token's computed senses by its row of the table, which leaves the sense network's output
unused, so XLA removes that computation from the compiled step. An intervention can still be
applied on top (`then=`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
from tqdm import tqdm

from backpack_jax import batching, model
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import ReweightInputs, SenseEdit
from backpack_jax.model import Params


@flax.struct.dataclass
class SenseTable(SenseEdit):
    senses_VxKxD: jax.Array
    then: SenseEdit | None = None  # an intervention applied to the looked-up senses

    def edit(self, input_ids_BxS: jax.Array, senses_BxSxKxD: jax.Array) -> jax.Array:
        looked_up = jnp.take(self.senses_VxKxD, input_ids_BxS, axis=0)
        looked_up = looked_up.astype(senses_BxSxKxD.dtype)
        return looked_up if self.then is None else self.then.edit(input_ids_BxS, looked_up)

    def reweight(self, alpha_BxKxSxT: jax.Array, inputs: ReweightInputs, state: Any
                 ) -> tuple[jax.Array, Any]:
        """Passes alpha to `then`'s reweight (the annealed topic control has one)."""
        if self.then is None:
            return alpha_BxKxSxT, state
        return self.then.reweight(alpha_BxKxSxT, inputs, state)

    @property
    def reweights(self) -> bool:
        return self.then is not None and self.then.reweights


def nbytes(config: BackpackConfig, dtype: Any = jnp.float32) -> int:
    """Memory the table takes."""
    return config.vocab_size * config.num_senses * config.n_embd * jnp.dtype(dtype).itemsize


@functools.partial(jax.jit, static_argnames=("config", "chunk"), donate_argnames=("table",))
def _fill(table, params, start, *, config, chunk):
    ids_1xC = (start + jnp.arange(chunk, dtype=jnp.int32))[None]
    senses_CxKxD = model.sense_network(params, ids_1xC, config)[0]
    return jax.lax.dynamic_update_slice(table, senses_CxKxD.astype(table.dtype), (start, 0, 0))


def build(params: Params, config: BackpackConfig, *, chunk: int = 2048,
          dtype: Any = jnp.float32, then: SenseEdit | None = None) -> SenseTable:
    """Runs the sense network over the whole vocabulary (eval mode), `chunk` tokens at a time.

    Peak memory is the table itself: chunks are written into it in place (the last one,
    shifted back by `batching.windows`, rewrites a few rows with the same values). Each chunk
    is waited for, so the progress bar shows the work, not its dispatch.
    """
    V = config.vocab_size
    table = jnp.zeros((V, config.num_senses, config.n_embd), dtype)
    chunks = list(batching.windows(V, chunk))
    for w in tqdm(chunks, desc="sense table", unit="chunk"):
        table = _fill(table, params, jnp.int32(w.start), config=config,
                      chunk=w.stop - w.start).block_until_ready()
    return SenseTable(table, then)
