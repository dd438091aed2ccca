"""The accelerator section, chosen automatically when jax's first device is a GPU.

There is no PyTorch reference here (the project's torch is CPU-only): it reports Backpack-Small
training throughput, model FLOPs utilisation against the device's dense bf16 peak and peak
memory, and forward and cached-generation throughput.
"""

from __future__ import annotations

import jax

from backpack_jax.config import get_model_config
from bench import forward, generation, reference as reference_lib, training
from train.metrics import peak_flops_per_device


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def run(quick: bool, config_name: str = "gpt2_small", seq_len: int = 512) -> dict:
    """Training (bf16), forward and generation of the preset `config_name`; the smaller presets
    exist for the CPU smoke test of this path."""
    device = jax.devices()[0]
    peak = peak_flops_per_device(device.device_kind)
    batch = 8 if quick else 32
    train = training.run(config_name, batch, seq_len, repeats=3 if quick else 10,
                         with_reference=False, dtype="bfloat16")
    train["peak_memory_gib"] = peak_memory_gib()
    if peak is not None:
        train["mfu"] = train["jax_gflops"] * 1e9 / peak
    config = get_model_config(config_name)
    _, params = reference_lib.reference_and_params(config)
    fwd = [forward.run(config, None, params, b, seq_len, repeats=3, with_reference=False)
           for b in (1, 8, 32)]
    gen = generation.run(config, None, params, 32, 64 if quick else 256, with_reference=False)
    return {"config": config_name, "device": device.device_kind, "peak_bf16_flops": peak,
            "training": train, "forward": fwd, "generation": gen}
