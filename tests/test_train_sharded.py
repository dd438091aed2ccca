"""The sharded train step computes what one device computes.

Runs this file as a script in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set
before JAX starts), trains a small-vocabulary model with dropout on stand-in batches (counting
sequences), and compares the first steps' losses across mesh shapes (one with remat).
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # A subprocess with 8 simulated devices.

STEPS = 3
VOCAB = 512

# (name, mesh_shape, overrides): each must match the one-device run within 1e-5 (float32).
RUNS = [
    ("mesh_8_1_1", (8, 1, 1), {}),
    ("mesh_2_4_1_remat", (2, 4, 1), {"remat": "full"}),
    ("mesh_2_2_2", (2, 2, 2), {}),
]


def _losses(mesh_shape, overrides, devices):
    import numpy as np

    from backpack_jax.config import get_config, get_model_config
    from train import optim, sharding, step

    cfg = get_config("tiny")
    cfg.model.update(vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                     n_positions=32, n_embd=32, n_layer=2,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    cfg.update(seq_len=32, batch_size=16, steps=10, warmup_steps=0, lr=1e-2, mesh_shape=mesh_shape)
    cfg.update(overrides)
    model_cfg = get_model_config(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape, devices[:math.prod(mesh_shape)])
    optimizer = optim.make_optimizer(cfg)
    shardings = step.state_shardings(step.abstract_state(cfg, model_cfg, optimizer), mesh)
    state = step.init_state(cfg, model_cfg, optimizer, shardings)
    train_step = step.make_train_step(cfg, model_cfg, optimizer, optim.make_schedule(cfg), mesh,
                                      shardings)
    # Stand-in data the model can learn fast: rows count up (mod VOCAB) from random starts.
    starts = np.random.default_rng(0).integers(0, VOCAB, (STEPS, cfg.batch_size, 1))
    rows = (starts + np.arange(cfg.seq_len + 1)) % VOCAB
    losses = []
    for ids in rows.astype(np.int32):
        batch = step.global_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]}, mesh,
                                  cfg.batch_size)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    kernel = state.params["backpack"]["gpt2_model"]["h_0"]["mlp"]["c_fc"]["kernel"]
    return {"losses": losses, "kernel_spec": str(kernel.sharding.spec)}


def _worker():
    import jax

    assert jax.device_count() == 8, jax.devices()
    out = {"one_device": _losses((1, 1, 1), {}, jax.devices())}
    for name, mesh_shape, overrides in RUNS:
        out[name] = _losses(mesh_shape, overrides, jax.devices())
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_one_device_run_learns(results):
    # The updates move the loss by far more than the tolerance, so later steps check them too.
    losses = results["one_device"]["losses"]
    assert len(losses) == STEPS and losses[0] - losses[-1] > 100 * 1e-5, losses


@pytest.mark.parametrize("name", [run[0] for run in RUNS])
def test_losses_match_one_device(results, name):
    losses, expected = results[name]["losses"], results["one_device"]["losses"]
    assert len(losses) == STEPS
    for got, want in zip(losses, expected, strict=True):
        assert abs(got - want) < 1e-5, (name, losses, expected)


def test_parameters_are_actually_sharded(results):
    assert results["mesh_2_2_2"]["kernel_spec"] == "P('fsdp', 'tensor')"
    assert results["mesh_2_4_1_remat"]["kernel_spec"] == "P('fsdp', 'tensor')"


if __name__ == "__main__":
    _worker()
