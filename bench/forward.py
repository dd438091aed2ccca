"""Forward pass throughput: backpack_jax vs the PyTorch reference on the same weights."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import torch

from backpack_jax import flops, model
from backpack_jax.config import BackpackConfig
from backpack_jax.sense_table import SenseTable
from bench.timing import CALLS_PER_TURN, best_seconds, seconds


def run(config: BackpackConfig, reference, params, batch: int, seq_len: int, repeats: int,
        with_reference: bool = True, table: SenseTable | None = None,
        gemm_probe: Callable[[], float] | None = None) -> dict:
    """tokens/s of `model.apply` (fp32 logits) and of the reference's forward, best of `repeats`.

    The two are timed in alternation so that interference from other work hits both alike;
    `gemm_probe` (GFLOP/s), if given, measures the GEMM rate before and after each turn, its best
    kept as `gemm_gflops`: this run's bound, not one taken minutes away.
    With `table` the project looks its senses up instead of running the sense network.
    """
    ids = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, seq_len),
                                                dtype=np.int32)
    ids_jax, ids_torch = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))

    def jax_fn():
        return model.apply(params, ids_jax, config, sense_edit=table).logits

    compile_s, out = seconds(jax_fn)
    result = {"batch": batch, "seq_len": seq_len, "compile_s": compile_s,
              "sense_table": table is not None}
    if with_reference:
        with torch.no_grad():
            ref_logits = reference(ids_torch)[0].numpy()
        scale = np.abs(ref_logits).max()
        result["max_rel_diff"] = float(np.abs(np.asarray(out) - ref_logits).max() / scale)
        del ref_logits
    del out
    best_jax, best_ref = float("inf"), float("inf")
    gemms = [gemm_probe()] if gemm_probe else []
    for _ in range(repeats):
        best_jax = min(best_jax, best_seconds(jax_fn, CALLS_PER_TURN))
        if with_reference:
            with torch.no_grad():
                best_ref = min(best_ref, best_seconds(lambda: reference(ids_torch)[0],
                                                        CALLS_PER_TURN))
        gemms += [gemm_probe()] if gemm_probe else []
    if gemms:
        result["gemm_gflops"] = max(gemms)
    tokens = batch * seq_len
    result["jax_tokens_per_s"] = tokens / best_jax
    result["jax_gflops"] = tokens * flops.forward_flops_per_token(
        config, seq_len, table is not None) / best_jax / 1e9
    if with_reference:
        result["ref_tokens_per_s"] = tokens / best_ref
        result["speedup"] = best_ref / best_jax
    return result
