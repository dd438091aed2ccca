"""End to end: `python -m train.run` on the embedded corpus with a very small model.

Checks resume after SIGTERM and SIGKILL (same losses as an uninterrupted run), two processes
with CPU collectives, NaN handling, an interrupted checkpoint write, `--init_from`,
`python -m train.eval`, and that both entry points report a user's mistake in one line.
"""

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, hf, model
from backpack_jax.config import get_model_config
from tests import train_helpers as th
from train import data, metrics
from train.loss import cross_entropy
from train.run import TrainingDiverged, main, train

# A workdir written before the one-config change (see tests/fixtures/README.md).
OLD_WORKDIR = th.ROOT / "tests" / "fixtures" / "tiny_workdir_caeb19e"


@pytest.mark.slow
def test_run_logs_checkpoints_and_plots(trained_run):
    workdir, out = trained_run.workdir, trained_run.out
    losses = th.losses(workdir)
    assert losses[1][0] == pytest.approx(math.log(50264), abs=0.05)  # Near-uniform at init.
    assert losses[th.STEPS][0] < losses[1][0] - 0.5, losses  # It learns.
    assert losses[15][1] is not None and losses[th.STEPS][1] is not None
    assert th.steps(workdir) == [24, 27, 30]  # Keeps the last 3.
    curve = workdir / metrics.CURVE_FILE
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"checkpoint: {workdir}/checkpoints/{th.STEPS}" in out and str(curve) in out
    params, cfg = checkpoint.load(workdir)  # The shared on-disk format reads a training run.
    assert cfg == get_model_config(th.config())
    assert np.isfinite(params["backpack"]["gpt2_model"]["wte"]["embedding"]).all()


@pytest.mark.slow
def test_preempted_then_killed_run_resumes_with_the_same_losses(trained_run, tmp_path):
    workdir = tmp_path / "resumed"
    proc = th.start(workdir)
    th.wait_for_step_above(proc, workdir, 0)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = th.finish(proc)
    assert rc == 0 and "preempted (SIGTERM): saved step" in out, (out, err)
    preempted_at = max(th.steps(workdir))
    assert preempted_at < th.STEPS, "the run ended before SIGTERM arrived; make it longer"

    proc = th.start(workdir)
    th.wait_for_step_above(proc, workdir, preempted_at)
    proc.kill()  # SIGKILL: no chance to save; possibly in the middle of a checkpoint write.
    proc.wait()
    killed_at = max(th.steps(workdir))
    assert killed_at < th.STEPS, "the run ended before SIGKILL arrived; make it longer"

    rc, out, err = th.run(workdir)
    assert rc == 0 and f"resuming from step {killed_at}" in out, (out, err)
    assert th.losses(workdir) == th.losses(trained_run.workdir)


@pytest.mark.slow
def test_two_processes_log_the_same_losses_as_one(trained_run, tmp_path):
    workdir = tmp_path / "two_processes"
    procs = [th.start(workdir, env={"JAX_COORDINATOR_ADDRESS": "localhost:23571",
                                    "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    results = [th.finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, (out, err)
    assert "on 2 cpu device(s)" in results[0][1]
    one, two = th.losses(trained_run.workdir), th.losses(workdir)
    assert sorted(two) == sorted(one)
    # The gradient is summed across two devices in another order: the first steps agree to
    # float32 rounding, later ones drift apart slowly as Adam amplifies the differences.
    for step in one:
        np.testing.assert_allclose(two[step][0], one[step][0], atol=1e-5 if step <= 10 else 1e-3)


@pytest.mark.slow
def test_interrupted_checkpoint_write_keeps_the_previous_one(trained_run, tmp_path):
    workdir = tmp_path / "interrupted"
    shutil.copytree(trained_run.workdir, workdir)
    # Save step STEPS+1 in a child that dies just before Orbax's final rename (its commit).
    script = f"""
import os, jax
from orbax.checkpoint._src.path import atomicity
from backpack_jax.config import get_model_config
from tests import train_helpers as th
from train import optim, sharding, step
from train.checkpoints import TrainCheckpoints
cfg = th.config()
model_cfg = get_model_config(cfg)
abstract = step.abstract_state(cfg, model_cfg, optim.make_optimizer(cfg))
shardings = step.state_shardings(abstract, sharding.make_mesh((1, 1, 1)))
ckpts = TrainCheckpoints({str(workdir)!r}, 3)
state, data_state = ckpts.restore({th.STEPS}, abstract, shardings)
state = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params))

async def die(self):
    os._exit(17)
atomicity.AtomicRenameTemporaryPath.finalize = die
ckpts.save(state, data_state)
ckpts.wait_until_finished()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=th.ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 17, proc.stderr[-3000:]
    partial = list((workdir / checkpoint.STEPS_DIR).glob(f"{th.STEPS + 1}.orbax-checkpoint-tmp*"))
    # The arrays were written (each item has its own tmp dir inside), but nothing committed.
    assert partial and list(partial[0].glob("params*/_METADATA")), "not interrupted mid-way"
    assert th.steps(workdir) == [24, 27, 30]
    loaded, _ = checkpoint.load(workdir)
    previous, _ = checkpoint.load(trained_run.workdir)
    jax.tree.map(np.testing.assert_array_equal, loaded, previous)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = th.config(lr=1e12, warmup_steps=0, checkpoint_every=1, steps=8, eval_every=100)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path)
    message = str(e.value)
    bad = int(message.split(" at step ")[1].split(";")[0])
    assert ("loss is nan" in message or "loss is inf" in message) and bad > 1, message
    assert th.steps(tmp_path) == list(range(1, bad)), message
    assert f"last good checkpoint is {tmp_path}/checkpoints/{bad - 1}" in message
    params, _ = checkpoint.load(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_init_from_a_converted_model(trained_run, tmp_path):
    params, model_cfg = checkpoint.load(trained_run.workdir)
    converted = tmp_path / "converted"
    checkpoint.save(converted, params, model_cfg)
    cfg = th.config(steps=1, warmup_steps=0, eval_every=100)
    summary = train(cfg, tmp_path / "finetune", init_from=str(converted))
    batch = next(data.make_batches(None, data.TRAIN, seq_len=cfg.seq_len,
                                   batch_size=cfg.batch_size, seed=cfg.seed))
    logits = model.apply(params, batch["inputs"], model_cfg).logits
    expected = float(cross_entropy(logits, batch["targets"]))
    assert summary["first_loss"] == pytest.approx(expected, abs=1e-4)
    assert expected < math.log(50264) - 0.5  # Far from a fresh model's loss.

    with pytest.raises(ValueError, match="n_layer"):
        train(th.config(**{"model.n_layer": 2}), tmp_path / "mismatch", init_from=str(converted))


def test_a_finished_run_run_again_reports_its_last_heldout_loss(trained_run, capsys, tmp_path):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "w")
    logged = th.losses(workdir)[th.STEPS][1]
    summary = train(th.config(), str(workdir))
    assert summary["step"] == th.STEPS and summary["eval_loss"] == logged
    assert f"held-out loss {round(logged, 4)} (the first" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_cli_reproduces_the_logged_heldout_loss(trained_run, capsys, tmp_path):
    workdir = trained_run.workdir
    logged = th.losses(workdir)[th.STEPS][1]
    from train import eval as train_eval
    result = train_eval.main(["--checkpoint", str(workdir), "--batches", "2", "--batch_size",
                              "4", "--seq_len", "32"])
    loss = result["loss"]
    assert loss == pytest.approx(logged, abs=1e-4) and result["perplexity"] == pytest.approx(
        math.exp(loss), rel=1e-6)
    assert f" {loss:.4f} |" in capsys.readouterr().out
    # A converted model directory works the same way.
    converted = tmp_path / "converted"
    checkpoint.save(converted, *checkpoint.load(workdir))
    train_eval.main(["--checkpoint", str(converted), "--batches", "2", "--batch_size", "4",
                     "--seq_len", "32"])
    assert f" {loss:.4f} |" in capsys.readouterr().out


def test_eval_table_and_json_equal_model_apply(tmp_path, capsys):
    """`train.eval`'s loss against a numpy cross-entropy of model.apply on the same batches."""
    from train import eval as train_eval
    train_eval.main(["--checkpoint", str(OLD_WORKDIR), "--batches", "2", "--batch_size", "2",
                     "--seq_len", "16", "--json", str(tmp_path / "eval.json")])
    params, model_cfg = checkpoint.load(OLD_WORKDIR)
    nll = []
    for batch in itertools.islice(data.make_eval_batches(None, data.HELDOUT, seq_len=16,
                                                         batch_size=2), 2):
        logits = np.asarray(model.apply(params, batch["inputs"], model_cfg).logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.append(-np.take_along_axis(logp, batch["targets"][..., None], -1).mean())
    loss = float(np.mean(nll))
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["batches"] == 2
    assert result["table"]["rows"][str(OLD_WORKDIR)] == {
        "loss (nats/token)": result["loss"], "perplexity": result["perplexity"]}
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    out = capsys.readouterr().out
    assert "held-out perplexity: split 'heldout'" in out and f" {loss:.4f} |" in out


@pytest.mark.parametrize("override,message", [
    ("--config.model.n_layr=2", "error: unknown config field 'n_layr'; Did you mean \"n_layer\""),
    ("--config.stepz=3", "error: unknown config field 'stepz'"),
    ("--config.steps=abc", "error: flag --config.steps=abc: invalid literal for int()"),
    ("--config.steps=1.5", "error: flag --config.steps=1.5:"),
])
def test_bad_override_stops_before_any_work(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as e:
        main(["--config=tiny", override, f"--workdir={tmp_path / 'w'}"])
    assert e.value.code == 2
    usage, error = capsys.readouterr().err.splitlines()
    assert error.startswith(message) and usage.startswith("usage: python -m train.run")
    assert not (tmp_path / "w").exists()


def _one_line_error(entry_point, argv, capsys):
    """The message of a user's mistake, checked to be one `error: ...` line and exit status 2."""
    with pytest.raises(SystemExit) as e:
        entry_point(argv)
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.startswith("error: ") and message.count("\n") == 1, (
        message)
    return message.rstrip("\n")


@pytest.mark.slow
def test_missing_openwebtext_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", "--config=gpt2_small",
         f"--config.data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"],
        cwd=th.ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: no prepared dataset 'openwebtext' in {tmp_path}; available: none."), proc.stderr
    assert not (tmp_path / "w").exists()


def test_bad_init_from_is_one_line(tmp_path, capsys):
    args = th.ARGS + [f"--workdir={tmp_path / 'w'}"]
    message = _one_line_error(main, args + [f"--init_from={tmp_path / 'nothing'}"], capsys)
    assert message == (f"error: checkpoint path {tmp_path / 'nothing'} does not exist (nor is it "
                       "a Hub id such as stanfordnlp/backpack-gpt2)")
    message = _one_line_error(main, args + [f"--init_from={OLD_WORKDIR}"], capsys)
    assert message.startswith(f"error: --init_from={OLD_WORKDIR}: its architecture differs")
    assert "'n_embd': (4, 32)" in message
    assert not (tmp_path / "w").exists()


def test_eval_errors_are_one_line(tmp_path, capsys):
    from train import eval as train_eval
    message = _one_line_error(train_eval.main, ["--checkpoint", str(tmp_path / "nothing")], capsys)
    assert message == (f"error: checkpoint path {tmp_path / 'nothing'} does not exist (nor is it "
                       "a Hub id such as stanfordnlp/backpack-gpt2)")
    message = _one_line_error(train_eval.main, ["--checkpoint", str(OLD_WORKDIR), "--data",
                                                "nothing", "--data_dir", str(tmp_path)], capsys)
    assert message.startswith(f"error: no prepared dataset 'nothing' in {tmp_path}")
    # A config.json that does not describe the saved parameters.
    mismatch = tmp_path / "mismatch"
    shutil.copytree(OLD_WORKDIR, mismatch)
    config = json.loads((mismatch / hf.CONFIG_FILE).read_text())
    (mismatch / hf.CONFIG_FILE).write_text(json.dumps({**config, "n_embd": 16}))
    message = _one_line_error(train_eval.main, ["--checkpoint", str(mismatch)], capsys)
    assert "does not hold the model its config.json describes" in message, message
