"""The paper's optimizer: AdamW with linear warmup and decay, clipping, decay on kernels only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then linear decay to 0 at `steps`."""
    lr, warmup, steps = config.lr, config.warmup_steps, config.steps

    def schedule(step):
        # Distances to the ends are exact integers in float32, so the tail keeps full precision
        # (optax.linear_schedule's `1 - step/steps` loses it near the last step).
        step = jnp.asarray(step, jnp.float32)
        warming = lr * step / max(warmup, 1)
        decaying = lr * jnp.maximum(steps - step, 0.0) / max(steps - warmup, 1)
        return jnp.where(step < warmup, warming, decaying)

    return schedule


def weight_decay_mask(params: optax.Params) -> optax.Params:
    """True for the kernels of linear layers; biases, LayerNorm and embeddings get no decay."""
    def is_kernel(path, _) -> bool:
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW with the schedule and the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask))
