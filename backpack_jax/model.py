"""Backpack-GPT2 as Flax linen modules, and the `init` / `apply` functions users call.

The parameter tree mirrors the Hugging Face module tree (`backpack/gpt2_model/h_3/attn/c_attn`
is `backpack.gpt2_model.h.3.attn.c_attn`), so the converter's name mapping reads like a table.

One code path serves the full forward pass and cached decoding: every attention takes queries for
the new positions and keys for all positions it may see (`attend_BxSxT`); with a `DecodeCache`
the new keys, values and sense vectors are first written into fixed-size buffers at
`cache_index`. The full pass is the special case T = S with no cache.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

from backpack_jax.config import BackpackConfig

Params = Any
# HF's weight network adds this constant above the diagonal (not -inf); we keep it for parity.
WEIGHT_NET_MASK_VALUE = -10000.0


@flax.struct.dataclass
class BackpackOutput:
    logits: jax.Array  # [B, S, V], float32
    contextualization: jax.Array | None = None  # [B, K, S, T] alpha, when asked
    senses: jax.Array | None = None  # [B, K, S, D] sense vectors, when asked


@flax.struct.dataclass
class DecodeCache:
    """Everything decoding needs about the prefix, in buffers of length T (the length budget)."""

    # Batch and heads (or senses) share the leading axis: [B*N, T, F] is exactly the operand of
    # the attention products, so a decode step writes its new entries in place and the products
    # read the buffer as it is. (With [B, N, T, F] and B = 1, XLA copies every buffer per step.)
    keys: tuple[jax.Array, ...]  # per GPT-2 layer [B*H, T, Dh]
    values: tuple[jax.Array, ...]  # per GPT-2 layer [B*H, T, Dh]
    sense_keys_BKxTxE: jax.Array  # weight-network keys
    senses_BKxTxD: jax.Array  # sense vectors of the tokens seen so far

    @classmethod
    def zeros(cls, config: BackpackConfig, batch: int, length: int,
              dtype: Any = jnp.float32) -> "DecodeCache":
        kv = jnp.zeros((batch * config.n_head, length, config.head_dim), dtype)
        return cls(keys=(kv,) * config.n_layer, values=(kv,) * config.n_layer,
                   sense_keys_BKxTxE=jnp.zeros(
                       (batch * config.num_senses, length, config.sense_head_dim), dtype),
                   senses_BKxTxD=jnp.zeros(
                       (batch * config.num_senses, length, config.n_embd), dtype))

    @property
    def length(self) -> int:
        return self.senses_BKxTxD.shape[1]


class SenseEdit(Protocol):
    """Anything that rewrites sense vectors given the tokens they belong to (see senses.py)."""

    def edit(self, input_ids_BxS: jax.Array, senses_BxSxKxD: jax.Array) -> jax.Array: ...


def _write(buffer_BNxTxF: jax.Array, new_BNxSxF: jax.Array, index: jax.Array) -> jax.Array:
    """Writes `new` into a cache buffer along its time axis starting at `index`."""
    return jax.lax.dynamic_update_slice(buffer_BNxTxF, new_BNxSxF.astype(buffer_BNxTxF.dtype),
                                        (0, index, 0))


def _fold(x_BxSxNxF: jax.Array) -> jax.Array:
    """[B, S, N, F] -> [B*N, S, F]: one leading axis for batch and heads (or senses)."""
    B, S, N, F = x_BxSxNxF.shape
    return x_BxSxNxF.transpose(0, 2, 1, 3).reshape(B * N, S, F)


def _scores(q_BNxSxE: jax.Array, k_BNxTxE: jax.Array, batch: int) -> jax.Array:
    """q . k for every query and key position, in float32: [B, N, S, T]."""
    scores_BNxSxT = jnp.einsum("nse,nte->nst", q_BNxSxE, k_BNxTxE,
                               preferred_element_type=jnp.float32)
    return scores_BNxSxT.reshape(batch, -1, *scores_BNxSxT.shape[1:])


def _mix(p_BxNxSxT: jax.Array, v_BNxTxF: jax.Array, dtype: Any) -> jax.Array:
    """Per head, the p-weighted sum of values over positions: [B, N, S, F]."""
    B, N, S, T = p_BxNxSxT.shape
    out_BNxSxF = jnp.einsum("nst,ntf->nsf", p_BxNxSxT.reshape(B * N, S, T).astype(dtype),
                            v_BNxTxF.astype(dtype), preferred_element_type=jnp.float32)
    return out_BNxSxF.reshape(B, N, S, -1)


# Products with at most this many rows (decode steps) split their contraction in _SPLITS parts.
_FEW_ROWS = 8
_SPLITS = 8


class Dense(nn.Module):
    """x @ kernel + bias, kernel [in, out] like HF's Conv1D; float32 parameters.

    A decode step's products are matrix-vector products, bound by reading the kernel; XLA's CPU
    dot reads a lone one at ~20 GB/s where the machine streams ~30. Splitting the contraction
    into independent slices (a batched product, then a sum) lets XLA spread them over the cores:
    a backpack-gpt2 decode step went from 37 to 34 ms (BENCHMARKS.md). Same arithmetic up to the
    order of the sum.
    """

    features: int
    std: float
    dtype: Any

    @nn.compact
    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        n_in = x_NxI.shape[-1]
        kernel_IxO = self.param("kernel", nn.initializers.normal(self.std),
                                (n_in, self.features), jnp.float32).astype(self.dtype)
        bias_O = self.param("bias", nn.initializers.zeros, (self.features,),
                            jnp.float32).astype(self.dtype)
        x_NxI = x_NxI.astype(self.dtype)
        rows = math.prod(x_NxI.shape[:-1])
        if rows > _FEW_ROWS or n_in % _SPLITS:
            return x_NxI @ kernel_IxO + bias_O
        g = _SPLITS
        x_RxGxJ = x_NxI.reshape(rows, g, n_in // g)
        parts_GxRxO = jnp.einsum("rgj,gjo->gro", x_RxGxJ, kernel_IxO.reshape(g, n_in // g, -1))
        return (parts_GxRxO.sum(0) + bias_O).reshape(*x_NxI.shape[:-1], self.features)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element numbers of `shape` as uint32, built from per-axis iotas so that XLA's
    SPMD partitioner keeps it sharded (each device numbers its own elements)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index += jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def _keep_mask(rng: jax.Array, shape: tuple[int, ...], dropped_levels: int) -> jax.Array:
    """Boolean mask of `shape`: each element is kept when its uniform 16-bit level (an
    integer in [0, 2^16)) is at least `dropped_levels`, independently of all others.

    A threefry2x32 block yields two 32-bit words, i.e. four 16-bit levels; `jax.random.bits`
    spends a whole block per element (it xors the two words). With a threefry key and a last
    axis divisible by 4 the block is called directly, one per four elements; otherwise each
    32-bit word of `jax.random.bits` gives two levels (even last axis) or one. The mask is
    formed before the levels are interleaved, so XLA keeps one byte per element, not four.
    """
    *lead, last = shape
    blocks = (*lead, last // 4)
    if (last % 4 == 0 and math.prod(blocks) < 2 ** 32
            and str(jax.random.key_impl(rng)) == "threefry2x32"):
        k1, k2 = jax.random.key_data(rng)
        words = jax.extend.random.threefry2x32_p.bind(
            k1, k2, jnp.zeros(blocks, jnp.uint32), _flat_index(blocks))
        words = jnp.stack(words, axis=-1)  # [..., last / 4, 2]
    elif last % 2 == 0:
        words = jax.random.bits(rng, (*lead, last // 2), jnp.uint32)
    else:
        return (jax.random.bits(rng, shape, jnp.uint32) >> 16) >= dropped_levels
    keep = [(words & 0xFFFF) >= dropped_levels, (words >> 16) >= dropped_levels]
    return jnp.stack(keep, axis=-1).reshape(shape)


class Dropout(nn.Module):
    """Inverted dropout whose keep mask is drawn from 16-bit uniforms, four per threefry block.

    JAX's sharding-invariant threefry spends a whole block on each element of the requested
    shape whatever its bit width, and those random bits were the costliest elementwise work of a
    CPU training step; `_keep_mask` quarters them. The keep probability is rounded to a
    multiple of 2^-16 (0.9 -> 0.899994) and kept values are scaled by its exact inverse, so the
    layer stays unbiased.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        dropped_levels = min(round(self.rate * 2 ** 16), 2 ** 16 - 1)  # keeps keep_prob > 0
        keep_prob = 1.0 - dropped_levels / 2 ** 16
        keep = _keep_mask(self.make_rng("dropout"), x.shape, dropped_levels)
        return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def _cond_identity(x: jax.Array) -> jax.Array:
    """The identity as a conditional, which XLA's CPU fusion cannot look through: both branches
    return x but differ in form, so XLA keeps the conditional and x is computed once into a
    buffer instead of being recomputed inside every fusion that reads it."""
    first = x.ravel()[0]
    return jax.lax.cond(first == first, lambda t: t, lambda t: t * 1.0, x)


def _materialize_on_cpu(x: jax.Array) -> jax.Array:
    """x, computed into its own buffer on CPU; the plain identity elsewhere (a GPU conditional
    would sync with the host)."""
    return jax.lax.platform_dependent(x, cpu=_cond_identity, default=lambda t: t)


@jax.custom_vjp
def _residual_boundary(x_BxSxD: jax.Array) -> jax.Array:
    """The identity on the residual stream, whose cotangent is materialised on CPU.

    The residual stream's cotangent is a chain of adds and LayerNorm gradients through every
    later block. XLA's CPU fusion duplicated that chain into each weight-gradient transpose,
    so the backward's elementwise work grew with the square of the depth (12% of a gpt2_micro
    training step, BENCHMARKS.md). Placed before each LayerNorm of a block.
    """
    return x_BxSxD


def _residual_boundary_fwd(x_BxSxD):
    return x_BxSxD, None


def _residual_boundary_bwd(_, g_BxSxD):
    return (_materialize_on_cpu(g_BxSxD),)


_residual_boundary.defvjp(_residual_boundary_fwd, _residual_boundary_bwd)


def _output_proj_std(config: BackpackConfig) -> float:
    """Init std of each residual-branch output projection (every MLP's c_proj, attn.c_proj)."""
    return config.initializer_range / math.sqrt(2 * config.n_layer)


def _layer_norm(config: BackpackConfig, name: str) -> nn.LayerNorm:
    """LayerNorm in float32 whatever the compute dtype, with torch's two-pass variance."""
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=jnp.float32,
                        param_dtype=jnp.float32, use_fast_variance=False, name=name)


class MLP(nn.Module):
    """c_fc -> gelu_new -> c_proj -> dropout, as every MLP in the HF model."""

    config: BackpackConfig
    hidden: int
    out: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        h = Dense(self.hidden, cfg.initializer_range, self.dtype, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new is the tanh approximation.
        h = Dense(self.out, _output_proj_std(cfg), self.dtype, name="c_proj")(h)
        return Dropout(cfg.resid_pdrop)(h, not train)


class Attention(nn.Module):
    """GPT-2 causal self-attention, optionally reading and writing a KV cache."""

    config: BackpackConfig
    layer_idx: int
    dtype: Any

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, attend_BxSxT: jax.Array, train: bool,
                 kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | int
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        B, S, D = x_BxSxD.shape
        qkv = Dense(3 * D, cfg.initializer_range, self.dtype, name="c_attn")(x_BxSxD)
        q_BHxSxE, k_BHxTxE, v_BHxTxE = (
            _fold(t.reshape(B, S, cfg.n_head, cfg.head_dim)) for t in jnp.split(qkv, 3, axis=-1))
        if kv is not None:
            kv = (_write(kv[0], k_BHxTxE, cache_index), _write(kv[1], v_BHxTxE, cache_index))
            k_BHxTxE, v_BHxTxE = kv
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= math.sqrt(cfg.head_dim)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        scores_BxHxSxT = _scores(q_BHxSxE, k_BHxTxE.astype(self.dtype), B) * scale
        scores_BxHxSxT = jnp.where(attend_BxSxT[:, None], scores_BxHxSxT,
                                   jnp.finfo(jnp.float32).min)
        probs_BxHxSxT = jax.nn.softmax(scores_BxHxSxT, axis=-1)
        probs_BxHxSxT = Dropout(cfg.attn_pdrop)(probs_BxHxSxT, not train)
        out_BxHxSxE = _mix(probs_BxHxSxT, v_BHxTxE, self.dtype).astype(self.dtype)
        out_BxSxD = out_BxHxSxE.transpose(0, 2, 1, 3).reshape(B, S, D)
        out = Dense(D, _output_proj_std(cfg), self.dtype, name="c_proj")(out_BxSxD)
        return Dropout(cfg.resid_pdrop)(out, not train), kv


class Block(nn.Module):
    """Pre-LN GPT-2 block."""

    config: BackpackConfig
    layer_idx: int
    dtype: Any

    @nn.compact
    def __call__(self, x_BxSxD, attend_BxSxT, train, kv, cache_index):
        cfg = self.config
        x_BxSxD = _residual_boundary(x_BxSxD)
        h = _layer_norm(cfg, "ln_1")(x_BxSxD).astype(self.dtype)
        a, kv = Attention(cfg, self.layer_idx, self.dtype, name="attn")(
            h, attend_BxSxT, train, kv, cache_index)
        x_BxSxD = x_BxSxD + a
        x_BxSxD = _residual_boundary(x_BxSxD)
        h = _layer_norm(cfg, "ln_2")(x_BxSxD).astype(self.dtype)
        x_BxSxD = x_BxSxD + MLP(cfg, cfg.inner_dim, cfg.n_embd, self.dtype, name="mlp")(h, train)
        return x_BxSxD, kv


class GPT2Model(nn.Module):
    """The GPT-2 Transformer that produces the contextualization weights' inputs."""

    config: BackpackConfig
    dtype: Any
    remat_policy: Any = None  # A jax.checkpoint policy: recompute each block in the backward.

    def setup(self):
        cfg = self.config
        block = Block if self.remat_policy is None else nn.remat(
            Block, policy=self.remat_policy, static_argnums=(3,))  # 3: `train` (0 is self).
        embed_init = nn.initializers.normal(cfg.initializer_range)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init,
                            param_dtype=jnp.float32)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=embed_init,
                            param_dtype=jnp.float32)
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = [block(cfg, i, self.dtype) for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids_BxS, position_ids_BxS, attend_BxSxT, train, cache, cache_index):
        x_BxSxD = self.wte(input_ids_BxS) + self.wpe(position_ids_BxS)
        x_BxSxD = self.drop(x_BxSxD, deterministic=not train)
        new_kv = []
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_BxSxD, kv = block(x_BxSxD, attend_BxSxT, train, kv, cache_index)
            new_kv.append(kv)
        return self.ln_f(x_BxSxD).astype(self.dtype), new_kv


class SenseNetwork(nn.Module):
    """Maps each token's embedding to K sense vectors; no positions, no mixing across tokens."""

    config: BackpackConfig
    dtype: Any

    @nn.compact
    def __call__(self, embeds_BxSxD: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        residual = Dropout(cfg.embd_pdrop)(embeds_BxSxD, not train)
        h = _layer_norm(cfg, "ln")(residual).astype(self.dtype)
        h = NoMixBlock(cfg, self.dtype, name="block")(h, residual, train)
        senses = MLP(cfg, cfg.sense_intermediate_scale * cfg.n_embd,
                     cfg.num_senses * cfg.n_embd, self.dtype, name="final_mlp")(h, train)
        B, S, _ = senses.shape
        # The projection's output index is sense * D + feature (sense-major).
        return senses.reshape(B, S, cfg.num_senses, cfg.n_embd)


class NoMixBlock(nn.Module):
    """The sense network's residual block: takes (hidden, residual), mixes no positions."""

    config: BackpackConfig
    dtype: Any

    @nn.compact
    def __call__(self, h_BxSxD, residual_BxSxD, train):
        cfg = self.config
        residual_BxSxD = (Dropout(cfg.resid_pdrop)(h_BxSxD, not train)
                          + residual_BxSxD)
        h = _layer_norm(cfg, "ln_1")(residual_BxSxD).astype(self.dtype)
        residual_BxSxD = residual_BxSxD + Dropout(cfg.resid_pdrop)(
            MLP(cfg, 4 * cfg.n_embd, cfg.n_embd, self.dtype, name="mlp")(h, train), not train)
        return _layer_norm(cfg, "ln_2")(residual_BxSxD).astype(self.dtype)


class WeightNetwork(nn.Module):
    """Per-sense queries and keys from the GPT-2 states (no values, no dropout)."""

    config: BackpackConfig
    dtype: Any

    @nn.compact
    def __call__(self, h_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queries and keys, [B*K, S, E] each."""
        cfg = self.config
        B, S, _ = h_BxSxD.shape
        qk = Dense(2 * cfg.n_embd, cfg.initializer_range, self.dtype, name="c_attn")(h_BxSxD)
        # Output index = (query|key) * D + sense * E + feature.
        qk_BxSx2xKxE = qk.reshape(B, S, 2, cfg.num_senses, cfg.sense_head_dim)
        return _fold(qk_BxSx2xKxE[:, :, 0]), _fold(qk_BxSx2xKxE[:, :, 1])


def contextualization_weights(q_BKxSxE: jax.Array, k_BKxTxE: jax.Array,
                              attend_BxSxT: jax.Array, batch: int) -> jax.Array:
    """alpha [B, K, S, T]: softmax over source positions of the scaled per-sense scores, in
    float32."""
    scale = 1.0 / math.sqrt(q_BKxSxE.shape[-1])
    scores_BxKxSxT = _scores(q_BKxSxE, k_BKxTxE.astype(q_BKxSxE.dtype), batch) * scale
    scores_BxKxSxT = scores_BxKxSxT + jnp.where(attend_BxSxT[:, None], 0.0, WEIGHT_NET_MASK_VALUE)
    return jax.nn.softmax(scores_BxKxSxT, axis=-1)


@jax.custom_vjp
def _tied_lm_head(o_BxSxD: jax.Array, wte_VxD: jax.Array) -> jax.Array:
    """Logits o @ wte^T in float32 (accumulated in float32 whatever the input dtype)."""
    return jnp.einsum("bsd,vd->bsv", o_BxSxD, wte_VxD, preferred_element_type=jnp.float32)


def _tied_lm_head_fwd(o_BxSxD, wte_VxD):
    return _tied_lm_head(o_BxSxD, wte_VxD), (o_BxSxD, wte_VxD)


def _tied_lm_head_bwd(residuals, g_BxSxV):
    """The embedding gradient as (o^T g)^T: autodiff's g^T o makes XLA's CPU backend transpose
    all of g ([B*S, V]) and run the product at half its GEMM rate."""
    o_BxSxD, wte_VxD = residuals
    g_BxSxV = g_BxSxV.astype(o_BxSxD.dtype)  # Cotangents in the operands' dtype, as autodiff's.
    d_o = jnp.einsum("bsv,vd->bsd", g_BxSxV, wte_VxD)
    return d_o, jnp.einsum("bsd,bsv->dv", o_BxSxD, g_BxSxV).T


_tied_lm_head.defvjp(_tied_lm_head_fwd, _tied_lm_head_bwd)


class Backpack(nn.Module):
    """The Backpack: a weighted sum of sense vectors, then the tied LM head."""

    config: BackpackConfig
    dtype: Any = jnp.float32
    remat_policy: Any = None

    def setup(self):
        self.gpt2_model = GPT2Model(self.config, self.dtype, self.remat_policy)
        self.sense_network = SenseNetwork(self.config, self.dtype)
        self.sense_weight_net = WeightNetwork(self.config, self.dtype)

    def senses(self, input_ids_BxS: jax.Array, train: bool = False) -> jax.Array:
        """Sense vectors [B, S, K, D] of each token (they depend on the token alone)."""
        return self.sense_network(self.gpt2_model.wte(input_ids_BxS), train)

    def __call__(self, input_ids_BxS, position_ids_BxS, attend_BxSxT, *, train=False,
                 cache: DecodeCache | None = None, cache_index=0,
                 sense_edit: SenseEdit | None = None,
                 contextualization_BxKxSxT: jax.Array | None = None,
                 return_contextualization=False, return_senses=False):
        h_BxSxD, new_kv = self.gpt2_model(input_ids_BxS, position_ids_BxS, attend_BxSxT, train,
                                          cache, cache_index)
        B = input_ids_BxS.shape[0]
        q_BKxSxE, k_BKxTxE = self.sense_weight_net(h_BxSxD)
        senses_BxSxKxD = self.senses(input_ids_BxS, train)
        if sense_edit is not None:
            senses_BxSxKxD = sense_edit.edit(input_ids_BxS, senses_BxSxKxD)
        senses_BKxTxD = _fold(senses_BxSxKxD)
        new_cache = None
        if cache is not None:
            new_cache = DecodeCache(
                keys=tuple(kv[0] for kv in new_kv), values=tuple(kv[1] for kv in new_kv),
                sense_keys_BKxTxE=_write(cache.sense_keys_BKxTxE, k_BKxTxE, cache_index),
                senses_BKxTxD=_write(cache.senses_BKxTxD, senses_BKxTxD, cache_index))
            k_BKxTxE, senses_BKxTxD = new_cache.sense_keys_BKxTxE, new_cache.senses_BKxTxD
        alpha_BxKxSxT = contextualization_BxKxSxT
        if alpha_BxKxSxT is None:
            alpha_BxKxSxT = contextualization_weights(q_BKxSxE, k_BKxTxE, attend_BxSxT, B)
        senses_BxKxTxD = senses_BKxTxD.reshape(B, -1, *senses_BKxTxD.shape[1:])
        if input_ids_BxS.shape[1] == 1:  # A decode step: per sense alpha_k @ senses_k, summed,
            # which reads the cache buffer as it is (see DecodeCache).
            o_BxSxD = jnp.sum(_mix(alpha_BxKxSxT, senses_BKxTxD, self.dtype), axis=1)
        else:  # One product over senses and positions together: faster for long inputs.
            if cache is None:  # Materialised, the layout change for its gradient is a cheap
                # copy; fused with the sense network's bias and dropout it took 200 ms of a
                # gpt2_micro training step.
                senses_BxKxTxD = _materialize_on_cpu(senses_BxKxTxD)
            o_BxSxD = jnp.einsum("bkst,bktd->bsd", alpha_BxKxSxT.astype(self.dtype),
                                 senses_BxKxTxD.astype(self.dtype),
                                 preferred_element_type=jnp.float32)
        wte_VxD = self.gpt2_model.wte.embedding
        logits_BxSxV = _tied_lm_head(o_BxSxD.astype(self.dtype), wte_VxD.astype(self.dtype))
        out = BackpackOutput(
            logits=logits_BxSxV,
            contextualization=alpha_BxKxSxT if return_contextualization else None,
            senses=senses_BxKxTxD if return_senses else None)
        return out, new_cache


class BackpackLM(nn.Module):
    """Top-level module; its only child is named `backpack` like the HF model's."""

    config: BackpackConfig
    dtype: Any = jnp.float32
    remat_policy: Any = None  # Training only: see GPT2Model.remat_policy.

    def setup(self):
        self.backpack = Backpack(self.config, self.dtype, self.remat_policy)

    def __call__(self, *args, **kwargs):
        return self.backpack(*args, **kwargs)

    def senses(self, input_ids_BxS, train=False):
        return self.backpack.senses(input_ids_BxS, train)


def causal_mask(seq_len: int) -> jax.Array:
    """attend[i, j] = j <= i, shaped [1, S, S] to broadcast over the batch."""
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None]


@functools.partial(jax.jit, static_argnames="config")
def init(config: BackpackConfig, rng: jax.Array) -> Params:
    """Fresh parameters with the paper's initialisation (float32); jitted, as eager init is slow."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = BackpackLM(config).init(rng, ids, jnp.arange(2)[None], causal_mask(2))
    return variables["params"]


def count_params(tree: Any) -> int:
    """Number of parameters in a (possibly abstract) parameter tree or subtree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


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
    if _is_concrete(input_ids):
        ids = np.asarray(input_ids)
        bad = (ids < 0) | (ids >= limit)
        if bad.any():
            b, s = np.argwhere(bad)[0]
            raise ValueError(f"{what}[{b}, {s}] = {ids[b, s]} is outside [0, {limit}); "
                             f"{int(bad.sum())} id(s) out of range in total")


# An inference forward on CPU runs its batch this many tokens (whole rows) at a time.
CPU_TOKENS_PER_CHUNK = 512


def _rows_per_chunk(batch: int, seq_len: int) -> int:
    """Whole rows holding at most CPU_TOKENS_PER_CHUNK tokens (at least one row)."""
    return min(batch, max(1, CPU_TOKENS_PER_CHUNK // seq_len))


def _in_row_chunks(forward, batch: int, seq_len: int):
    """`forward` over the batch in chunks of whole rows, one after another (`lax.map`); rows
    that do not fill a last chunk run in one more call.

    XLA's CPU GEMMs run one sequence's [512, K] x [K, N] products at 320-380 GFLOP/s but a
    batch's [B*512, K] ones at 230-280, and fuse LayerNorms into the larger products, which
    then run slower still: a backpack-gpt2 forward at B=8, S=512 went from 600-652 to 787-918
    tokens/s (BENCHMARKS.md). Same arithmetic, row by row.
    """
    rows = _rows_per_chunk(batch, seq_len)
    if rows == batch:
        return forward
    chunks, rest = divmod(batch, rows)
    whole = chunks * rows

    def chunked(*xs_B):
        split = lambda x: None if x is None else x[:whole].reshape(chunks, rows, *x.shape[1:])
        out = jax.lax.map(lambda xs: forward(*xs), tuple(split(x) for x in xs_B))
        out = jax.tree.map(lambda y: y.reshape(whole, *y.shape[2:]), out)
        if rest:
            tail = forward(*(None if x is None else x[whole:] for x in xs_B))
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
        return out
    return chunked


@functools.partial(jax.jit, static_argnames=("config", "train", "return_contextualization",
                                             "return_senses", "dtype"))
def _apply(params, input_ids, position_ids, rng, sense_edit, contextualization, *, config,
           train, return_contextualization, return_senses, dtype):
    rngs = {"dropout": rng} if train else {}

    def forward(input_ids_BxS, position_ids_BxS, contextualization_BxKxSxS):
        out, _ = BackpackLM(config, dtype).apply(
            {"params": params}, input_ids_BxS, position_ids_BxS,
            causal_mask(input_ids_BxS.shape[1]), train=train, sense_edit=sense_edit,
            contextualization_BxKxSxT=contextualization_BxKxSxS,
            return_contextualization=return_contextualization, return_senses=return_senses,
            rngs=rngs)
        return out

    if train:  # Dropout masks are drawn for the whole batch; chunks would draw other ones.
        return forward(input_ids, position_ids, contextualization)
    return jax.lax.platform_dependent(
        input_ids, position_ids, contextualization,
        cpu=_in_row_chunks(forward, *input_ids.shape), default=forward)


def apply(params: Params, input_ids: jax.Array, config: BackpackConfig, *,
          position_ids: jax.Array | None = None, train: bool = False,
          rng: jax.Array | None = None, return_contextualization: bool = False,
          return_senses: bool = False, dtype: Any = jnp.float32,
          sense_edit: SenseEdit | None = None,
          contextualization: jax.Array | None = None) -> BackpackOutput:
    """Runs the Backpack LM on `input_ids` [B, S].

    Args:
      params: from `init` or `convert.load_hf`.
      config: the model's config (static under jit).
      position_ids: [B, S] or [S]; defaults to 0..S-1.
      train: enables dropout where the HF model has it; needs `rng`.
      return_contextualization / return_senses: also return alpha [B, K, S, S] / senses
        [B, K, S, D].
      dtype: compute dtype (e.g. jnp.bfloat16); LayerNorm, softmax and logits stay float32.
      sense_edit: an intervention on sense vectors (see `backpack_jax.senses`).
      contextualization: use this alpha [B, K, S, S] instead of the model's (HF's
        `run_with_custom_contextualization`).
    """
    validate_token_ids(input_ids, config)
    B, S = input_ids.shape
    if position_ids is None:
        position_ids = jnp.arange(S, dtype=jnp.int32)
    if getattr(position_ids, "ndim", None) == 1:
        position_ids = jnp.broadcast_to(position_ids, (B, S))
    if getattr(position_ids, "shape", None) != (B, S):
        raise ValueError(f"position_ids must have shape [{B}, {S}] (or [{S}]), "
                         f"got {getattr(position_ids, 'shape', None)}")
    validate_token_ids(position_ids, config, "position_ids", limit=config.n_positions)
    if train and rng is None:
        raise ValueError("apply(train=True) needs an `rng` for dropout")
    if contextualization is not None and contextualization.shape != (
            B, config.num_senses, S, S):
        raise ValueError(f"contextualization must have shape {(B, config.num_senses, S, S)}, "
                         f"got {contextualization.shape}")
    return _apply(params, input_ids, position_ids, rng, sense_edit, contextualization,
                  config=config, train=train, return_contextualization=return_contextualization,
                  return_senses=return_senses, dtype=dtype)
