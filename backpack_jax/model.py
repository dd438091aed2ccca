"""Backpack-GPT2 (Hewitt et al., ACL 2023) in Flax linen, and the `init` / `apply` users call.

In the paper's order: a GPT-2 Transformer contextualizes the input; the sense network maps each
word to K sense vectors C(x); the weight network turns the Transformer's states into K causal
weight matrices alpha; position i's output is o_i = sum_l sum_j alpha[l, i, j] C(x_j)_l and its
logits are E o_i, E the tied word embeddings (no bias, no final LayerNorm, no division by K). A
`SenseEdit` (edits.py) may rewrite the sense vectors and the weights that replace alpha.

The parameter tree mirrors HF's module tree (`backpack/gpt2_model/h_3/attn/c_attn` is
`backpack.gpt2_model.h.3.attn.c_attn`), so the converter's name table reads like a table.

One code path serves the full pass and cached decoding: every attention takes queries for the S
new positions and keys for the T positions it may see (`attend_BxSxT`); a `DecodeCache`
(decode_cache.py) holds them in fixed-size buffers. The full pass is the case T = S with no
cache. A few operations have faster forms on some backends (`Kernels`): the plain forms are
here, XLA:CPU's in xla_cpu.py.
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

from backpack_jax import checks, xla_cpu
from backpack_jax.config import BackpackConfig
from backpack_jax.decode_cache import DecodeCache, write_at
from backpack_jax.edits import ReweightInputs, SenseEdit, check_edit

Params = Any
# HF's weight network adds this constant above the diagonal (not -inf); we keep it for parity.
WEIGHT_NET_MASK_VALUE = -10000.0


@flax.struct.dataclass
class BackpackOutput:
    logits: jax.Array  # [B, S, V], float32
    contextualization: jax.Array | None = None  # [B, K, S, T] alpha (before any reweight)
    senses: jax.Array | None = None  # [B, K, T, D] sense vectors, as edited


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


PLAIN = Kernels()
XLA_CPU = Kernels(matmul=xla_cpu.matmul, keep_mask=xla_cpu.keep_mask, residual=xla_cpu.residual,
                  sense_sum=xla_cpu.sense_sum, lm_head=xla_cpu.lm_head)


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


class Layer(nn.Module):
    """A part of the model: its config, compute dtype and kernels (the fields every part has)."""

    config: BackpackConfig
    dtype: Any
    kernels: Kernels

    def dense(self, features: int, name: str, output_proj: bool = False) -> Dense:
        """A Dense layer; a residual branch's output projection (`output_proj`) starts smaller,
        as GPT-2's, by 1 / sqrt(2 n_layer)."""
        std = self.config.initializer_range
        if output_proj:
            std /= math.sqrt(2 * self.config.n_layer)
        return Dense(features, std, self.dtype, self.kernels, name=name)

    def dropout(self, rate: float) -> Dropout:
        return Dropout(rate, self.kernels)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        """LayerNorm in float32 whatever the compute dtype, with torch's two-pass variance."""
        return nn.LayerNorm(epsilon=self.config.layer_norm_epsilon, dtype=jnp.float32,
                            param_dtype=jnp.float32, use_fast_variance=False, name=name)


class MLP(Layer):
    """c_fc -> gelu_new -> c_proj -> dropout, as every MLP in the HF model."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, train: bool) -> jax.Array:
        h_BxSxF = self.dense(self.hidden, "c_fc")(x_BxSxD)
        h_BxSxF = jax.nn.gelu(h_BxSxF, approximate=True)  # gelu_new is the tanh approximation.
        out_BxSxO = self.dense(self.out, "c_proj", output_proj=True)(h_BxSxF)
        return self.dropout(self.config.resid_pdrop)(out_BxSxO, not train)


# ------------------------------------------------------------------- the GPT-2 Transformer

def _fold(x_BxSxHxE: jax.Array) -> jax.Array:
    """[B, S, H, E] -> [BH, S, E]: one leading axis for batch and heads (or senses)."""
    B, S, H, E = x_BxSxHxE.shape
    return x_BxSxHxE.transpose(0, 2, 1, 3).reshape(B * H, S, E)


def _scores(q_BHxSxE: jax.Array, k_BHxTxE: jax.Array, batch: int) -> jax.Array:
    """q . k for every query and key position, in float32: [B, H, S, T]."""
    scores_BHxSxT = jnp.einsum("nse,nte->nst", q_BHxSxE, k_BHxTxE,
                               preferred_element_type=jnp.float32)
    return scores_BHxSxT.reshape(batch, -1, *scores_BHxSxT.shape[1:])


class Attention(Layer):
    """GPT-2 causal self-attention, optionally reading and writing a KV cache."""

    layer_idx: int

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, attend_BxSxT: jax.Array, train: bool,
                 kv: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | int
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.config
        B, S, D = x_BxSxD.shape
        H = cfg.n_head
        q_BHxSxE, k_BHxTxE, v_BHxTxE = (_fold(t.reshape(B, S, H, cfg.head_dim)) for t in
                                        jnp.split(self.dense(3 * D, "c_attn")(x_BxSxD), 3, -1))
        if kv is not None:
            kv = (write_at(kv[0], k_BHxTxE, cache_index), write_at(kv[1], v_BHxTxE, cache_index))
            k_BHxTxE, v_BHxTxE = kv
        scale = (1 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0) / (
            self.layer_idx + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        scores_BxHxSxT = _scores(q_BHxSxE, k_BHxTxE.astype(self.dtype), B) * scale
        scores_BxHxSxT = jnp.where(attend_BxSxT[:, None], scores_BxHxSxT,
                                   jnp.finfo(jnp.float32).min)
        probs_BxHxSxT = jax.nn.softmax(scores_BxHxSxT, axis=-1)
        probs_BHxSxT = self.dropout(cfg.attn_pdrop)(probs_BxHxSxT, not train).reshape(B * H, S, -1)
        out_BHxSxE = jnp.einsum("nst,nte->nse", probs_BHxSxT.astype(self.dtype),
                                v_BHxTxE.astype(self.dtype), preferred_element_type=jnp.float32)
        out_BxSxHxE = out_BHxSxE.astype(self.dtype).reshape(B, H, S, -1).transpose(0, 2, 1, 3)
        out_BxSxD = self.dense(D, "c_proj", output_proj=True)(out_BxSxHxE.reshape(B, S, D))
        return self.dropout(cfg.resid_pdrop)(out_BxSxD, not train), kv


class Block(Layer):
    """Pre-LN GPT-2 block."""

    layer_idx: int

    @nn.compact
    def __call__(self, x_BxSxD, attend_BxSxT, train, kv, cache_index):
        cfg, residual = self.config, self.kernels.residual
        x_BxSxD = residual(x_BxSxD)
        h_BxSxD = self.layer_norm("ln_1")(x_BxSxD).astype(self.dtype)
        a_BxSxD, kv = Attention(cfg, self.dtype, self.kernels, self.layer_idx, name="attn")(
            h_BxSxD, attend_BxSxT, train, kv, cache_index)
        x_BxSxD = residual(x_BxSxD + a_BxSxD)
        h_BxSxD = self.layer_norm("ln_2")(x_BxSxD).astype(self.dtype)
        mlp = MLP(cfg, self.dtype, self.kernels, cfg.inner_dim, cfg.n_embd, name="mlp")
        return x_BxSxD + mlp(h_BxSxD, train), kv


class GPT2Model(Layer):
    """The GPT-2 Transformer whose final states feed the weight network."""

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
        self.drop = self.dropout(cfg.embd_pdrop)
        self.h = [block(cfg, self.dtype, self.kernels, i) for i in range(cfg.n_layer)]
        self.ln_f = self.layer_norm("ln_f")

    def __call__(self, input_ids_BxS, position_ids_BxS, attend_BxSxT, train, cache, cache_index):
        """(final states [B, S, D], each layer's KV buffers with the new positions written)."""
        x_BxSxD = self.wte(input_ids_BxS) + self.wpe(position_ids_BxS)
        x_BxSxD = self.drop(x_BxSxD, deterministic=not train)
        new_kv = []
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_BxSxD, kv = block(x_BxSxD, attend_BxSxT, train, kv, cache_index)
            new_kv.append(kv)
        return self.ln_f(x_BxSxD).astype(self.dtype), new_kv


# -------------------------------------------------------------------------- the sense network

class NoMixBlock(Layer):
    """The sense network's residual block: takes (hidden, residual), mixes no positions."""

    @nn.compact
    def __call__(self, h_BxSxD, residual_BxSxD, train):
        cfg = self.config
        residual_BxSxD = self.dropout(cfg.resid_pdrop)(h_BxSxD, not train) + residual_BxSxD
        h_BxSxD = self.layer_norm("ln_1")(residual_BxSxD).astype(self.dtype)
        mlp = MLP(cfg, self.dtype, self.kernels, 4 * cfg.n_embd, cfg.n_embd, name="mlp")
        residual_BxSxD = residual_BxSxD + self.dropout(cfg.resid_pdrop)(
            mlp(h_BxSxD, train), not train)
        return self.layer_norm("ln_2")(residual_BxSxD).astype(self.dtype)


class SenseNetwork(Layer):
    """Maps each token's embedding to K sense vectors; no positions, no mixing across tokens."""

    @nn.compact
    def __call__(self, embeds_BxSxD: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        residual_BxSxD = self.dropout(cfg.embd_pdrop)(embeds_BxSxD, not train)
        h_BxSxD = self.layer_norm("ln")(residual_BxSxD).astype(self.dtype)
        h_BxSxD = NoMixBlock(cfg, self.dtype, self.kernels, name="block")(
            h_BxSxD, residual_BxSxD, train)
        senses_BxSxKD = MLP(cfg, self.dtype, self.kernels, cfg.sense_intermediate_scale *
                            cfg.n_embd, cfg.num_senses * cfg.n_embd, name="final_mlp")(h_BxSxD,
                                                                                      train)
        B, S, _ = senses_BxSxKD.shape
        # The projection's output index is sense * D + feature (sense-major).
        return senses_BxSxKD.reshape(B, S, cfg.num_senses, cfg.n_embd)


# ------------------------------------------------------------------------ the weight network

class WeightNetwork(Layer):
    """Per-sense queries and keys from the GPT-2 states (no values, no dropout)."""

    @nn.compact
    def __call__(self, h_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Queries and keys, [BK, S, E] each."""
        cfg = self.config
        B, S, _ = h_BxSxD.shape
        # Output index = (query|key) * D + sense * E + feature.
        qk_BxSx2xKxE = self.dense(2 * cfg.n_embd, "c_attn")(h_BxSxD).reshape(
            B, S, 2, cfg.num_senses, cfg.sense_head_dim)
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

class Backpack(Layer):
    """HF's `backpack` module: the three networks, which `BackpackLM` combines."""

    remat_policy: Any = None  # Training only: see GPT2Model.remat_policy.

    def setup(self):
        parts = self.config, self.dtype, self.kernels
        self.gpt2_model = GPT2Model(*parts, self.remat_policy)
        self.sense_network = SenseNetwork(*parts)
        self.sense_weight_net = WeightNetwork(*parts)


class BackpackLM(nn.Module):
    """The Backpack LM: a weighted sum of sense vectors, then the tied LM head. Like HF's
    BackpackGPT2LMHeadModel it combines the networks of its one child, `backpack`, so parameter
    paths (and Flax's random draws, derived from them) are HF's. `kernels=None` takes those of
    JAX's default backend (`kernels_for`)."""

    config: BackpackConfig
    dtype: Any = jnp.float32
    remat_policy: Any = None  # Training only: see GPT2Model.remat_policy.
    kernels: Kernels | None = None

    def setup(self):
        self.ops = self.kernels or kernels_for(jax.default_backend())
        self.backpack = Backpack(self.config, self.dtype, self.ops, self.remat_policy)

    def senses(self, input_ids_BxS: jax.Array, train: bool = False) -> jax.Array:
        """Sense vectors [B, S, K, D] of each token (they depend on the token alone)."""
        backpack = self.backpack
        return backpack.sense_network(backpack.gpt2_model.wte(input_ids_BxS), train)

    def __call__(self, input_ids_BxS, position_ids_BxS, attend_BxSxT, *, train=False,
                 cache: DecodeCache | None = None, cache_index=0,
                 sense_edit: SenseEdit | None = None, alpha_BxKxSxT: jax.Array | None = None
                 ) -> tuple[BackpackOutput, DecodeCache | None]:
        """(output, `cache` with the S new positions written at `cache_index`).

        `alpha_BxKxSxT` replaces the weight network's (HF's run_with_custom_contextualization).
        """
        edit = SenseEdit() if sense_edit is None else sense_edit
        gpt2 = self.backpack.gpt2_model
        h_BxSxD, kv = gpt2(input_ids_BxS, position_ids_BxS, attend_BxSxT, train, cache,
                           cache_index)
        senses_BKxSxD = _fold(edit.edit(input_ids_BxS, self.senses(input_ids_BxS, train)))
        q_BKxSxE, k_BKxSxE = self.backpack.sense_weight_net(h_BxSxD)
        k_BKxTxE, senses_BKxTxD, edit_state = k_BKxSxE, senses_BKxSxD, None
        if cache is not None:
            cache = cache.write(cache_index, kv, k_BKxSxE, senses_BKxSxD)
            k_BKxTxE, senses_BKxTxD = cache.sense_keys_BKxTxE, cache.senses_BKxTxD
            edit_state = cache.edit_state
        B = input_ids_BxS.shape[0]
        if alpha_BxKxSxT is None:
            alpha_BxKxSxT = contextualization_weights(q_BKxSxE, k_BKxTxE, attend_BxSxT, B)
        wte_VxD = gpt2.wte.embedding
        weights_BxKxSxT, edit_state = edit.reweight(alpha_BxKxSxT, ReweightInputs(
            input_ids_BxS, senses_BKxTxD, attend_BxSxT, cache_index, wte_VxD), edit_state)
        o_BxSxD = self.ops.sense_sum(weights_BxKxSxT, senses_BKxTxD, self.dtype)
        logits_BxSxV = self.ops.lm_head(o_BxSxD.astype(self.dtype), wte_VxD.astype(self.dtype))
        out = BackpackOutput(logits_BxSxV, alpha_BxKxSxT,
                             senses_BKxTxD.reshape(B, -1, *senses_BKxTxD.shape[1:]))
        return out, None if cache is None else cache.replace(edit_state=edit_state)


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
    checks.validate_token_ids(ids_Cx1, config, what="token_ids")
    return _sense_vectors(params, jnp.asarray(ids_Cx1), config)


@functools.partial(jax.jit, static_argnames=("config", "train", "return_contextualization",
                                             "return_senses", "dtype", "kernels", "chunk_tokens"))
def _apply(params, input_ids, position_ids, rng, sense_edit, contextualization, *, config,
           train, return_contextualization, return_senses, dtype, kernels, chunk_tokens):
    def forward(input_ids_BxS, position_ids_BxS, contextualization_BxKxSxS):
        out, _ = BackpackLM(config, dtype, kernels=kernels).apply(
            {"params": params}, input_ids_BxS, position_ids_BxS,
            causal_mask(input_ids_BxS.shape[1]), train=train, sense_edit=sense_edit,
            alpha_BxKxSxT=contextualization_BxKxSxS, rngs={"dropout": rng} if train else {})
        return BackpackOutput(out.logits,
                              out.contextualization if return_contextualization else None,
                              out.senses if return_senses else None)

    if chunk_tokens:
        forward = xla_cpu.in_row_chunks(forward, *input_ids.shape, tokens=chunk_tokens)
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
      sense_edit: a `backpack_jax.edits.SenseEdit` (an intervention, a sense table, ...).
      contextualization: use this alpha [B, K, S, S] instead of the model's (HF's
        `run_with_custom_contextualization`).
      kernels: how backend-tunable operations are computed; default `kernels_for` the default
        backend (`PLAIN` gives the plain forms everywhere).
    """
    checks.validate_token_ids(input_ids, config)
    check_edit(sense_edit)
    B, S = input_ids.shape
    position_ids = checks.position_ids(position_ids, config, B, S)
    if train and rng is None:
        raise ValueError("apply(train=True) needs an `rng` for dropout")
    checks.shape("contextualization", contextualization, (B, config.num_senses, S, S))
    kernels = kernels or kernels_for(jax.default_backend())
    # How the batch runs: XLA's CPU GEMMs run chunks of whole rows faster than the whole batch.
    # Not in training: its dropout masks are drawn for the whole batch, chunks would draw others.
    chunk_tokens = xla_cpu.TOKENS_PER_CHUNK if kernels == XLA_CPU and not train else 0
    return _apply(params, input_ids, position_ids, rng, sense_edit, contextualization,
                  config=config, train=train, return_contextualization=return_contextualization,
                  return_senses=return_senses, dtype=dtype, kernels=kernels,
                  chunk_tokens=chunk_tokens)
