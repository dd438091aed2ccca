"""An independent PyTorch Backpack with the Hugging Face parameter names: the reference that the
parity tests and the benchmark compare against.

The HF remote code cannot be fetched offline, so this is written from the paper (Hewitt et al.,
ACL 2023). The contextualizing Transformer is transformers' own `GPT2Model` in eager attention
(the only path that honours `scale_attn_by_inverse_layer_idx` in every transformers version), so
the backbone is not ours. Module names match the HF model, aliases included, so `state_dict()`
has exactly the keys of the original `pytorch_model.bin` minus its attention-mask buffers.
Needs the `bench` extra (torch and transformers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.activations import NewGELUActivation
from transformers.pytorch_utils import Conv1D

from backpack_jax.config import BackpackConfig

MASK_VALUE = -10000.0
# Weight std = WEIGHT_GAIN / sqrt(fan_in): pre-activations of order 1 at every width.
WEIGHT_GAIN = 1.5


def gpt2_config(config: BackpackConfig) -> GPT2Config:
    fields = {k: v for k, v in config.to_hf_dict().items()
              if k not in ("model_type", "architectures")}
    return GPT2Config(**fields, use_cache=False, attn_implementation="eager")


class _MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, pdrop: float):
        super().__init__()
        self.c_fc = Conv1D(hidden, d_in)
        self.c_proj = Conv1D(d_out, hidden)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class _NoMixBlock(nn.Module):
    def __init__(self, config: BackpackConfig):
        super().__init__()
        d, eps = config.n_embd, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = _MLP(d, 4 * d, d, config.resid_pdrop)
        self.resid_dropout1 = nn.Dropout(config.resid_pdrop)
        self.resid_dropout2 = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden, residual):
        residual = self.resid_dropout1(hidden) + residual
        residual = self.resid_dropout2(self.mlp(self.ln_1(residual))) + residual
        return self.ln_2(residual)


class _SenseNetwork(nn.Module):
    def __init__(self, config: BackpackConfig):
        super().__init__()
        d = config.n_embd
        self.config = config
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.block = _NoMixBlock(config)
        self.final_mlp = _MLP(d, config.sense_intermediate_scale * d, config.num_senses * d,
                              config.resid_pdrop)

    def forward(self, embeds):
        residual = self.dropout(embeds)
        senses = self.final_mlp(self.block(self.ln(residual), residual))
        b, s, _ = senses.shape
        # Output index = sense * d + feature; return [B, K, S, D].
        return senses.reshape(b, s, self.config.num_senses, self.config.n_embd).transpose(1, 2)


class _WeightNetwork(nn.Module):
    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.k, self.e = config.num_senses, config.sense_head_dim
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd)

    def forward(self, h):
        b, s, _ = h.shape
        q, k = self.c_attn(h).reshape(b, s, 2, self.k, self.e).unbind(dim=2)
        scores = torch.einsum("bske,btke->bkst", q, k) / math.sqrt(self.e)
        scores = scores + torch.triu(torch.full((s, s), MASK_VALUE), diagonal=1)
        return torch.softmax(scores, dim=-1)


class _Backpack(nn.Module):
    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.gpt2_model = GPT2Model(gpt2_config(config))
        self.word_embeddings = self.gpt2_model.wte  # The HF model's aliases.
        self.position_embeddings = self.gpt2_model.wpe
        self.sense_network = _SenseNetwork(config)
        self.sense_weight_net = _WeightNetwork(config)


class TorchBackpackLM(nn.Module):
    """forward(input_ids) -> (logits [B,S,V], contextualization [B,K,S,S])."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.config = config
        self.backpack = _Backpack(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.backpack.gpt2_model.wte.weight

    def senses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, K, S, D]."""
        return self.backpack.sense_network(self.backpack.word_embeddings(input_ids))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                contextualization: torch.Tensor | None = None):
        h = self.backpack.gpt2_model(input_ids, position_ids=position_ids).last_hidden_state
        if contextualization is None:
            contextualization = self.backpack.sense_weight_net(h)
        hidden = torch.sum(contextualization @ self.senses(input_ids), dim=1)
        return self.lm_head(hidden), contextualization

    def canonical_tensors(self) -> dict[str, np.ndarray]:
        """The state dict with each tied tensor once, under its canonical HF name, as numpy."""
        aliases = {"backpack.word_embeddings.weight", "backpack.position_embeddings.weight",
                   "lm_head.weight"}
        return {k: v.detach().numpy().copy() for k, v in self.state_dict().items()
                if k not in aliases}

    def load_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Loads HF tensors in any layout; every parameter must be set under one of its names."""
        state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in tensors.items()
                 if np.asarray(v).dtype.kind == "f"}
        result = self.load_state_dict(state, strict=False)
        loaded = set(self.state_dict()) - set(result.missing_keys)
        names_by_param: dict[int, list[str]] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            names_by_param.setdefault(id(p), []).append(name)
        unset = [names for names in names_by_param.values() if not loaded & set(names)]
        unexpected = [k for k in result.unexpected_keys
                      if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if unset or unexpected:
            raise ValueError(f"reference load: unset {unset}, unexpected {unexpected}")


def random_reference(config: BackpackConfig, seed: int) -> TorchBackpackLM:
    """A reference model in eval mode whose weights have real spread (errors would show).

    Weights ~ N(0, 0.2), embeddings ~ N(0, 0.3), biases ~ N(0, 0.1), LayerNorm scales
    1 + U(-0.3, 0.3) with biases ~ N(0, 0.1).
    """
    ref = TorchBackpackLM(config).eval()
    layer_norms = {id(m.weight) for m in ref.modules() if isinstance(m, nn.LayerNorm)}
    embeddings = {id(ref.backpack.gpt2_model.wte.weight), id(ref.backpack.gpt2_model.wpe.weight)}
    fan_in = {id(m.weight): m.weight.shape[0] for m in ref.modules() if isinstance(m, Conv1D)}
    fan_in |= {id(m.weight): m.in_features for m in ref.modules() if isinstance(m, nn.Linear)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            noise = torch.randn(p.shape, generator=generator)
            if id(p) in layer_norms:
                p.copy_(1.0 + 0.3 * (2 * torch.rand(p.shape, generator=generator) - 1))
            elif id(p) in embeddings:
                p.copy_(0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(WEIGHT_GAIN / math.sqrt(fan_in[id(p)]) * noise)
    return ref
