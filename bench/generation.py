"""Generation: batch-1 greedy cached decoding vs the reference's full forward per new token,
and batched sampling against its compute bound.

Throughput is `generate` (the whole loop on the device); per-token latency near given positions
comes from `stream`, which hands each token to the host as it is chosen. The demo's pane
(`Demo.stream`) is timed in the same run, to compare with the decoding it is built on. Batched
sampling (temperature 1, no filter) is the workload of topic control and lm-eval's
`generate_until`: at B >= 8 a decode step is bound by the GEMM rate, not by reading the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
import torch

from backpack_jax import generate
from backpack_jax.config import BackpackConfig
from backpack_jax.demo import MAX_NEW_TOKENS, Demo
from bench.timing import best_seconds

MIDDLE_POSITION = 128  # Latency is reported near the prompt's end, here and the last position.


def _latencies(steps: Iterator) -> list[float]:
    """Seconds from the start to each new token (each step syncs on its token)."""
    start, times = time.perf_counter(), []
    for _ in steps:
        times.append(time.perf_counter() - start)
    return times


def jax_latencies(params, config: BackpackConfig, prompt: np.ndarray, new_tokens: int,
                  **options) -> list[float]:
    """Per-token arrival times of `generate.stream` (compiled beforehand by a first run)."""
    return _latencies(generate.stream(params, config, prompt, new_tokens, **options))


def reference_latencies(reference, prompt: np.ndarray, new_tokens: int) -> list[float]:
    """The reference has no cache: each new token is a forward pass over the whole prefix."""
    ids = torch.from_numpy(prompt.astype(np.int64))

    def steps():
        nonlocal ids
        with torch.no_grad():
            for _ in range(new_tokens):
                next_id = reference(ids)[0][:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_id], dim=1)
                yield next_id

    return _latencies(steps())


def summarize(times: list[float], prompt_len: int, near: tuple[int, ...]) -> dict:
    """tokens/s over the whole run and the median step latency (ms) around each position.

    Token i (0-based) of the new tokens is produced from a context of prompt_len + i tokens.
    """
    steps = np.diff(np.concatenate([[0.0], times]))
    out = {"tokens_per_s": len(times) / times[-1], "first_token_ms": 1e3 * steps[0]}
    for position in near:
        i = min(max(position - prompt_len, 1), len(steps) - 1)  # step 0 includes the prefill
        window = steps[max(i - 2, 1):i + 3]
        out[f"latency_ms_at_{position}"] = 1e3 * float(np.median(window))
    out["stream_step_ms"] = 1e3 * float(np.median(steps[1:]))
    return out


def run(config: BackpackConfig, reference, params, prompt_len: int, new_tokens: int,
        with_reference: bool = True, repeats: int = 2,
        read_probe: Callable[[], float] | None = None, **jax_options) -> dict:
    """Greedy generation timed against the reference; with `read_probe` (GB/s) the memory
    bandwidth is also measured before and after each timed run, its best kept as `read_gbps`:
    the machine's state changes within seconds, so a bound taken minutes away is not this
    run's."""
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len),
                                               dtype=np.int32)
    end = prompt_len + new_tokens
    middle = MIDDLE_POSITION if prompt_len < MIDDLE_POSITION < end else (prompt_len + end) // 2
    near = (prompt_len, middle, end)
    start = time.perf_counter()
    jax_tokens = generate.generate(params, config, prompt, new_tokens, **jax_options).new_tokens
    result = {"prompt_len": prompt_len, "new_tokens": new_tokens,
              "first_run_s": time.perf_counter() - start}  # compiles generate's loop
    jax_latencies(params, config, prompt, new_tokens, **jax_options)  # compiles the stream step
    runs = [jax_latencies(params, config, prompt, new_tokens, **jax_options)
            for _ in range(repeats)]
    result["jax"] = summarize(min(runs, key=lambda t: t[-1]), prompt_len, near)

    def timed():
        return generate.generate(params, config, prompt, new_tokens, **jax_options).tokens

    reads = [read_probe()] if read_probe else []
    total_s = float("inf")
    for _ in range(repeats):
        total_s = min(total_s, best_seconds(timed, 1))
        reads += [read_probe()] if read_probe else []
    if reads:
        result["read_gbps"] = max(reads)
    result["jax"]["tokens_per_s"] = new_tokens / total_s
    # The first token costs the prefill; every later one is a decode step inside the loop.
    first_s = result["jax"]["first_token_ms"] / 1e3
    result["jax"]["decode_step_ms"] = 1e3 * (total_s - first_s) / (new_tokens - 1)
    if with_reference:
        result["reference"] = summarize(reference_latencies(reference, prompt, new_tokens),
                                        prompt_len, near)
        result["speedup"] = result["jax"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
        result["same_first_tokens"] = _agreement(reference, prompt, jax_tokens)
    return result


def batched(config: BackpackConfig, params, batch: int, prompt_len: int, new_tokens: int,
            repeats: int = 2, gemm_probe: Callable[[], float] | None = None) -> dict:
    """Sampling at temperature 1 for `batch` prompts: tokens/s of `generate`, and its decode
    step, (time of `new_tokens` - time of 1) / (new_tokens - 1). `gemm_probe` (GFLOP/s)
    measures the GEMM rate around each turn, its best kept as `gemm_gflops`."""
    prompt = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt_len),
                                                   dtype=np.int32)

    def sample(n: int):
        return generate.generate(params, config, prompt, n, temperature=1.0,
                                 rng=jax.random.key(0)).tokens

    start = time.perf_counter()
    sample(new_tokens)
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "first_run_s": time.perf_counter() - start}
    sample(1)  # compiles the one-token loop
    gemms = [gemm_probe()] if gemm_probe else []
    total_s = one_s = float("inf")
    for _ in range(repeats):
        total_s = min(total_s, best_seconds(lambda: sample(new_tokens), 1))
        one_s = min(one_s, best_seconds(lambda: sample(1), 1))
        gemms += [gemm_probe()] if gemm_probe else []
    if gemms:
        result["gemm_gflops"] = max(gemms)
    result["tokens_per_s"] = batch * new_tokens / total_s
    result["decode_step_ms"] = 1e3 * (total_s - one_s) / (new_tokens - 1)
    return result


def demo_pane(config: BackpackConfig, params, table, prompt_len: int, repeats: int = 2) -> dict:
    """What one pane of the demo's Steer tab streams (`Demo.stream`: greedy, the prompt padded
    to the demo's width for it, its cache length, the sense table), timed like `stream`."""
    pane = Demo(params, config, topic_cache="", table=table)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, prompt_len).tolist()
    list(pane.stream(prompt, MAX_NEW_TOKENS))  # compiles its shapes
    times = min((_latencies(pane.stream(prompt, MAX_NEW_TOKENS)) for _ in range(repeats)),
                key=lambda t: t[-1])
    width = pane.prompt_width(prompt_len)
    return {"prompt_len": prompt_len, "padded_to": width, "new_tokens": len(times),
            "cache_len": width + MAX_NEW_TOKENS - 1,
            "jax": summarize(times, prompt_len, (prompt_len + len(times),))}


def _agreement(reference, prompt: np.ndarray, jax_tokens: np.ndarray) -> int:
    """How many leading greedy tokens the reference reproduces (random weights: near-ties can
    flip late tokens, so this is a sanity check, not a parity test)."""
    ids = torch.from_numpy(np.concatenate([prompt, jax_tokens], axis=1).astype(np.int64))
    with torch.no_grad():
        ref_next = reference(ids)[0][0, prompt.shape[1] - 1:-1].argmax(-1).numpy()
    same = ref_next == jax_tokens[0]
    return int(same.argmin()) if not same.all() else int(same.size)
