"""Analytic costs of a Backpack from its config: FLOPs per token, parameters, decode-step bytes.

FLOPs count matrix multiplies only, 2 FLOPs per multiply-add, with causal attention counted over
the whole S x S square as the usual MFU convention does. Training logs MFU with these counts and
the benchmark divides the machine's measured rates by them to get each figure's bound.
"""

from __future__ import annotations

from backpack_jax import model
from backpack_jax.config import BackpackConfig

FLOAT32_BYTES = 4


def sense_network_macs_per_token(config: BackpackConfig) -> int:
    """Multiply-adds of the sense network for one token (what a sense table saves)."""
    d, scale = config.n_embd, config.sense_intermediate_scale
    return 2 * d * 4 * d + d * scale * d + scale * d * config.num_senses * d


def train_flops_per_token(config: BackpackConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), no remat.

    Per token the forward pass multiplies by every linear weight once (GPT-2 blocks, sense
    network, weight network, tied LM head), plus attention and the weight network's scores over
    `seq_len` positions and the sum over senses. Backpack-Small at 512 tokens: about 1.11 GFLOP.
    """
    d, k = config.n_embd, config.num_senses
    block = d * 3 * d + d * d + 2 * d * config.inner_dim
    linear = (config.n_layer * block + sense_network_macs_per_token(config) + d * 2 * d
              + config.vocab_size * d)
    attention = config.n_layer * 2 * seq_len * d  # q.k and probs.v
    backpack = seq_len * d + k * seq_len * d  # weight-network scores, alpha @ senses
    return 3 * 2 * (linear + attention + backpack)


def forward_flops_per_token(config: BackpackConfig, seq_len: int,
                            sense_table: bool = False) -> float:
    """One token of a length-`seq_len` forward pass, logits included: a third of the training
    count. A sense table replaces the sense network's products by a lookup."""
    saved = 2 * sense_network_macs_per_token(config) if sense_table else 0
    return train_flops_per_token(config, seq_len) / 3 - saved


def param_count(config: BackpackConfig) -> dict[str, int]:
    """Parameters by part, counted on the real tree: `sense_network` is what a sense table
    replaces."""
    tree = model.abstract_params(config)["backpack"]
    gpt2 = dict(tree["gpt2_model"])
    embeddings = model.count_params([gpt2.pop("wte"), gpt2.pop("wpe")])
    return {"embeddings": embeddings, "transformer": model.count_params(gpt2),
            "sense_network": model.count_params(tree["sense_network"]),
            "weight_network": model.count_params(tree["sense_weight_net"])}


def decode_bytes_per_token(config: BackpackConfig, cache_len: int, sense_table: bool) -> float:
    """Bytes one batch-1 cached decode step must read in fp32: every weight once, plus the cache
    (keys and values of every layer, the weight network's keys and the senses of every position).

    With a sense table the sense network's weights are replaced by one K x D row.
    """
    D, K, L = config.n_embd, config.num_senses, config.n_layer
    parts = param_count(config)
    weights = sum(parts.values()) - (parts["sense_network"] if sense_table else 0)
    cache = cache_len * (2 * L * D + K * config.sense_head_dim + K * D)
    return float(FLOAT32_BYTES * (weights + cache + (K * D if sense_table else 0)))
