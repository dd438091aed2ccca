"""What training adds to a `backpack_jax.config` preset: remat policies, dtypes, and `validate`.

The presets themselves (`get_config(name)`) live in `backpack_jax.config`, the one registry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from backpack_jax.config import get_model_config

# `remat` names: which activations each Transformer block keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # No rematerialisation.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ("float32", "bfloat16")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks relations between fields that types alone do not catch."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"config: {message}")

    model = get_model_config(cfg)
    for field in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                  "checkpoint_every", "keep_checkpoints"):
        need(cfg[field] > 0, f"{field}={cfg[field]} must be positive")
    need(cfg.seq_len <= model.n_positions,
         f"seq_len={cfg.seq_len} exceeds model.n_positions={model.n_positions}")
    need(0 <= cfg.warmup_steps <= cfg.steps,
         f"warmup_steps={cfg.warmup_steps} must be in [0, steps={cfg.steps}]")
    need(cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.grad_clip_norm > 0,
         "lr and grad_clip_norm must be positive, weight_decay non-negative")
    need(len(cfg.mesh_shape) == 3 and all(isinstance(n, int) and (n > 0 or n == -1)
                                          for n in cfg.mesh_shape)
         and list(cfg.mesh_shape).count(-1) <= 1,
         f"mesh_shape={cfg.mesh_shape} must be 3 positive ints (data, fsdp, tensor), "
         "at most one of them -1")
    need(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r} must be one of {DTYPES}")
    need(cfg.remat in REMAT_POLICIES,
         f"remat={cfg.remat!r} must be one of {tuple(REMAT_POLICIES)}")
    for field in ("microbatch_size", "grad_accum_steps"):
        need(cfg[field] is None or cfg[field] > 0, f"{field}={cfg[field]} must be positive")
    need(cfg.peak_flops is None or cfg.peak_flops > 0, "peak_flops must be positive")
