"""The train state and the jit-compiled, sharded train and eval steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from backpack_jax import model
from backpack_jax.config import BackpackConfig
from train import configs, sharding
from train.loss import cross_entropy

Batch = dict[str, jax.Array]  # {"inputs": int32[B, S], "targets": int32[B, S]}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far.
    params: model.Params  # float32 master weights.
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw key; step t's dropout uses fold_in(rng, t).


def accumulation(config: ml_collections.ConfigDict, n_batch_devices: int) -> tuple[int, int]:
    """(grad_accum_steps, per-device micro-batch) for the global `batch_size`.

    The global batch is fixed by the config; the device count only changes how it is cut.
    """
    per_device, rest = divmod(config.batch_size, n_batch_devices)
    if rest:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{n_batch_devices} devices of the data x fsdp mesh axes")
    accum, micro = config.grad_accum_steps, config.microbatch_size
    if accum is not None:
        if per_device % accum:
            raise ValueError(f"grad_accum_steps={accum} does not divide the per-device batch "
                             f"{per_device} (batch_size={config.batch_size})")
        if micro is not None and micro * accum != per_device:
            raise ValueError(f"microbatch_size={micro} x grad_accum_steps={accum} != per-device "
                             f"batch {per_device}; set only one of them")
        return accum, per_device // accum
    if micro is None or micro >= per_device:
        return 1, per_device
    if per_device % micro:
        raise ValueError(f"microbatch_size={micro} does not divide the per-device batch "
                         f"{per_device} (batch_size={config.batch_size})")
    return per_device // micro, micro


def make_model(model_cfg: BackpackConfig, dtype: str = "float32", remat: str = "none"
               ) -> model.BackpackLM:
    """The module to train: compute `dtype` ("float32"/"bfloat16"), a REMAT_POLICIES name."""
    return model.BackpackLM(model_cfg, jnp.dtype(dtype), configs.REMAT_POLICIES[remat])


def _mean_loss(lm: model.BackpackLM, params, inputs_BxS, targets_BxS, rng, train: bool):
    S = inputs_BxS.shape[1]
    positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), inputs_BxS.shape)
    out, _ = lm.apply({"params": params}, inputs_BxS, positions_BxS, model.causal_mask(S),
                      train=train, rngs={"dropout": rng} if train else {})
    return cross_entropy(out.logits, targets_BxS)


def _microbatches(x_BxS: jax.Array, accum: int, mesh: Mesh) -> jax.Array:
    """[B, S] -> [A, B/A, S]; micro-batch i takes rows i, A+i, ... so no row leaves its device."""
    B, S = x_BxS.shape
    x_AxMxS = x_BxS.reshape(B // accum, accum, S).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x_AxMxS, NamedSharding(mesh, P(None, sharding.LOGICAL_TO_MESH["batch"], None)))


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    return TrainState(step=sharding.replicated(mesh),
                      params=sharding.tree_shardings(abstract_state.params, mesh),
                      opt_state=sharding.tree_shardings(abstract_state.opt_state, mesh),
                      rng=sharding.replicated(mesh))


def _state_builder(config: ml_collections.ConfigDict, model_cfg: BackpackConfig,
                   optimizer: optax.GradientTransformation):
    def build(rng, params):
        init_rng, train_rng = jax.random.split(rng)
        if params is None:
            params = model.init(model_cfg, init_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=train_rng)
    return build, jax.random.PRNGKey(config.seed)


def abstract_state(config: ml_collections.ConfigDict, model_cfg: BackpackConfig,
                   optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of the train state, without computing it."""
    build, rng = _state_builder(config, model_cfg, optimizer)
    return jax.eval_shape(build, rng, None)


def init_state(config: ml_collections.ConfigDict, model_cfg: BackpackConfig,
               optimizer: optax.GradientTransformation, shardings: TrainState,
               params: model.Params | None = None) -> TrainState:
    """A fresh state laid out by `shardings`; `params` (e.g. a converted model) replace init."""
    build, rng = _state_builder(config, model_cfg, optimizer)
    if params is not None:
        params = jax.device_put(params, shardings.params)
    return jax.jit(build, out_shardings=shardings)(rng, params)


def make_train_step(config: ml_collections.ConfigDict, model_cfg: BackpackConfig,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, shardings: TrainState
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer update on a global batch, accumulating gradients over micro-batches.

    The state is donated (updated in place); metrics come back replicated.
    """
    lm = make_model(model_cfg, config.dtype, config.remat)
    accum, _ = accumulation(config, sharding.batch_devices(mesh))
    grad_fn = jax.value_and_grad(lambda p, x, y, r: _mean_loss(lm, p, x, y, r, train=True))

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        inputs = _microbatches(batch["inputs"], accum, mesh)
        targets = _microbatches(batch["targets"], accum, mesh)

        def accumulate(carry, xs):
            loss_sum, grads_sum = carry
            i, x, y = xs
            loss, grads = grad_fn(state.params, x, y, jax.random.fold_in(rng, i))
            return (loss_sum + loss, jax.tree.map(jnp.add, grads_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, grads_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(accum), inputs, targets))
        loss, grads = loss_sum / accum, jax.tree.map(lambda g: g / accum, grads_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    batch_shardings = {"inputs": sharding.batch_sharding(mesh),
                       "targets": sharding.batch_sharding(mesh)}
    return jax.jit(step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(lm: model.BackpackLM, accum: int, mesh: Mesh, params_shardings: Any
                   ) -> Callable[[model.Params, Batch], jax.Array]:
    """Mean loss of a global batch without dropout, in `accum` micro-batches."""
    def eval_step(params, batch):
        def one(loss_sum, xy):
            return loss_sum + _mean_loss(lm, params, *xy, None, train=False), None
        xy = (_microbatches(batch["inputs"], accum, mesh),
              _microbatches(batch["targets"], accum, mesh))
        loss_sum, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), xy)
        return loss_sum / accum

    batch_shardings = {"inputs": sharding.batch_sharding(mesh),
                       "targets": sharding.batch_sharding(mesh)}
    return jax.jit(eval_step, in_shardings=(params_shardings, batch_shardings),
                   out_shardings=sharding.replicated(mesh))


def global_batch(local: dict[str, Any], mesh: Mesh, global_batch_size: int) -> Batch:
    """This process's rows of the batch -> one global array split over data x fsdp."""
    out = {}
    for key, rows in local.items():
        out[key] = jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh), rows, (global_batch_size,) + rows.shape[1:])
    return out
