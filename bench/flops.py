"""Analytic costs of a Backpack from its config: FLOPs per token and bytes per decode step.

FLOPs reuse the training metrics' count (matrix multiplies, 2 FLOPs per multiply-add, attention
over the whole S x S square as in the usual MFU convention and in both implementations).
"""

from __future__ import annotations

from backpack_jax import checkpoint, model
from backpack_jax.config import BackpackConfig
from train.metrics import sense_network_macs_per_token, train_flops_per_token

FLOAT32_BYTES = 4


def forward_flops_per_token(config: BackpackConfig, seq_len: int,
                            sense_table: bool = False) -> float:
    """One token of a length-`seq_len` forward pass, logits included (about 0.37 GFLOP for
    Backpack-Small at 512): the training count is forward + backward = 3 x forward. A sense
    table replaces the sense network's products by a lookup."""
    saved = 2 * sense_network_macs_per_token(config) if sense_table else 0
    return train_flops_per_token(config, seq_len) / 3 - saved


def param_count(config: BackpackConfig) -> dict[str, int]:
    """Parameters by part, counted on the real tree: `sense_network` is what a sense table
    replaces."""
    tree = checkpoint.abstract_params(config)["backpack"]
    gpt2 = dict(tree["gpt2_model"])
    embeddings = model.count_params([gpt2.pop("wte"), gpt2.pop("wpe")])
    return {"embeddings": embeddings, "transformer": model.count_params(gpt2),
            "sense_network": model.count_params(tree["sense_network"]),
            "weight_network": model.count_params(tree["sense_weight_net"])}


def decode_bytes_per_token(config: BackpackConfig, cache_len: int, sense_table: bool) -> float:
    """Bytes one batch-1 cached decode step must read: every weight once, plus the cache.

    With a sense table the sense network's weights are replaced by one K x D row.
    """
    D, K, L = config.n_embd, config.num_senses, config.n_layer
    parts = param_count(config)
    weights = sum(parts.values()) - (parts["sense_network"] if sense_table else 0)
    cache = cache_len * (2 * L * D + K * config.sense_head_dim + K * D)
    return float(FLOAT32_BYTES * (weights + cache + (K * D if sense_table else 0)))
