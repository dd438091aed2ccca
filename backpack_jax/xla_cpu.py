"""XLA:CPU forms of the model's tunable operations: the same math as model.py's plain forms.

`model.XLA_CPU` gathers the operations into a `model.Kernels` (`model.kernels_for("cpu")`), and
`model.apply` runs an inference batch with them `in_row_chunks`; other platforms get the plain
forms. tests/test_xla_cpu.py checks each form against the plain one (values and gradients,
float32 and bfloat16). Why each exists:

- `matmul`: a batch-1 decode step's products are matrix-vector products, bound by reading the
  kernel, and XLA's CPU dot reads a lone one below the memory bandwidth. Splitting the
  contraction into G independent slices (a batched product, then a sum) spreads them over the
  cores. From two rows on, the plain dot is as fast or faster (at 8 rows up to 2.5x), so only
  a single row is split.
- `keep_mask`: JAX's threefry spends a whole 2x32-bit block on each element whatever its bit
  width; dropout needs 16 bits, so one block gives four elements' keep decisions.
- `residual`: XLA's CPU fusion duplicated the residual stream's cotangent chain into every
  weight-gradient transpose, so the backward's elementwise work grew with the square of the
  depth; materialising the cotangent before each LayerNorm keeps it linear.
- `sense_sum`: a decode step sums per-sense products that read the cache buffer in place; longer
  inputs use one product over senses and positions, on a materialised copy of the senses (the
  layout change for its gradient is then a cheap copy instead of a fused recomputation).
- `lm_head`: autodiff's embedding gradient g^T o makes XLA transpose all of g [B*S, V] and run at
  half the GEMM rate; (o^T g)^T does not.
- `in_row_chunks`: XLA's CPU GEMMs run one sequence's [S, I] x [I, O] products faster than a
  batch's, so an inference batch runs in chunks of whole rows (`lax.map`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.random
import jax.numpy as jnp

# Products with at most this many rows (batch-1 decode steps) split their contraction in SPLITS
# parts.
FEW_ROWS = 1
SPLITS = 8
# `model.apply` runs an inference batch this many tokens (whole rows) at a time.
TOKENS_PER_CHUNK = 512


def matmul(x_MxI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
    """x @ kernel; with few rows, as G partial products over slices of I, then their sum."""
    rows, n_in = math.prod(x_MxI.shape[:-1]), x_MxI.shape[-1]
    if rows > FEW_ROWS or n_in % SPLITS:
        return x_MxI @ kernel_IxO
    G = SPLITS
    x_MxGxJ = x_MxI.reshape(rows, G, n_in // G)
    # Partial sums in float32, rounded once, as one product of the plain form would be.
    parts_GxMxO = jnp.einsum("mgj,gjo->gmo", x_MxGxJ, kernel_IxO.reshape(G, n_in // G, -1),
                             preferred_element_type=jnp.float32)
    out_MxO = parts_GxMxO.sum(0).astype(jnp.result_type(x_MxI, kernel_IxO))
    return out_MxO.reshape(*x_MxI.shape[:-1], kernel_IxO.shape[-1])


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element numbers of `shape` as uint32, built from per-axis iotas so that XLA's
    SPMD partitioner keeps it sharded (each device numbers its own elements)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


# JAX's threefry primitive; the fallback below covers a JAX that no longer exports it.
_THREEFRY = getattr(jax.extend.random, "threefry2x32_p", None)


def keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """(keep, keep_prob): each element is kept when its uniform 16-bit level is at least
    round(rate * 2^16), independently of all others.

    With a threefry key and a last axis divisible by 4, one threefry block (two 32-bit words)
    gives four levels; otherwise each word of `jax.random.bits` gives two (even last axis) or
    one. The keep probability is thus a multiple of 2^-16 (0.9 -> 0.899994), returned exactly so
    that the caller's scaling stays unbiased.
    """
    dropped = min(round(rate * 2 ** 16), 2 ** 16 - 1)  # keeps keep_prob > 0
    keep_prob = 1.0 - dropped / 2 ** 16
    *lead, last = shape
    blocks = (*lead, last // 4)
    if (_THREEFRY is not None and last % 4 == 0 and math.prod(blocks) < 2 ** 32
            and str(jax.random.key_impl(rng)) == "threefry2x32"):
        k1, k2 = jax.random.key_data(rng)
        words = _THREEFRY.bind(k1, k2, jnp.zeros(blocks, jnp.uint32), _flat_index(blocks))
        words = jnp.stack(words, axis=-1)  # [..., last / 4, 2]
    elif last % 2 == 0:
        words = jax.random.bits(rng, (*lead, last // 2), jnp.uint32)
    else:
        return (jax.random.bits(rng, shape, jnp.uint32) >> 16) >= dropped, keep_prob
    # The comparison comes before the interleave, so XLA keeps one byte per element, not four.
    keep = [(words & 0xFFFF) >= dropped, (words >> 16) >= dropped]
    return jnp.stack(keep, axis=-1).reshape(shape), keep_prob


def _materialize(x: jax.Array) -> jax.Array:
    """x computed into its own buffer: the identity as a conditional, which XLA's CPU fusion
    cannot look through (both branches return x but differ in form), so x is not recomputed
    inside every fusion that reads it."""
    first = x.ravel()[0]
    return jax.lax.cond(first == first, lambda t: t, lambda t: t * 1.0, x)


@jax.custom_vjp
def residual(x_BxSxD: jax.Array) -> jax.Array:
    """The identity on the residual stream, whose cotangent is materialised."""
    return x_BxSxD


residual.defvjp(lambda x_BxSxD: (x_BxSxD, None), lambda _, g_BxSxD: (_materialize(g_BxSxD),))


def sense_sum(alpha_BxKxSxT: jax.Array, senses_BKxTxD: jax.Array, dtype: Any) -> jax.Array:
    """o [B, S, D] = sum over senses k and positions t of alpha[b, k, s, t] * senses[b, k, t]."""
    B, K, S, T = alpha_BxKxSxT.shape
    if S == 1:  # A decode step: per sense alpha_k @ senses_k, reading the cache as it is.
        o_BKx1xD = jnp.einsum("nst,ntd->nsd", alpha_BxKxSxT.reshape(B * K, S, T).astype(dtype),
                              senses_BKxTxD.astype(dtype), preferred_element_type=jnp.float32)
        return o_BKx1xD.reshape(B, K, S, -1).sum(axis=1)
    senses_BxKxTxD = _materialize(senses_BKxTxD.reshape(B, K, T, -1))
    return jnp.einsum("bkst,bktd->bsd", alpha_BxKxSxT.astype(dtype), senses_BxKxTxD.astype(dtype),
                      preferred_element_type=jnp.float32)


@jax.custom_vjp
def lm_head(o_BxSxD: jax.Array, wte_VxD: jax.Array) -> jax.Array:
    """Logits o @ wte^T, accumulated in float32."""
    return jnp.einsum("bsd,vd->bsv", o_BxSxD, wte_VxD, preferred_element_type=jnp.float32)


def _lm_head_fwd(o_BxSxD, wte_VxD):
    return lm_head(o_BxSxD, wte_VxD), (o_BxSxD, wte_VxD)


def _lm_head_bwd(residuals, g_BxSxV):
    o_BxSxD, wte_VxD = residuals
    g_BxSxV = g_BxSxV.astype(o_BxSxD.dtype)  # Cotangents in the operands' dtype, as autodiff's.
    d_o = jnp.einsum("bsv,vd->bsd", g_BxSxV, wte_VxD)
    return d_o, jnp.einsum("bsd,bsv->dv", o_BxSxD, g_BxSxV).T


lm_head.defvjp(_lm_head_fwd, _lm_head_bwd)


def rows_per_chunk(batch: int, seq_len: int, tokens: int) -> int:
    """Whole rows holding at most `tokens` tokens (at least one row)."""
    return min(batch, max(1, tokens // seq_len))


def in_row_chunks(forward: Callable, batch: int, seq_len: int, tokens: int) -> Callable:
    """`forward` over the batch in chunks of whole rows, one after another (`lax.map`); rows
    that do not fill a last chunk run in one more call. Its arguments are [B, ...] arrays or
    None."""
    rows = rows_per_chunk(batch, seq_len, tokens)
    if rows == batch:
        return forward
    chunks, rest = divmod(batch, rows)
    whole = chunks * rows

    def split(x):
        return None if x is None else x[:whole].reshape(chunks, rows, *x.shape[1:])

    def chunked(*xs_B):
        out = jax.lax.map(lambda xs: forward(*xs), tuple(split(x) for x in xs_B))
        out = jax.tree.map(lambda y: y.reshape(whole, *y.shape[2:]), out)
        if rest:
            tail = forward(*(None if x is None else x[whole:] for x in xs_B))
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
        return out
    return chunked

