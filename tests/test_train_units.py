"""Training building blocks: command-line overrides, schedule, weight decay, loss, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from backpack_jax import model
from backpack_jax.config import get_config, get_model_config
from backpack_jax.flops import sense_network_macs_per_token, train_flops_per_token
from train import optim, sharding
from train.loss import cross_entropy
from train.metrics import MetricsLog, peak_flops_per_device, read_metrics
from train.run import parse_args
from train.step import accumulation


def parse(*args):
    return parse_args(["--config=tiny", *args])


def test_overrides_in_ml_collections_style():
    cfg, workdir, init_from = parse(
        "--config.steps=300", "--config.model.n_layer=3", "--config.mesh_shape=(1,1,1)",
        "--config.lr=1", "--config.data=owt", "--config.model.n_inner=96",
        "--config.microbatch_size=4", "--config.remat=full", "--workdir=/w")
    assert (cfg.steps, cfg.model.n_layer, cfg.mesh_shape, cfg.data) == (300, 3, (1, 1, 1), "owt")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.microbatch_size == 4 and cfg.remat == "full"
    assert get_model_config(cfg).inner_dim == 96
    assert (workdir, init_from) == ("/w", None)


def test_space_separated_values_and_defaults():
    cfg, workdir, init_from = parse_args(["--config", "gpt2_small", "--config.lr", "1e-4",
                                          "--init_from", "/ckpt"])
    assert cfg.lr == 1e-4 and cfg.model.n_layer == 12
    assert (workdir, init_from) == ("/tmp/backpack_gpt2_small", "/ckpt")


@pytest.mark.parametrize("args,message", [
    (["--config.stepz=3"], "unknown config field 'stepz'; Did you mean \"steps\""),
    (["--config.model.n_layerz=3"], "unknown config field 'n_layerz'"),
    (["--config.steps=abc"], "flag --config.steps=abc: invalid literal for int()"),
    (["--config.steps=1.5"], "flag --config.steps=1.5:"),
    (["--config.lr"], "Missing value for flag --config.lr"),
    (["--config.mesh_shape=4"], "mesh_shape=(4,) must be 3 positive ints"),
    (["--config.mesh_shape=(2,2)"], "mesh_shape=(2, 2)"),
    (["--config.dtype=float16"], "dtype='float16'"),
    (["--config.seq_len=1024"], "seq_len=1024 exceeds model.n_positions=128"),
    (["--config.model.n_head=3"], "n_embd=64: must be divisible by n_head=3"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_overrides_name_the_field(args, message):
    with pytest.raises(ValueError) as e:
        parse(*args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--config=gpt3"], "unknown config 'gpt3'; choose from ['gpt2_micro', 'gpt2_mini', "
                        "'gpt2_small', 'tiny']"),
    (["--config.lr=1"], "--config=NAME is required; choose from"),
])
def test_preset_is_required_and_known(argv, message):
    with pytest.raises(ValueError) as e:
        parse_args(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("step,lr", [(0, 0.0), (1, 6e-4 / 5000), (2_500, 3e-4), (5_000, 6e-4),
                                     (52_500, 3e-4), (99_999, 6e-4 / 95_000), (100_000, 0.0)])
def test_gpt2_small_schedule(step, lr):
    schedule = optim.make_schedule(get_config("gpt2_small"))
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-15)


def _paths(tree):
    return {"/".join(k.key for k in path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if leaf}


def test_weight_decay_reaches_exactly_the_linear_kernels():
    cfg = get_config("tiny")
    model_cfg = get_model_config(cfg)
    params = jax.jit(model.init, static_argnums=0)(model_cfg, jax.random.PRNGKey(0))
    linear = ["sense_network/block/mlp/c_fc", "sense_network/block/mlp/c_proj",
              "sense_network/final_mlp/c_fc", "sense_network/final_mlp/c_proj",
              "sense_weight_net/c_attn"]
    for i in range(model_cfg.n_layer):
        linear += [f"gpt2_model/h_{i}/{m}" for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc",
                                                     "mlp/c_proj")]
    expected = {f"backpack/{name}/kernel" for name in linear}
    assert _paths(optim.weight_decay_mask(params)) == expected

    # Behaviour: with zero gradients AdamW's only change is the decay, lr * wd * p.
    optimizer = optim.make_optimizer(cfg)
    update = jax.jit(optimizer.update)
    opt_state = jax.jit(optimizer.init)(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, opt_state = update(zeros, opt_state, params)  # step 0: lr is 0.
    updates, _ = update(zeros, opt_state, params)
    lr = float(optim.make_schedule(cfg)(1))
    moved = set()
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = "/".join(k.key for k in path)
        p = params
        for k in path:
            p = p[k.key]
        if np.any(u != 0):
            moved.add(name)
            np.testing.assert_allclose(u, -lr * cfg.weight_decay * p, rtol=1e-5, atol=1e-12)
    assert moved == expected
    assert "backpack/gpt2_model/wte/embedding" not in moved


def test_gradients_are_clipped_to_global_norm_one():
    cfg = get_config("gpt2_small")
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    grads = jax.tree.map(lambda p: 100.0 * p, params)  # Global norm 400.
    optimizer = optim.make_optimizer(cfg)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    # AdamW's first moment after one step is (1 - b1) x the clipped gradient, whose norm is 1.
    assert float(optax.tree.norm(state[1][0].mu)) == pytest.approx(0.1, rel=1e-6)


def test_cross_entropy_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5)).astype(np.int32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
        expected, rel=1e-6)
    # bfloat16 logits are upcast before the softmax.
    bf16 = cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert bf16.dtype == jnp.float32


@pytest.mark.parametrize("batch,devices,micro,accum,expected", [
    (1024, 8, 16, None, (8, 16)),
    (1024, 4, 16, None, (16, 16)),
    (1024, 8, None, 4, (4, 32)),
    (16, 2, None, None, (1, 8)),
    (16, 2, 64, None, (1, 8)),
])
def test_accumulation_keeps_the_global_batch(batch, devices, micro, accum, expected):
    cfg = get_config("tiny")
    cfg.batch_size, cfg.microbatch_size, cfg.grad_accum_steps = batch, micro, accum
    got = accumulation(cfg, devices)
    assert got == expected and got[0] * got[1] * devices == batch


@pytest.mark.parametrize("batch,devices,micro,accum,message", [
    (10, 4, None, None, "not divisible by the 4 devices"),
    (16, 2, 3, None, "microbatch_size=3 does not divide"),
    (16, 2, None, 3, "grad_accum_steps=3 does not divide"),
    (16, 2, 2, 2, "set only one of them"),
])
def test_accumulation_errors(batch, devices, micro, accum, message):
    cfg = get_config("tiny")
    cfg.batch_size, cfg.microbatch_size, cfg.grad_accum_steps = batch, micro, accum
    with pytest.raises(ValueError, match=message):
        accumulation(cfg, devices)


def test_every_parameter_of_backpack_small_has_a_rule():
    mesh = AbstractMesh((2, 2, 4), sharding.MESH_AXES)
    abstract = model.abstract_params(get_model_config("gpt2_small"))
    specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(abstract, mesh))
    gpt2, senses = specs["backpack"]["gpt2_model"], specs["backpack"]["sense_network"]
    assert gpt2["wte"]["embedding"] == P("tensor", "fsdp")  # 50264 = 4 * 12566.
    assert gpt2["h_0"]["mlp"]["c_fc"]["kernel"] == P("fsdp", "tensor")
    assert gpt2["h_0"]["attn"]["c_proj"]["kernel"] == P("tensor", "fsdp")
    assert gpt2["h_0"]["ln_1"]["scale"] == P(None)
    assert senses["final_mlp"]["c_proj"]["kernel"] == P("tensor", "fsdp")
    # A dimension the mesh axis does not divide is replicated, not rejected.
    odd = AbstractMesh((1, 1, 3), sharding.MESH_AXES)
    assert sharding.spec_for(("vocab", "embed"), (50264, 768), odd) == P(None, "fsdp")
    with pytest.raises(ValueError, match="no partitioning rule for 'foo/kernel'"):
        sharding.logical_axes("foo/kernel", 2)


def test_optimizer_state_follows_the_parameter_rules():
    mesh = AbstractMesh((1, 2, 1), sharding.MESH_AXES)
    cfg = get_config("tiny")
    params = model.abstract_params(get_model_config(cfg))
    opt_state = jax.eval_shape(optim.make_optimizer(cfg).init, params)
    specs = sharding.tree_shardings(opt_state, mesh)
    mu = specs[1][0].mu["backpack"]["gpt2_model"]["h_1"]["mlp"]["c_fc"]["kernel"]
    assert mu.spec == P("fsdp", "tensor")
    assert specs[1][0].count.spec == P()


def test_flops_per_token_of_backpack_small():
    # By hand: 6 x (169.5M multiply-adds of weights + 16.1M of attention and the sense sum at
    # 512 positions) = 1.11 GFLOP per training token.
    flops = train_flops_per_token(get_model_config("gpt2_small"), 512)
    assert flops == pytest.approx(1.11e9, rel=0.01)


@pytest.mark.parametrize("preset", ["gpt2_small", "tiny"])
def test_sense_network_macs_are_its_kernels(preset):
    """What a sense table saves per token: one multiply-add per sense-network kernel weight."""
    config = get_model_config(preset)
    tree = model.abstract_params(config)["backpack"]["sense_network"]
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if path[-1].key == "kernel"]
    assert sense_network_macs_per_token(config) == sum(math.prod(k.shape) for k in kernels)


def test_peak_flops_table_and_override():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", 1e11) == 1e11
    assert math.isclose(peak_flops_per_device("NVIDIA A100-SXM4-40GB"), 312e12)


def test_resumed_metrics_log_drops_later_and_partial_records(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # A process killed mid-write.
    log.truncate_after(2)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
