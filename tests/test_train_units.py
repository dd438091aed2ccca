"""Training building blocks: configs and overrides, schedule, weight decay, loss, sharding rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from backpack_jax import checkpoint, model
from backpack_jax.config import get_config as model_preset
from train import configs, optim, sharding
from train.loss import cross_entropy
from train.metrics import (MetricsLog, peak_flops_per_device, read_metrics,
                           sense_network_macs_per_token, train_flops_per_token)
from train.step import accumulation

FLAGS = ("workdir", "init_from")


def parse(*args):
    return configs.parse_args(["--config=tiny", *args], FLAGS)


def test_gpt2_small_is_the_papers_recipe():
    cfg = configs.get_config("gpt2_small")
    assert configs.model_from_config(cfg) == model_preset("backpack_gpt2")
    assert (cfg.steps, cfg.batch_size, cfg.seq_len) == (100_000, 1024, 512)
    assert cfg.batch_size * cfg.seq_len == 524_288
    assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.999, 1e-8)
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.grad_clip_norm) == (
        6e-4, 5_000, 0.1, 1.0)


@pytest.mark.parametrize("name,preset", [("gpt2_mini", "mini"), ("gpt2_micro", "micro")])
def test_other_paper_sizes_share_the_recipe(name, preset):
    cfg, small = configs.get_config(name), configs.get_config("gpt2_small")
    assert configs.model_from_config(cfg) == model_preset(preset)
    for field in ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "weight_decay",
                  "grad_clip_norm", "b1", "b2", "eps"):
        assert cfg[field] == small[field], field


def test_overrides_in_ml_collections_style():
    cfg, flags = parse("--config.steps=200", "--config.model.n_layer=3",
                       "--config.mesh_shape=(2,2,2)", "--config.lr=1", "--config.data=owt",
                       "--config.model.n_inner=96", "--config.remat=full", "--workdir=/w")
    assert (cfg.steps, cfg.model.n_layer, cfg.mesh_shape, cfg.data) == (200, 3, (2, 2, 2), "owt")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert configs.model_from_config(cfg).inner_dim == 96
    assert flags == {"workdir": "/w", "init_from": None}


@pytest.mark.parametrize("args,message", [
    (["--config.stepz=3"], "unknown config field 'stepz'"),
    (["--config.model.n_layerz=3"], "unknown config field 'model.n_layerz'"),
    (["--config.steps=abc"], "config field 'steps'"),
    (["--config.steps=1.5"], "config field 'steps'"),
    (["--config.mesh_shape=4"], "config field 'mesh_shape'"),
    (["--config.mesh_shape=(2,2)"], "mesh_shape=(2, 2)"),
    (["--config.dtype=float16"], "dtype='float16'"),
    (["--config.seq_len=1024"], "seq_len=1024 exceeds model.n_positions=128"),
    (["--config.model.n_head=3"], "n_embd=64: must be divisible by n_head=3"),
    (["--bogus=1"], "unknown flag --bogus"),
])
def test_bad_overrides_name_the_field(args, message):
    with pytest.raises(ValueError) as e:
        parse(*args)
    assert message in str(e.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config 'gpt3'"):
        configs.parse_args(["--config=gpt3"])


@pytest.mark.parametrize("step,lr", [(0, 0.0), (1, 6e-4 / 5000), (2_500, 3e-4), (5_000, 6e-4),
                                     (52_500, 3e-4), (99_999, 6e-4 / 95_000), (100_000, 0.0)])
def test_gpt2_small_schedule(step, lr):
    schedule = optim.make_schedule(configs.get_config("gpt2_small"))
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-15)


def _paths(tree):
    return {"/".join(k.key for k in path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if leaf}


def test_weight_decay_reaches_exactly_the_linear_kernels():
    cfg = configs.get_config("tiny")
    model_cfg = configs.model_from_config(cfg)
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
    cfg = configs.get_config("gpt2_small")
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
    cfg = configs.get_config("tiny")
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
    cfg = configs.get_config("tiny")
    cfg.batch_size, cfg.microbatch_size, cfg.grad_accum_steps = batch, micro, accum
    with pytest.raises(ValueError, match=message):
        accumulation(cfg, devices)


def test_every_parameter_of_backpack_small_has_a_rule():
    mesh = AbstractMesh((2, 2, 4), sharding.MESH_AXES)
    abstract = checkpoint.abstract_params(model_preset("backpack_gpt2"))
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
    cfg = configs.get_config("tiny")
    params = checkpoint.abstract_params(configs.model_from_config(cfg))
    opt_state = jax.eval_shape(optim.make_optimizer(cfg).init, params)
    specs = sharding.tree_shardings(opt_state, mesh)
    mu = specs[1][0].mu["backpack"]["gpt2_model"]["h_1"]["mlp"]["c_fc"]["kernel"]
    assert mu.spec == P("fsdp", "tensor")
    assert specs[1][0].count.spec == P()


def test_flops_per_token_of_backpack_small():
    # /work/shared/BACKPACK.md: about 1.11 GFLOP per training token at sequence length 512.
    flops = train_flops_per_token(model_preset("backpack_gpt2"), 512)
    assert flops == pytest.approx(1.11e9, rel=0.01)


@pytest.mark.parametrize("preset", ["backpack_gpt2", "tiny"])
def test_sense_network_macs_are_its_kernels(preset):
    """What a sense table saves per token: one multiply-add per sense-network kernel weight."""
    config = model_preset(preset)
    tree = checkpoint.abstract_params(config)["backpack"]["sense_network"]
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
