"""The tests' independent PyTorch Backpack: plain torch functions of a Hugging Face state dict.

Written from the paper (Hewitt et al., ACL 2023) and the checkpoint's tensor layout, apart from
both this project's model and its PyTorch export (`convert/hf_export/modeling_backpack.py`,
which tests/test_hf_export.py checks against this). The contextualizing Transformer is
transformers' own `GPT2Model` in eager attention, the only path that honours
`scale_attn_by_inverse_layer_idx` in every transformers version; the sense network, the weight
network, alpha and the sum over senses are written out here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model

from backpack_jax.config import BackpackConfig

# The checkpoint adds this (not -inf) to the weight network's scores above the diagonal.
MASK = -10000.0
GPT2 = "backpack.gpt2_model."
SENSES = "backpack.sense_network."
WEIGHTS = "backpack.sense_weight_net.c_attn."
# Other names of the same tensors in some files (the original also stores them all).
ALIASES = {"backpack.word_embeddings.weight": GPT2 + "wte.weight",
           "lm_head.weight": GPT2 + "wte.weight",
           "backpack.position_embeddings.weight": GPT2 + "wpe.weight"}
BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's old causal-mask buffers, not weights


def hf_shapes(config: BackpackConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Backpack-GPT2 checkpoint under its canonical name, with its shape.

    GPT-2's Conv1D stores [in, out]; the weight network's nn.Linear stores [out, in].
    """
    D, F_ = config.n_embd, config.n_inner or 4 * config.n_embd
    shapes = {GPT2 + "wte.weight": (config.vocab_size, D),
              GPT2 + "wpe.weight": (config.n_positions, D)}
    layer_norms = [f"{GPT2}h.{i}.{ln}" for i in range(config.n_layer) for ln in ("ln_1", "ln_2")]
    layer_norms += [GPT2 + "ln_f"] + [SENSES + ln for ln in ("ln", "block.ln_1", "block.ln_2")]
    for ln in layer_norms:
        shapes |= {f"{ln}.weight": (D,), f"{ln}.bias": (D,)}
    convs = {}
    for i in range(config.n_layer):
        convs |= {f"{GPT2}h.{i}.attn.c_attn": (D, 3 * D), f"{GPT2}h.{i}.attn.c_proj": (D, D),
                  f"{GPT2}h.{i}.mlp.c_fc": (D, F_), f"{GPT2}h.{i}.mlp.c_proj": (F_, D)}
    hidden = config.sense_intermediate_scale * D
    convs |= {SENSES + "block.mlp.c_fc": (D, 4 * D), SENSES + "block.mlp.c_proj": (4 * D, D),
              SENSES + "final_mlp.c_fc": (D, hidden),
              SENSES + "final_mlp.c_proj": (hidden, config.num_senses * D)}
    for name, (n_in, n_out) in convs.items():
        shapes |= {f"{name}.weight": (n_in, n_out), f"{name}.bias": (n_out,)}
    return shapes | {WEIGHTS + "weight": (2 * D, D), WEIGHTS + "bias": (2 * D,)}


def random_tensors(config: BackpackConfig, seed: int) -> dict[str, np.ndarray]:
    """Canonical float32 tensors with real spread, so that any error shows in the logits:
    weights ~ N(0, 1.5^2 / fan_in) (pre-activations of order 1 at every width), embeddings
    ~ N(0, 0.3^2), biases ~ N(0, 0.1^2), LayerNorm scales 1 + U(-0.3, 0.3)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in hf_shapes(config).items():
        if len(shape) == 1 and name.endswith("weight"):  # the only 1-D weights: LayerNorm's
            value = 1.0 + rng.uniform(-0.3, 0.3, shape)
        elif len(shape) == 1:
            value = rng.normal(0.0, 0.1, shape)
        elif name.endswith(("wte.weight", "wpe.weight")):
            value = rng.normal(0.0, 0.3, shape)
        else:
            fan_in = shape[1] if name.startswith(WEIGHTS) else shape[0]
            value = rng.normal(0.0, 1.5 / math.sqrt(fan_in), shape)
        tensors[name] = value.astype(np.float32)
    return tensors


def canonical(tensors: Mapping[str, np.ndarray], config: BackpackConfig
              ) -> dict[str, np.ndarray]:
    """A checkpoint's tensors in any layout (aliases, mask buffers) under their canonical names;
    raises unless exactly the checkpoint's tensors, with their shapes, are there."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(BUFFERS):
            continue
        out.setdefault(ALIASES.get(name, name), np.asarray(value, np.float32))
    want = hf_shapes(config)
    got = {name: tuple(value.shape) for name, value in out.items()}
    if got != want:
        wrong = sorted(set(got.items()) ^ set(want.items()))
        raise ValueError(f"not a Backpack-GPT2 state dict for this config: {wrong[:6]}")
    return out


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Reference:
    """`ref(ids)` -> (logits [B, S, V], alpha [B, K, S, S]) in eval mode, float32 torch tensors.

    Every tensor is a leaf that collects gradients (`grads`), under its canonical name.
    """

    def __init__(self, config: BackpackConfig, tensors: Mapping[str, np.ndarray]):
        self.config = config
        self.tensors = canonical(tensors, config)
        fields = {k: v for k, v in config.to_hf_dict().items()
                  if k not in ("model_type", "architectures")}
        self.gpt2 = GPT2Model(GPT2Config(**fields, use_cache=False,
                                         attn_implementation="eager")).eval()
        self.gpt2.load_state_dict({name[len(GPT2):]: torch.from_numpy(value.copy())
                                   for name, value in self.tensors.items()
                                   if name.startswith(GPT2)}, strict=True)
        self.params = {GPT2 + name: p for name, p in self.gpt2.named_parameters()}
        self.params |= {name: torch.tensor(value, requires_grad=True)
                        for name, value in self.tensors.items() if not name.startswith(GPT2)}

    def grads(self) -> dict[str, np.ndarray]:
        return {name: p.grad.numpy().copy() for name, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.params
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"],
                            self.config.layer_norm_epsilon)

    def _mlp(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.params
        h = _gelu_new(x @ w[name + ".c_fc.weight"] + w[name + ".c_fc.bias"])
        return h @ w[name + ".c_proj.weight"] + w[name + ".c_proj.bias"]

    def senses(self, ids: torch.Tensor) -> torch.Tensor:
        """Sense vectors [B, K, S, D]: from each word's embedding alone."""
        residual = self.params[GPT2 + "wte.weight"][ids]
        residual = residual + self._norm(residual, SENSES + "ln")
        residual = residual + self._mlp(self._norm(residual, SENSES + "block.ln_1"),
                                        SENSES + "block.mlp")
        out = self._mlp(self._norm(residual, SENSES + "block.ln_2"), SENSES + "final_mlp")
        B, S, _ = out.shape
        K, D = self.config.num_senses, self.config.n_embd
        return out.view(B, S, K, D).permute(0, 2, 1, 3)  # output index = sense * D + feature

    def alpha(self, hidden: torch.Tensor) -> torch.Tensor:
        """Contextualization [B, K, S, S] from GPT-2's final states [B, S, D]."""
        B, S, D = hidden.shape
        K = self.config.num_senses
        E = D // K
        qk = hidden @ self.params[WEIGHTS + "weight"].T + self.params[WEIGHTS + "bias"]
        q = qk[..., :D].view(B, S, K, E).transpose(1, 2)  # [B, K, S, E]
        k = qk[..., D:].view(B, S, K, E).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(E)
        above = torch.ones(S, S, dtype=torch.bool).triu(1)
        return torch.softmax(scores + MASK * above, dim=-1)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 contextualization: torch.Tensor | None = None):
        alpha = contextualization
        if alpha is None:
            alpha = self.alpha(self.gpt2(ids, position_ids=position_ids).last_hidden_state)
        senses = self.senses(ids)
        out = sum(alpha[:, k] @ senses[:, k] for k in range(self.config.num_senses))
        return out @ self.params[GPT2 + "wte.weight"].T, alpha


def random_reference(config: BackpackConfig, seed: int) -> Reference:
    """A reference on `random_tensors(config, seed)` (its `tensors`, for the JAX side)."""
    return Reference(config, random_tensors(config, seed))
