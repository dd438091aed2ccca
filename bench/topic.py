"""Scoring every sense vector against the vocabulary, the cost of the paper's topic control:
`topic.sense_max_logits` over the first tokens of the vocabulary, against the GEMM bound."""

from __future__ import annotations

from collections.abc import Callable

from backpack_jax import flops, topic
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from bench.timing import best_seconds, seconds


def flops_per_token(config: BackpackConfig) -> float:
    """Matmul FLOPs per vocabulary token scored: its K senses' logits over the V tokens, and
    the sense network that makes them (3.1e13 + 2.3e12 multiply-adds for all of backpack-gpt2)."""
    return 2.0 * (config.num_senses * config.vocab_size * config.n_embd
                  + flops.sense_network_macs_per_token(config))


def run(config: BackpackConfig, params: Params, tokens: int, repeats: int,
        gemm_probe: Callable[[], float] | None = None) -> dict:
    """Vocabulary tokens scored per second (best of `repeats`), over the first `tokens` ids:
    the same chunks as the whole vocabulary, so the rate carries over. `gemm_probe`
    (GFLOP/s), if given, is measured before and after each turn, its best kept."""
    def score():
        return topic.sense_max_logits(params, config, stop=tokens, progress=False)

    compile_s, _ = seconds(score)
    gemms = [gemm_probe()] if gemm_probe else []
    best = float("inf")
    for _ in range(repeats):
        best = min(best, best_seconds(score, 1))
        gemms += [gemm_probe()] if gemm_probe else []
    result = {"tokens": tokens, "vocab_size": config.vocab_size,
              "num_senses": config.num_senses, "compile_s": compile_s,
              "tokens_per_s": tokens / best, "vocabulary_s": config.vocab_size * best / tokens,
              "gflops": tokens * flops_per_token(config) / best / 1e9}
    if gemms:
        result["gemm_gflops"] = max(gemms)
    return result
