"""A PyTorch Backpack-GPT2 for transformers, with `generate()`, a cache, a mask and a loss.

Copied into every Hugging Face export next to `configuration_backpack.py`; loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Parameter names are those of
`stanfordnlp/backpack-gpt2`, so the same weights load here, in the authors' remote code and in
`backpack_jax.hf.load_hf`. The contextualizing Transformer is transformers' own `GPT2Model` in
eager attention (the path that honours `scale_attn_by_inverse_layer_idx`). Written for the
transformers 5 API (dataclass configs, the `cache` argument); tested with transformers 5.25.

A Backpack's output at position i is sum_k sum_j<=i alpha[k, i, j] * sense[k, j], projected by the
tied word embeddings. The cache therefore holds, besides GPT-2's keys and values, the weight
network's keys and the sense vectors of every position seen, so each new token costs one token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GenerationMixin,
    GPT2Config,
    GPT2Model,
    PreTrainedModel,
    initialization as init,
)
from transformers.activations import NewGELUActivation
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_backpack import BackpackGPT2Config

# The checkpoint adds this to masked scores (not -inf), so a row with every key masked stays finite.
# Defined here, not imported from backpack_jax.model: this file runs as remote code without it.
MASK_VALUE = -10000.0
_GPT2_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "layer_norm_epsilon", "initializer_range", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "bos_token_id",
                "eos_token_id")


@dataclass
class BackpackGPT2LMHeadModelOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus, on request, the Backpack's own intermediate values.

    contextualization: [B, K, S, T] the weights of the K senses of every position seen (T = cache
      length + S) in each of the S new positions' predictions.
    senses: [B, K, S, D] the sense vectors of the S new tokens.
    """

    contextualization: torch.Tensor | None = None
    senses: torch.Tensor | None = None


class BackpackCache(DynamicCache):
    """GPT-2's keys and values, plus the weight network's keys [B, T, K, E] and the senses
    [B, K, T, D] of the T positions seen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sense_keys = None
        self.senses = None

    def extend(self, sense_keys: torch.Tensor, senses: torch.Tensor):
        """Appends the new positions' keys and senses; returns those of every position seen."""
        if self.senses is not None:
            sense_keys = torch.cat([self.sense_keys, sense_keys], dim=1)
            senses = torch.cat([self.senses, senses], dim=2)
        self.sense_keys, self.senses = sense_keys, senses
        return sense_keys, senses

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.senses is not None:
            self.sense_keys = self.sense_keys.index_select(0, beam_idx.to(self.senses.device))
            self.senses = self.senses.index_select(0, beam_idx.to(self.senses.device))


class BackpackMLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, pdrop: float):
        super().__init__()
        self.c_fc = Conv1D(hidden, d_in)
        self.c_proj = Conv1D(d_out, hidden)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class BackpackNoMixBlock(nn.Module):
    """A Transformer block without attention: each position on its own (senses ignore context)."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = BackpackMLP(d, 4 * d, d, config.resid_pdrop)
        self.resid_dropout1 = nn.Dropout(config.resid_pdrop)
        self.resid_dropout2 = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden, residual):
        residual = self.resid_dropout1(hidden) + residual
        residual = self.resid_dropout2(self.mlp(self.ln_1(residual))) + residual
        return self.ln_2(residual)


class BackpackSenseNetwork(nn.Module):
    """Word embeddings [B, S, D] -> sense vectors [B, K, S, D]."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        d = config.n_embd
        self.num_senses = config.num_senses
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.block = BackpackNoMixBlock(config)
        self.final_mlp = BackpackMLP(d, config.sense_intermediate_scale * d,
                                     config.num_senses * d, config.resid_pdrop)

    def forward(self, embeds):
        residual = self.dropout(embeds)
        senses = self.final_mlp(self.block(self.ln(residual), residual))
        b, s, kd = senses.shape
        # The checkpoint's output index is sense * D + feature (sense-major).
        return senses.reshape(b, s, self.num_senses, kd // self.num_senses).transpose(1, 2)


class BackpackWeightNetwork(nn.Module):
    """GPT-2's hidden states -> per-sense queries and keys [B, S, K, E]; their causal softmax is
    the contextualization alpha."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        self.num_senses = config.num_senses
        self.head_dim = config.n_embd // config.num_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)

    def forward(self, hidden):
        b, s, _ = hidden.shape
        return self.c_attn(hidden).reshape(b, s, 2, self.num_senses, self.head_dim).unbind(dim=2)

    def contextualization(self, queries, keys, attention_mask=None):
        """alpha [B, K, S, T] of the S newest positions over all T; `attention_mask` [B, T] hides
        padding."""
        s, t = queries.shape[1], keys.shape[1]
        scores = torch.einsum("bske,btke->bkst", queries, keys) / math.sqrt(self.head_dim)
        allowed = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s)[None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, -t:].bool()
        scores = scores + torch.where(allowed, 0.0, MASK_VALUE)[:, None].to(scores.dtype)
        return torch.softmax(scores, dim=-1)


class BackpackSenseDelta(nn.Module):
    """A learned sense edit (backpack_jax.sense_finetune.SenseDelta): delta[r] is added to sense
    `sense[r]` of token `token[r]` wherever it occurs. Buffers, so they load with the weights;
    an export without an edit has zero pairs."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        pairs = getattr(config, "sense_delta_pairs", 0)
        kept = pairs > 0  # without an edit nothing is saved or expected in the weights
        self.register_buffer("token", torch.zeros(pairs, dtype=torch.long), persistent=kept)
        self.register_buffer("sense", torch.zeros(pairs, dtype=torch.long), persistent=kept)
        self.register_buffer("delta", torch.zeros(pairs, config.n_embd), persistent=kept)

    def forward(self, input_ids, senses):
        """senses [B, K, S, D] of `input_ids` [B, S], with the deltas added."""
        if self.token.numel() == 0:
            return senses
        hit = (input_ids[..., None] == self.token).to(senses.dtype)  # [B, S, R]
        at = F.one_hot(self.sense, senses.shape[1]).to(senses.dtype)  # [R, K]
        return senses + torch.einsum("bsr,rk,rd->bksd", hit, at, self.delta.to(senses.dtype))


class BackpackGPT2Model(nn.Module):
    """The checkpoint's `backpack` module: GPT-2, the sense network and the weight network."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__()
        gpt2 = GPT2Config(**{k: getattr(config, k) for k in _GPT2_FIELDS},
                          attn_implementation="eager")
        self.gpt2_model = GPT2Model(gpt2)
        self.sense_network = BackpackSenseNetwork(config)
        self.sense_weight_net = BackpackWeightNetwork(config)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.gpt2_model.wte

    @property
    def position_embeddings(self) -> nn.Embedding:
        return self.gpt2_model.wpe


class BackpackGPT2PreTrainedModel(PreTrainedModel):
    config_class = BackpackGPT2Config
    base_model_prefix = "backpack"
    _no_split_modules = ["GPT2Block"]

    def _init_weights(self, module):
        """GPT-2's initialization for the sense and weight networks (GPT2Model inits its own)."""
        if isinstance(module, (Conv1D, nn.Linear)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class BackpackGPT2LMHeadModel(BackpackGPT2PreTrainedModel, GenerationMixin):
    """A Backpack language model: logits = E @ sum over senses of alpha @ senses, E tied to the
    word embeddings (no separate LM head weights)."""

    def __init__(self, config: BackpackGPT2Config):
        super().__init__(config)
        self.backpack = BackpackGPT2Model(config)
        self.sense_delta = BackpackSenseDelta(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backpack.gpt2_model.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backpack.gpt2_model.wte = value

    def senses(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Sense vectors [B, K, S, D] of each token (they do not depend on context), with the
        learned sense edit if the export carries one."""
        senses = self.backpack.sense_network(self.backpack.gpt2_model.wte(input_ids))
        return self.sense_delta(input_ids, senses)

    def _output(self, contextualization, senses, all_senses, labels, cache,
                output_contextualization, output_senses):
        hidden = torch.einsum("bkst,bktd->bsd", contextualization, all_senses)
        logits = F.linear(hidden, self.backpack.gpt2_model.wte.weight)
        loss = None
        if labels is not None:  # Position i predicts token i + 1.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return BackpackGPT2LMHeadModelOutput(
            loss=loss, logits=logits, cache=cache,
            contextualization=contextualization if output_contextualization else None,
            senses=senses if output_senses else None)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")  # As transformers' GPT-2.
    def forward(self, input_ids: torch.LongTensor, cache: DynamicCache | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                output_contextualization: bool = False, output_senses: bool = False,
                **kwargs) -> BackpackGPT2LMHeadModelOutput:
        """Logits [B, S, V] of the S new tokens.

        attention_mask: [B, cache length + S], 0 on (left) padding. Without `position_ids`,
          positions count from each row's first real token.
        labels: [B, S]; the loss is the mean cross-entropy of predicting labels[:, 1:] (-100 is
          ignored), so `labels=input_ids` gives the language-modelling loss.
        cache: a `BackpackCache` from an earlier call (an empty cache of another kind is
          replaced).
        """
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and not isinstance(cache, BackpackCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"a Backpack needs a BackpackCache, got a filled "
                                 f"{type(cache).__name__}")
            cache = BackpackCache()
        if not use_cache:
            cache = None
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = position_ids[:, -input_ids.shape[1]:]
        # GPT-2's position table would fail with a bare IndexError past its end.
        reach = (int(position_ids.max()) + 1 if position_ids is not None else
                 (cache.get_seq_length() if cache is not None else 0) + input_ids.shape[1])
        if reach > self.config.n_positions:
            raise ValueError(f"the input reaches position {reach}, past this model's "
                             f"n_positions={self.config.n_positions}")
        hidden = self.backpack.gpt2_model(input_ids, cache=cache, attention_mask=attention_mask,
                                          position_ids=position_ids,
                                          use_cache=use_cache).last_hidden_state
        queries, keys = self.backpack.sense_weight_net(hidden)
        senses = self.senses(input_ids)
        all_keys, all_senses = cache.extend(keys, senses) if use_cache else (keys, senses)
        contextualization = self.backpack.sense_weight_net.contextualization(
            queries, all_keys, attention_mask)
        return self._output(contextualization, senses, all_senses, labels, cache,
                            output_contextualization, output_senses)

    def run_with_custom_contextualization(self, input_ids: torch.LongTensor,
                                          contextualization: torch.Tensor,
                                          labels: torch.LongTensor | None = None
                                          ) -> BackpackGPT2LMHeadModelOutput:
        """Logits from the given alpha [B, K, S, S] instead of the weight network's (no cache)."""
        senses = self.senses(input_ids)
        return self._output(contextualization, senses, senses, labels, None, True, True)
