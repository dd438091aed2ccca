"""Backpack-GPT2 (Hewitt et al., ACL 2023) in Flax linen, and the `init` / `apply` users call.

The paper's model, in the order of this file: a GPT-2 Transformer contextualizes the input; the
sense network maps each word to K sense vectors C(x); the weight network turns the Transformer's
states into K causal weight matrices alpha; each position's output is
o_i = sum_l sum_j alpha[l, i, j] C(x_j)_l, and the logits are E o_i with E the tied word
embeddings (no bias, no final LayerNorm, no division by K). A `SenseEdit` may rewrite the
sense vectors and rescale alpha (the paper's interventions, senses.py and topic.py).

The parameter tree mirrors the Hugging Face module tree (`backpack/gpt2_model/h_3/attn/c_attn`
is `backpack.gpt2_model.h.3.attn.c_attn`), so the converter's name table reads like a table.

One code path serves the full forward pass and cached decoding: every attention takes queries
for the new positions and keys for all positions it may see (`attend_BxSxT`); with a
`DecodeCache` the new keys, values and sense vectors are first written into fixed-size buffers
at `cache_index`. The full pass is the special case T = S with no cache.

A few operations have faster forms on some backends with the same math (`Kernels`): the plain
forms are here, XLA:CPU's in xla_cpu.py, and `kernels_for` is the one place that chooses.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax import xla_cpu
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import ReweightInputs, SenseEdit, check_edit

Params = Any
# HF's weight network adds this constant above the diagonal (not -inf); we keep it for parity.
WEIGHT_NET_MASK_VALUE = -10000.0


@flax.struct.dataclass
class BackpackOutput:
    logits: jax.Array  # [B, S, V], float32
    contextualization: jax.Array | None = None  # [B, K, S, T] alpha (before any reweight)
    senses: jax.Array | None = None  # [B, K, T, D] sense vectors, when asked


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
        return cls(keys=(kv_BHxTxE,) * config.n_layer, values=(kv_BHxTxE,) * config.n_layer,
                   sense_keys_BKxTxE=jnp.zeros(
                       (batch * config.num_senses, length, config.sense_head_dim), dtype),
                   senses_BKxTxD=jnp.zeros(
                       (batch * config.num_senses, length, config.n_embd), dtype))

    @property
    def length(self) -> int:
        return self.senses_BKxTxD.shape[1]


# ------------------------------------------------------------------------------ kernels

def _plain_keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float
                     ) -> tuple[jax.Array, float]:
    """(keep, keep_prob) of inverted dropout."""
    return jax.random.bernoulli(rng, 1.0 - rate, shape), 1.0 - rate


def _plain_sense_sum(alpha_BxKxSxT: jax.Array, senses_BKxTxD: jax.Array, dtype: Any
                     ) -> jax.Array:
    """o [B, S, D] = sum over senses k and positions t of alpha[b, k, s, t] * senses[b, k, t]."""
    B, K = alpha_BxKxSxT.shape[:2]
    senses_BxKxTxD = senses_BKxTxD.reshape(B, K, *senses_BKxTxD.shape[1:])
    return jnp.einsum("bkst,bktd->bsd", alpha_BxKxSxT.astype(dtype), senses_BxKxTxD.astype(dtype),
                      preferred_element_type=jnp.float32)


def _plain_lm_head(o_BxSxD: jax.Array, wte_VxD: jax.Array) -> jax.Array:
    """Logits E o, accumulated in float32."""
    return jnp.einsum("bsd,vd->bsv", o_BxSxD, wte_VxD, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The operations a backend may compute in another form with the same math (hashable, so a
    jit static argument). The defaults are the plain forms."""

    matmul: Callable = jnp.matmul  # (x [..., I], kernel [I, O]) -> [..., O]
    keep_mask: Callable = _plain_keep_mask  # (rng, shape, rate) -> (keep, keep_prob)
    residual: Callable = lambda x_BxSxD: x_BxSxD  # marks the residual stream before a LayerNorm
    sense_sum: Callable = _plain_sense_sum  # (alpha, senses, dtype) -> o [B, S, D]
    lm_head: Callable = _plain_lm_head  # (o [B, S, D], E [V, D]) -> float32 logits [B, S, V]
    batch_forward: Callable = lambda forward, batch, seq_len: forward  # runs an inference batch


PLAIN = Kernels()
XLA_CPU = Kernels(matmul=xla_cpu.matmul, keep_mask=xla_cpu.keep_mask, residual=xla_cpu.residual,
                  sense_sum=xla_cpu.sense_sum, lm_head=xla_cpu.lm_head,
                  batch_forward=xla_cpu.in_row_chunks)


def kernels_for(platform: str) -> Kernels:
    """The kernels for a JAX platform name ("cpu", "gpu", "tpu"): XLA:CPU's forms on CPU."""
    return XLA_CPU if platform == "cpu" else PLAIN


# ---------------------------------------------------------------------------- building blocks

class Dense(nn.Module):
    """x @ kernel + bias, kernel [I, O] like HF's Conv1D; float32 parameters."""

    features: int
    std: float
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, x_MxI: jax.Array) -> jax.Array:
        kernel_IxO = self.param("kernel", nn.initializers.normal(self.std),
                                (x_MxI.shape[-1], self.features), jnp.float32).astype(self.dtype)
        bias_O = self.param("bias", nn.initializers.zeros, (self.features,),
                            jnp.float32).astype(self.dtype)
        return self.kernels.matmul(x_MxI.astype(self.dtype), kernel_IxO) + bias_O


class Dropout(nn.Module):
    """Inverted dropout: kept values are scaled by 1 / keep_prob, so the layer is unbiased."""

    rate: float
    kernels: Kernels

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep, keep_prob = self.kernels.keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


def _layer_norm(config: BackpackConfig, name: str) -> nn.LayerNorm:
    """LayerNorm in float32 whatever the compute dtype, with torch's two-pass variance."""
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=jnp.float32,
                        param_dtype=jnp.float32, use_fast_variance=False, name=name)


def _output_proj_std(config: BackpackConfig) -> float:
    """Init std of each residual-branch output projection (every MLP's c_proj, attn.c_proj)."""
    return config.initializer_range / math.sqrt(2 * config.n_layer)


class MLP(nn.Module):
    """c_fc -> gelu_new -> c_proj -> dropout, as every MLP in the HF model."""

    config: BackpackConfig
    hidden: int
    out: int
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, train: bool) -> jax.Array:
        cfg, kernels = self.config, self.kernels
        h_BxSxF = Dense(self.hidden, cfg.initializer_range, self.dtype, kernels, name="c_fc")(
            x_BxSxD)
        h_BxSxF = jax.nn.gelu(h_BxSxF, approximate=True)  # gelu_new is the tanh approximation.
        out_BxSxO = Dense(self.out, _output_proj_std(cfg), self.dtype, kernels, name="c_proj")(
            h_BxSxF)
        return Dropout(cfg.resid_pdrop, kernels)(out_BxSxO, not train)


# ------------------------------------------------------------------- the GPT-2 Transformer

def _write(buffer: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """Writes `new` into a cache buffer along its time axis (1) starting at `index`."""
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, index, 0))


def _fold(x_BxSxHxE: jax.Array) -> jax.Array:
    """[B, S, H, E] -> [BH, S, E]: one leading axis for batch and heads (or senses)."""
    B, S, H, E = x_BxSxHxE.shape
    return x_BxSxHxE.transpose(0, 2, 1, 3).reshape(B * H, S, E)


def _scores(q_BHxSxE: jax.Array, k_BHxTxE: jax.Array, batch: int) -> jax.Array:
    """q . k for every query and key position, in float32: [B, H, S, T]."""
    scores_BHxSxT = jnp.einsum("nse,nte->nst", q_BHxSxE, k_BHxTxE,
                               preferred_element_type=jnp.float32)
    return scores_BHxSxT.reshape(batch, -1, *scores_BHxSxT.shape[1:])


def _mix(p_BxHxSxT: jax.Array, v_BHxTxE: jax.Array, dtype: Any) -> jax.Array:
    """Per head, the p-weighted sum of values over positions: [B, H, S, E]."""
    B, H, S, T = p_BxHxSxT.shape
    out_BHxSxE = jnp.einsum("nst,nte->nse", p_BxHxSxT.reshape(B * H, S, T).astype(dtype),
                            v_BHxTxE.astype(dtype), preferred_element_type=jnp.float32)
    return out_BHxSxE.reshape(B, H, S, -1)


class Attention(nn.Module):
    """GPT-2 causal self-attention, optionally reading and writing a KV cache."""

    config: BackpackConfig
    layer_idx: int
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, attend_BxSxT: jax.Array, train: bool,
                 kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | int
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg, kernels = self.config, self.kernels
        B, S, D = x_BxSxD.shape
        qkv_BxSx3D = Dense(3 * D, cfg.initializer_range, self.dtype, kernels, name="c_attn")(
            x_BxSxD)
        q_BHxSxE, k_BHxTxE, v_BHxTxE = (_fold(t.reshape(B, S, cfg.n_head, cfg.head_dim))
                                        for t in jnp.split(qkv_BxSx3D, 3, axis=-1))
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
        probs_BxHxSxT = Dropout(cfg.attn_pdrop, kernels)(probs_BxHxSxT, not train)
        out_BxHxSxE = _mix(probs_BxHxSxT, v_BHxTxE, self.dtype).astype(self.dtype)
        out_BxSxD = out_BxHxSxE.transpose(0, 2, 1, 3).reshape(B, S, D)
        out_BxSxD = Dense(D, _output_proj_std(cfg), self.dtype, kernels, name="c_proj")(out_BxSxD)
        return Dropout(cfg.resid_pdrop, kernels)(out_BxSxD, not train), kv


class Block(nn.Module):
    """Pre-LN GPT-2 block."""

    config: BackpackConfig
    layer_idx: int
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxSxD, attend_BxSxT, train, kv, cache_index):
        cfg, kernels = self.config, self.kernels
        x_BxSxD = kernels.residual(x_BxSxD)
        h_BxSxD = _layer_norm(cfg, "ln_1")(x_BxSxD).astype(self.dtype)
        a_BxSxD, kv = Attention(cfg, self.layer_idx, self.dtype, kernels, name="attn")(
            h_BxSxD, attend_BxSxT, train, kv, cache_index)
        x_BxSxD = kernels.residual(x_BxSxD + a_BxSxD)
        h_BxSxD = _layer_norm(cfg, "ln_2")(x_BxSxD).astype(self.dtype)
        mlp = MLP(cfg, cfg.inner_dim, cfg.n_embd, self.dtype, kernels, name="mlp")
        return x_BxSxD + mlp(h_BxSxD, train), kv


class GPT2Model(nn.Module):
    """The GPT-2 Transformer whose final states feed the weight network."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels
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
        self.drop = Dropout(cfg.embd_pdrop, self.kernels)
        self.h = [block(cfg, i, self.dtype, self.kernels) for i in range(cfg.n_layer)]
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


# -------------------------------------------------------------------------- the sense network

class NoMixBlock(nn.Module):
    """The sense network's residual block: takes (hidden, residual), mixes no positions."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, h_BxSxD, residual_BxSxD, train):
        cfg, kernels = self.config, self.kernels
        residual_BxSxD = Dropout(cfg.resid_pdrop, kernels)(h_BxSxD, not train) + residual_BxSxD
        h_BxSxD = _layer_norm(cfg, "ln_1")(residual_BxSxD).astype(self.dtype)
        mlp = MLP(cfg, 4 * cfg.n_embd, cfg.n_embd, self.dtype, kernels, name="mlp")
        residual_BxSxD = residual_BxSxD + Dropout(cfg.resid_pdrop, kernels)(
            mlp(h_BxSxD, train), not train)
        return _layer_norm(cfg, "ln_2")(residual_BxSxD).astype(self.dtype)


class SenseNetwork(nn.Module):
    """Maps each token's embedding to K sense vectors; no positions, no mixing across tokens."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, embeds_BxSxD: jax.Array, train: bool) -> jax.Array:
        cfg, kernels = self.config, self.kernels
        residual_BxSxD = Dropout(cfg.embd_pdrop, kernels)(embeds_BxSxD, not train)
        h_BxSxD = _layer_norm(cfg, "ln")(residual_BxSxD).astype(self.dtype)
        h_BxSxD = NoMixBlock(cfg, self.dtype, kernels, name="block")(h_BxSxD, residual_BxSxD,
                                                                     train)
        senses_BxSxKD = MLP(cfg, cfg.sense_intermediate_scale * cfg.n_embd,
                            cfg.num_senses * cfg.n_embd, self.dtype, kernels,
                            name="final_mlp")(h_BxSxD, train)
        B, S, _ = senses_BxSxKD.shape
        # The projection's output index is sense * D + feature (sense-major).
        return senses_BxSxKD.reshape(B, S, cfg.num_senses, cfg.n_embd)


# ------------------------------------------------------------------------ the weight network

class WeightNetwork(nn.Module):
    """Per-sense queries and keys from the GPT-2 states (no values, no dropout)."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels

    @nn.compact
    def __call__(self, h_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queries and keys, [BK, S, E] each."""
        cfg = self.config
        B, S, _ = h_BxSxD.shape
        qk_BxSx2D = Dense(2 * cfg.n_embd, cfg.initializer_range, self.dtype, self.kernels,
                          name="c_attn")(h_BxSxD)
        # Output index = (query|key) * D + sense * E + feature.
        qk_BxSx2xKxE = qk_BxSx2D.reshape(B, S, 2, cfg.num_senses, cfg.sense_head_dim)
        return _fold(qk_BxSx2xKxE[:, :, 0]), _fold(qk_BxSx2xKxE[:, :, 1])


def contextualization_weights(q_BKxSxE: jax.Array, k_BKxTxE: jax.Array,
                              attend_BxSxT: jax.Array, batch: int) -> jax.Array:
    """alpha [B, K, S, T]: softmax over source positions of the scaled per-sense scores, in
    float32."""
    scale = 1.0 / math.sqrt(q_BKxSxE.shape[-1])
    scores_BxKxSxT = _scores(q_BKxSxE, k_BKxTxE.astype(q_BKxSxE.dtype), batch) * scale
    scores_BxKxSxT = scores_BxKxSxT + jnp.where(attend_BxSxT[:, None], 0.0, WEIGHT_NET_MASK_VALUE)
    return jax.nn.softmax(scores_BxKxSxT, axis=-1)


# ------------------------------------------------------------------------------ the Backpack

class Backpack(nn.Module):
    """The Backpack: a weighted sum of sense vectors, then the tied LM head."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels
    remat_policy: Any = None

    def setup(self):
        self.gpt2_model = GPT2Model(self.config, self.dtype, self.kernels, self.remat_policy)
        self.sense_network = SenseNetwork(self.config, self.dtype, self.kernels)
        self.sense_weight_net = WeightNetwork(self.config, self.dtype, self.kernels)

    def senses(self, input_ids_BxS: jax.Array, train: bool = False) -> jax.Array:
        """Sense vectors [B, S, K, D] of each token (they depend on the token alone)."""
        return self.sense_network(self.gpt2_model.wte(input_ids_BxS), train)

    def __call__(self, input_ids_BxS, position_ids_BxS, attend_BxSxT, *, train=False,
                 cache: DecodeCache | None = None, cache_index=0,
                 sense_edit: SenseEdit | None = None,
                 contextualization_BxKxSxT: jax.Array | None = None,
                 return_contextualization=False, return_senses=False):
        B = input_ids_BxS.shape[0]
        h_BxSxD, new_kv = self.gpt2_model(input_ids_BxS, position_ids_BxS, attend_BxSxT, train,
                                          cache, cache_index)
        senses_BxSxKxD = self.senses(input_ids_BxS, train)
        if sense_edit is not None:
            senses_BxSxKxD = sense_edit.edit(input_ids_BxS, senses_BxSxKxD)
        q_BKxSxE, k_BKxTxE = self.sense_weight_net(h_BxSxD)
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
        wte_VxD = self.gpt2_model.wte.embedding
        weights_BxKxSxT = alpha_BxKxSxT
        if sense_edit is not None:
            weights_BxKxSxT, edit_state = sense_edit.reweight(
                alpha_BxKxSxT, ReweightInputs(input_ids_BxS, senses_BKxTxD, attend_BxSxT,
                                              cache_index, wte_VxD),
                None if cache is None else cache.edit_state)
            if new_cache is not None:
                new_cache = new_cache.replace(edit_state=edit_state)
        o_BxSxD = self.kernels.sense_sum(weights_BxKxSxT, senses_BKxTxD, self.dtype)
        logits_BxSxV = self.kernels.lm_head(o_BxSxD.astype(self.dtype), wte_VxD.astype(self.dtype))
        out = BackpackOutput(
            logits=logits_BxSxV,
            contextualization=alpha_BxKxSxT if return_contextualization else None,
            senses=senses_BKxTxD.reshape(B, -1, *senses_BKxTxD.shape[1:]) if return_senses
            else None)
        return out, new_cache


class BackpackLM(nn.Module):
    """Top-level module; its only child is named `backpack` like the HF model's.

    `kernels=None` takes those of JAX's default backend (`kernels_for`).
    """

    config: BackpackConfig
    dtype: Any = jnp.float32
    remat_policy: Any = None  # Training only: see GPT2Model.remat_policy.
    kernels: Kernels | None = None

    def setup(self):
        kernels = self.kernels or kernels_for(jax.default_backend())
        self.backpack = Backpack(self.config, self.dtype, kernels, self.remat_policy)

    def __call__(self, *args, **kwargs):
        return self.backpack(*args, **kwargs)

    def senses(self, input_ids_BxS, train=False):
        return self.backpack.senses(input_ids_BxS, train)


# ------------------------------------------------------------------------------ the user API

def causal_mask(seq_len: int) -> jax.Array:
    """attend[i, j] = j <= i, shaped [1, S, S] to broadcast over the batch."""
    return jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None]


@functools.partial(jax.jit, static_argnames="config")
def init(config: BackpackConfig, rng: jax.Array) -> Params:
    """Fresh parameters with the paper's initialisation (float32); jitted, as eager init is slow."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = BackpackLM(config, kernels=PLAIN).init(rng, ids, jnp.arange(2)[None],
                                                      causal_mask(2))
    return variables["params"]


def abstract_params(config: BackpackConfig) -> Params:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    return jax.eval_shape(lambda: init(config, jax.random.PRNGKey(0)))


def count_params(tree: Any) -> int:
    """Number of parameters in a (possibly abstract) parameter tree or subtree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def embedding_VxD(params: Params) -> jax.Array:
    """The word embeddings E, tied with the LM head: the space every sense vector is read in."""
    return params["backpack"]["gpt2_model"]["wte"]["embedding"]


def sense_network(params: Params, ids_BxS: jax.Array, config: BackpackConfig) -> jax.Array:
    """Sense vectors [B, S, K, D] of token ids (they depend on the token alone): the sense
    network in eval mode, traceable inside a caller's jit."""
    return BackpackLM(config).apply({"params": params}, ids_BxS, method="senses")


@functools.partial(jax.jit, static_argnames="config")
def _sense_vectors(params: Params, ids_Cx1: jax.Array, config: BackpackConfig) -> jax.Array:
    return sense_network(params, ids_Cx1, config)[:, 0]


def sense_vectors(params: Params, config: BackpackConfig, token_ids: Any) -> jax.Array:
    """Sense vectors [C, K, D] of C token ids (no n_positions limit: each is its own row)."""
    ids_Cx1 = np.asarray(token_ids, dtype=np.int32).reshape(-1, 1)
    validate_token_ids(ids_Cx1, config, what="token_ids")
    return _sense_vectors(params, jnp.asarray(ids_Cx1), config)


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


@functools.partial(jax.jit, static_argnames=("config", "train", "return_contextualization",
                                             "return_senses", "dtype", "kernels"))
def _apply(params, input_ids, position_ids, rng, sense_edit, contextualization, *, config,
           train, return_contextualization, return_senses, dtype, kernels):
    def forward(input_ids_BxS, position_ids_BxS, contextualization_BxKxSxS):
        out, _ = BackpackLM(config, dtype, kernels=kernels).apply(
            {"params": params}, input_ids_BxS, position_ids_BxS,
            causal_mask(input_ids_BxS.shape[1]), train=train, sense_edit=sense_edit,
            contextualization_BxKxSxT=contextualization_BxKxSxS,
            return_contextualization=return_contextualization, return_senses=return_senses,
            rngs={"dropout": rng} if train else {})
        return out

    if not train:  # Dropout masks are drawn for the whole batch; chunks would draw other ones.
        forward = kernels.batch_forward(forward, *input_ids.shape)
    return forward(input_ids, position_ids, contextualization)


def apply(params: Params, input_ids: jax.Array, config: BackpackConfig, *,
          position_ids: jax.Array | None = None, train: bool = False,
          rng: jax.Array | None = None, return_contextualization: bool = False,
          return_senses: bool = False, dtype: Any = jnp.float32,
          sense_edit: SenseEdit | None = None, contextualization: jax.Array | None = None,
          kernels: Kernels | None = None) -> BackpackOutput:
    """Runs the Backpack LM on `input_ids` [B, S].

    Args:
      params: from `init` or `convert.load_hf`.
      config: the model's config (static under jit).
      position_ids: [B, S] or [S]; defaults to 0..S-1.
      train: enables dropout where the HF model has it; needs `rng`.
      return_contextualization / return_senses: also return alpha [B, K, S, S] (the model's,
        before a sense edit's `reweight`) / senses [B, K, S, D] (as edited).
      dtype: compute dtype (e.g. jnp.bfloat16); LayerNorm, softmax and logits stay float32.
      sense_edit: an intervention on sense vectors (see `backpack_jax.senses`).
      contextualization: use this alpha [B, K, S, S] instead of the model's (HF's
        `run_with_custom_contextualization`).
      kernels: how backend-tunable operations are computed; default `kernels_for` the default
        backend (`PLAIN` gives the plain forms everywhere).
    """
    validate_token_ids(input_ids, config)
    check_edit(sense_edit)
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
                  return_senses=return_senses, dtype=dtype,
                  kernels=kernels or kernels_for(jax.default_backend()))
