"""End to end: `python -m train.run` on the embedded corpus with a very small model.

Checks resume after SIGTERM and SIGKILL (same losses as an uninterrupted run), two processes
with CPU collectives, NaN handling, an interrupted checkpoint write, `--init_from`, and
`python -m train.eval`.
"""

import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, model
from train import configs, data, metrics
from train.loss import cross_entropy
from train.run import TrainingDiverged, main, train

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
OVERRIDES = {"model.n_embd": 32, "model.n_layer": 1, "seq_len": 32, "batch_size": 4,
             "steps": STEPS, "warmup_steps": 2, "log_every": 1, "eval_every": 15,
             "eval_batches": 2, "checkpoint_every": 3}
ARGS = ["--config=tiny"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _config(**changes):
    cfg = configs.get_config("tiny")
    for key, value in {**OVERRIDES, **changes}.items():
        configs.apply_override(cfg, key, str(value))
    return cfg


def _env(cache):
    # A shared compilation cache makes the restarted processes start faster.
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _start(workdir, cache, extra_env=None, args=ARGS):
    return subprocess.Popen([sys.executable, "-m", "train.run", *args, f"--workdir={workdir}"],
                            cwd=ROOT, env={**_env(cache), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _steps(workdir):
    directory = pathlib.Path(workdir) / checkpoint.STEPS_DIR
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())


def _wait_for_step_above(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s > step for s in _steps(workdir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint above {step} appeared; process ended: {proc.poll()}")


def _losses(workdir):
    return {r["step"]: (r["loss"], r.get("eval_loss")) for r in metrics.read_metrics(workdir)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    rc, out = _finish(_start(workdir, cache))
    assert rc == 0, out
    return workdir, out


def test_run_logs_checkpoints_and_plots(uninterrupted):
    workdir, out = uninterrupted
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[1][0] == pytest.approx(math.log(50264), abs=0.05)  # Near-uniform at init.
    assert losses[STEPS][0] < losses[1][0] - 0.5, losses  # It learns.
    assert losses[15][1] is not None and losses[STEPS][1] is not None
    assert _steps(workdir) == [24, 27, 30]  # Keeps the last 3.
    curve = workdir / metrics.CURVE_FILE
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"checkpoint: {workdir}/checkpoints/{STEPS}" in out and str(curve) in out
    params, cfg = checkpoint.load(workdir)  # The shared on-disk format reads a training run.
    assert cfg == configs.model_from_config(_config())
    assert np.isfinite(params["backpack"]["gpt2_model"]["wte"]["embedding"]).all()


def test_preempted_then_killed_run_resumes_with_the_same_losses(uninterrupted, cache, tmp_path):
    workdir = tmp_path / "resumed"
    proc = _start(workdir, cache)
    _wait_for_step_above(proc, workdir, 0)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0 and "preempted (SIGTERM): saved step" in out, out
    preempted_at = max(_steps(workdir))
    assert preempted_at < STEPS, "the run ended before SIGTERM arrived; make it longer"

    proc = _start(workdir, cache)
    _wait_for_step_above(proc, workdir, preempted_at)
    proc.kill()  # SIGKILL: no chance to save; possibly in the middle of a checkpoint write.
    proc.wait()
    killed_at = max(_steps(workdir))
    assert killed_at < STEPS, "the run ended before SIGKILL arrived; make it longer"

    rc, out = _finish(_start(workdir, cache))
    assert rc == 0 and f"resuming from step {killed_at}" in out, out
    assert _losses(workdir) == _losses(uninterrupted[0])


def test_two_processes_log_the_same_losses_as_one(uninterrupted, cache, tmp_path):
    workdir = tmp_path / "two_processes"
    procs = [_start(workdir, cache, {"JAX_COORDINATOR_ADDRESS": "localhost:23571",
                                     "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    results = [_finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0, out
    assert "on 2 cpu device(s)" in results[0][1]
    one, two = _losses(uninterrupted[0]), _losses(workdir)
    assert sorted(two) == sorted(one)
    # The gradient is summed across two devices in another order: the first steps agree to
    # float32 rounding, later ones drift apart slowly as Adam amplifies the differences.
    for step in one:
        np.testing.assert_allclose(two[step][0], one[step][0], atol=1e-5 if step <= 10 else 1e-3)


def test_interrupted_checkpoint_write_keeps_the_previous_one(uninterrupted, tmp_path):
    workdir = tmp_path / "interrupted"
    shutil.copytree(uninterrupted[0], workdir)
    # Save step STEPS+1 in a child that dies just before Orbax's final rename (its commit).
    script = f"""
import os, jax
from orbax.checkpoint._src.path import atomicity
from train import configs, optim, sharding, step
from train.checkpoints import TrainCheckpoints
cfg = configs.get_config("tiny")
for k, v in {OVERRIDES!r}.items():
    configs.apply_override(cfg, k, str(v))
model_cfg = configs.model_from_config(cfg)
abstract = step.abstract_state(cfg, model_cfg, optim.make_optimizer(cfg))
shardings = step.state_shardings(abstract, sharding.make_mesh((1, 1, 1)))
ckpts = TrainCheckpoints({str(workdir)!r}, 3)
state, data_state = ckpts.restore({STEPS}, abstract, shardings)
state = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params))

async def die(self):
    os._exit(17)
atomicity.AtomicRenameTemporaryPath.finalize = die
ckpts.save(state, data_state)
ckpts.wait_until_finished()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 17, proc.stderr[-3000:]
    partial = list((workdir / checkpoint.STEPS_DIR).glob(f"{STEPS + 1}.orbax-checkpoint-tmp*"))
    # The arrays were written (each item has its own tmp dir inside), but nothing committed.
    assert partial and list(partial[0].glob("params*/_METADATA")), "not interrupted mid-way"
    assert _steps(workdir) == [24, 27, 30]
    loaded, _ = checkpoint.load(workdir)
    previous, _ = checkpoint.load(uninterrupted[0])
    jax.tree.map(np.testing.assert_array_equal, loaded, previous)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _config(lr=1e12, warmup_steps=0, checkpoint_every=1, steps=8, eval_every=100)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path)
    message = str(e.value)
    bad = int(message.split(" at step ")[1].split(";")[0])
    assert ("loss is nan" in message or "loss is inf" in message) and bad > 1, message
    assert _steps(tmp_path) == list(range(1, bad)), message
    assert f"last good checkpoint is {tmp_path}/checkpoints/{bad - 1}" in message
    params, _ = checkpoint.load(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_from_a_converted_model(uninterrupted, tmp_path):
    params, model_cfg = checkpoint.load(uninterrupted[0])
    converted = tmp_path / "converted"
    checkpoint.save(converted, params, model_cfg)
    cfg = _config(steps=1, warmup_steps=0, eval_every=100)
    summary = train(cfg, tmp_path / "finetune", init_from=str(converted))
    batch = next(data.make_batches(None, data.TRAIN, seq_len=cfg.seq_len,
                                   batch_size=cfg.batch_size, seed=cfg.seed))
    logits = model.apply(params, batch["inputs"], model_cfg).logits
    expected = float(cross_entropy(logits, batch["targets"]))
    assert summary["first_loss"] == pytest.approx(expected, abs=1e-4)
    assert expected < math.log(50264) - 0.5  # Far from a fresh model's loss.

    with pytest.raises(ValueError, match="n_layer"):
        train(_config(**{"model.n_layer": 2}), tmp_path / "mismatch", init_from=str(converted))


def test_eval_cli_reproduces_the_logged_heldout_loss(uninterrupted, capsys, tmp_path):
    workdir, _ = uninterrupted
    logged = _losses(workdir)[STEPS][1]
    from train import eval as train_eval
    train_eval.main(["--checkpoint", str(workdir), "--batches", "2", "--batch_size", "4",
                     "--seq_len", "32"])
    out = capsys.readouterr().out
    loss = float(out.split("held-out loss ")[1].split()[0])
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert loss == pytest.approx(logged, abs=1e-4) and ppl == pytest.approx(math.exp(loss),
                                                                            rel=1e-3)
    # A converted model directory works the same way.
    converted = tmp_path / "converted"
    checkpoint.save(converted, *checkpoint.load(workdir))
    train_eval.main(["--checkpoint", str(converted), "--batches", "2", "--batch_size", "4",
                     "--seq_len", "32"])
    assert f"held-out loss {loss:.4f}" in capsys.readouterr().out


def test_bad_override_stops_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config=tiny", "--config.model.n_layr=2", f"--workdir={tmp_path / 'w'}"])
    assert "unknown config field 'model.n_layr'" in str(e.value.code)
    assert not (tmp_path / "w").exists()
