"""The train step on one device: its loss is model.apply's, accumulation, bfloat16 compute."""

import jax
import numpy as np
import pytest

from backpack_jax import model
from backpack_jax.config import get_config, get_model_config
from train import optim, sharding, step
from train.loss import cross_entropy

VOCAB = 256


def _setup(**overrides):
    cfg = get_config("tiny")
    cfg.model.update(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                     n_positions=16, n_embd=32, n_layer=1)
    cfg.update(seq_len=16, batch_size=8, steps=10, warmup_steps=0, lr=1e-2, mesh_shape=(1, 1, 1))
    cfg.update(overrides)
    model_cfg = get_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    optimizer = optim.make_optimizer(cfg)
    shardings = step.state_shardings(step.abstract_state(cfg, model_cfg, optimizer), mesh)
    state = step.init_state(cfg, model_cfg, optimizer, shardings)
    train_step = step.make_train_step(cfg, model_cfg, optimizer, optim.make_schedule(cfg), mesh,
                                      shardings)
    return cfg, model_cfg, mesh, state, train_step


def _batches(cfg, n):
    """Counting rows (step 3, mod VOCAB); the same batch each step, so the loss falls fast."""
    starts = np.random.default_rng(1).integers(0, VOCAB, (cfg.batch_size, 1))
    rows = ((starts + 3 * np.arange(cfg.seq_len + 1)) % VOCAB).astype(np.int32)
    return [{"inputs": rows[:, :-1], "targets": rows[:, 1:]}] * n


def _run(cfg, mesh, state, train_step, batches):
    losses = []
    for b in batches:
        state, metrics = train_step(state, step.global_batch(b, mesh, cfg.batch_size))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference():
    """Three float32 steps without accumulation: (config, initial params, batches, losses)."""
    cfg, model_cfg, mesh, state, train_step = _setup()
    params = jax.device_get(state.params)  # The step donates the state.
    batches = _batches(cfg, 3)
    _, losses = _run(cfg, mesh, state, train_step, batches)
    assert losses[0] - losses[-1] > 100 * 1e-5, losses  # Updates move the loss.
    return model_cfg, params, batches, losses


def test_step_loss_is_model_apply_cross_entropy(reference):
    model_cfg, params, batches, losses = reference
    logits = model.apply(params, batches[0]["inputs"], model_cfg).logits
    assert losses[0] == pytest.approx(float(cross_entropy(logits, batches[0]["targets"])),
                                      abs=1e-5)


def test_accumulated_micro_batches_equal_one_batch(reference):
    _, _, batches, losses = reference
    cfg, _, mesh, state, train_step = _setup(grad_accum_steps=4)
    assert step.accumulation(cfg, 1) == (4, 2)
    _, accumulated = _run(cfg, mesh, state, train_step, batches)
    np.testing.assert_allclose(accumulated, losses, atol=1e-5)


def test_bfloat16_compute_with_float32_master_weights(reference):
    _, _, batches, losses = reference
    cfg, _, mesh, state, train_step = _setup(dtype="bfloat16")
    state, bf16_losses = _run(cfg, mesh, state, train_step, batches)
    np.testing.assert_allclose(bf16_losses, losses, atol=5e-2)
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim > 0}
    assert dtypes == {np.dtype(np.float32)}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_remat_wraps_each_transformer_block(remat):
    model_cfg = get_model_config("tiny")
    lm = step.make_model(model_cfg, "float32", remat)
    params = jax.eval_shape(model.init, model_cfg, jax.random.PRNGKey(0))
    ids = jax.ShapeDtypeStruct((2, 8), np.int32)

    def loss(p, x):
        out, _ = lm.apply({"params": p}, x, jax.numpy.zeros_like(x), model.causal_mask(8))
        return out.logits.sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, ids))
    assert jaxpr.count("remat2[") == (model_cfg.n_layer if remat == "full" else 0)


@pytest.mark.slow
def test_gpt2_small_train_step_lowers():
    """The paper-size preset builds: 170.08M parameters, 1024 x 512 tokens in 64 micro-batches."""
    cfg = get_config("gpt2_small")
    cfg.remat = "dots_with_no_batch_dims_saveable"
    model_cfg = get_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    optimizer = optim.make_optimizer(cfg)
    abstract = step.abstract_state(cfg, model_cfg, optimizer)
    assert sum(x.size for x in jax.tree.leaves(abstract.params)) == 170_083_584
    assert step.accumulation(cfg, sharding.batch_devices(mesh)) == (64, 16)
    train_step = step.make_train_step(cfg, model_cfg, optimizer, optim.make_schedule(cfg), mesh,
                                      step.state_shardings(abstract, mesh))
    batch = {k: jax.ShapeDtypeStruct((1024, 512), np.int32) for k in ("inputs", "targets")}
    new_state, metrics = jax.eval_shape(train_step, abstract, batch)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), abstract)
    assert metrics["loss"].shape == ()
