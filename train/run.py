"""Train a Backpack language model.

    python -m train.run --config=NAME [--workdir=DIR] [--init_from=PATH] [--config.FIELD=VALUE ...]

NAME is a preset of `backpack_jax.config` (gpt2_small, gpt2_mini, gpt2_micro, tiny);
`--config.FIELD=VALUE` overrides one of its fields (nested: `--config.model.n_layer=3`), parsed
and type-checked by ml_collections' `config_flags`. The workdir defaults to /tmp/backpack_NAME.
A workdir that already holds checkpoints is resumed from its newest step that restores (same
losses as an uninterrupted run; damaged newer steps are moved aside). One run at a time holds a
workdir (WORKDIR/lock). SIGTERM saves a checkpoint and exits cleanly; a NaN or infinite loss stops
the run, keeping the last good checkpoint; so does a failed write (a full disk). Each checkpoint
records a fingerprint of the training data: resuming on other data stops, unless
BACKPACK_ALLOW_DATA_CHANGE=1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from backpack_jax import checkpoint, cli, hf
from backpack_jax.atomic import atomic_path
from backpack_jax.config import PRESETS, BackpackConfig, get_config, get_model_config
from backpack_jax.flops import train_flops_per_token
from train import data, optim, sharding
from train.checkpoints import TrainCheckpoints, WriteFailed
from train.configs import validate
from train.eval import heldout_loss
from train.lock import WorkdirBusy, WorkdirLock, lock_workdir
from train.metrics import (
    CURVE_FILE,
    MetricsLog,
    peak_flops_per_device,
    plot_loss_curve,
    read_metrics,
)
from train.step import (
    abstract_state,
    accumulation,
    global_batch,
    init_state,
    make_eval_step,
    make_model,
    make_train_step,
    state_shardings,
)

TRAIN_CONFIG_FILE = "train_config.json"
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
FINGERPRINT = "fingerprint"  # Its key in a checkpoint's data state.
# Like BACKPACK_LOCK_TIMEOUT, a variable of the environment, not a config field: it acknowledges a
# resume and is no part of the recipe, which train_config.json records and every resume compares
# (setting a field would be refused as another config, and so would older workdirs, without it).
ALLOW_DATA_CHANGE_ENV = "BACKPACK_ALLOW_DATA_CHANGE"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class _Preemption:
    """Notices SIGTERM; with several processes JAX's preemption service agrees on the step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key whose values differ."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)}


def _initial_params(init_from: str, model_cfg: BackpackConfig):
    """Parameters of a converted / trained checkpoint whose architecture matches the config."""
    params, loaded = checkpoint.load(init_from)
    differ = _differences(dataclasses.asdict(loaded), dataclasses.asdict(model_cfg))
    differ = {k: v for k, v in differ.items() if k not in DROPOUT_FIELDS}
    if differ:
        raise ValueError(f"--init_from={init_from}: its architecture differs from the config's "
                         f"model (checkpoint, config): {differ}")
    return params


def _check_train_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    """Records the config; a resumed run with another config is refused."""
    path = workdir / TRAIN_CONFIG_FILE
    now = json.loads(config.to_json())
    if path.exists():
        saved = json.loads(path.read_text())
        # The saved model is read as a config.json is, by the same rule: a field removed because
        # it never changed the model (recorded with its one implemented value) still resumes.
        saved["model"] = dataclasses.asdict(BackpackConfig.from_hf_dict(saved["model"]))
        now["model"] = dataclasses.asdict(get_model_config(config))
        differ = _differences(saved, now)
        if differ:
            raise ValueError(f"{workdir} holds a run with another config (saved, now): {differ}; "
                             "use a new --workdir")
    elif jax.process_index() == 0:
        with atomic_path(path) as tmp:  # Other processes may read it: whole or not at all.
            tmp.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")


def _allow_data_change() -> bool:
    value = os.environ.get(ALLOW_DATA_CHANGE_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ALLOW_DATA_CHANGE_ENV}={value!r} must be 1 or 0")
    return value == "1"


def _resume_data(batches: data.BatchIterator, data_state: dict[str, Any],
                 fingerprint: dict[str, Any], step: int, allow_change: bool) -> None:
    """Puts `batches` where the checkpoint left them, on the data it recorded or, if a change is
    allowed, at the same batch of the data there is now. Raises ValueError saying what changed."""
    saved = data_state.pop(FINGERPRINT, None)  # None: saved before fingerprints were recorded.
    changes = [] if saved is None else data.fingerprint_changes(saved, fingerprint)
    if changes and not allow_change:
        raise ValueError(f"the training data changed since step {step}: {'; '.join(changes)}; "
                         f"set {ALLOW_DATA_CHANGE_ENV}=1 to resume on it, or use another --workdir")
    if allow_change:
        if changes and jax.process_index() == 0:
            print(f"warning: the training data changed since step {step} ({'; '.join(changes)}); "
                  f"resuming on it ({ALLOW_DATA_CHANGE_ENV}=1)", file=sys.stderr, flush=True)
        data_state["pipeline"] = batches.get_state()["pipeline"]  # Its window count may differ.
    batches.set_state(data_state)


@dataclasses.dataclass
class _Run:
    """A run ready to train: everything the user's input could make fail is done."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: Any
    batches: data.BatchIterator
    fingerprint: dict[str, Any]  # Of the training data, recorded in each checkpoint.
    state: Any
    ckpts: TrainCheckpoints
    lock: WorkdirLock | None  # Process 0's; released when the run ends.
    train_step: Callable
    eval_step: Callable


def prepare(config: ml_collections.ConfigDict, workdir: str, init_from: str | None = None
            ) -> _Run:
    """Validates the config, opens the data, loads `init_from` or the latest checkpoint.

    Raises FileNotFoundError or ValueError naming the user's mistake (or data that changed since
    the checkpoint), WorkdirBusy if another run holds the workdir, OSError if the workdir cannot
    be written (a full disk). The dataset and `init_from` are read before the workdir is written,
    so that a mistake in either leaves nothing behind that a corrected command would have to
    match; the lock is taken before anything in it is written.
    """
    validate(config)
    allow_data_change = _allow_data_change()
    workdir = pathlib.Path(workdir).expanduser().absolute()
    primary = jax.process_index() == 0
    model_cfg = get_model_config(config)
    mesh = sharding.make_mesh(config.mesh_shape)
    accum, micro = accumulation(config, sharding.batch_devices(mesh))
    batches = data.make_batches(config.data, data.TRAIN, seq_len=config.seq_len,
                                batch_size=config.batch_size, seed=config.seed,
                                data_dir=config.data_dir, process_index=jax.process_index(),
                                process_count=jax.process_count())
    fingerprint = data.fingerprint(config.data, config.data_dir)
    resuming = checkpoint.latest_step_dir(workdir) is not None
    params = _initial_params(init_from, model_cfg) if init_from and not resuming else None
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as undo:  # Until the run is ready; then `_loop` cleans up.
        lock = lock_workdir(workdir)
        if lock is not None:
            undo.callback(lock.release)
        _check_train_config(workdir, config)
        optimizer, schedule = optim.make_optimizer(config), optim.make_schedule(config)
        ckpts = TrainCheckpoints(workdir, config.keep_checkpoints)
        undo.callback(ckpts.close)  # Orbax's threads would otherwise chatter at exit.
        abstract = abstract_state(config, model_cfg, optimizer)
        shardings = state_shardings(abstract, mesh)
        restored = ckpts.restore_latest(abstract, shardings)
        if restored is not None:
            state, data_state = restored
            _resume_data(batches, data_state, fingerprint, int(state.step), allow_data_change)
        else:
            state = init_state(config, model_cfg, optimizer, shardings, params)
        if primary:
            hf.write_config(workdir, model_cfg)
        run = _Run(config, workdir, mesh, batches, fingerprint, state, ckpts, lock,
                   make_train_step(config, model_cfg, optimizer, schedule, mesh, shardings),
                   make_eval_step(make_model(model_cfg, config.dtype, config.remat), accum, mesh,
                                  shardings.params))
        undo.pop_all()
    if primary:
        how = (f"resuming from step {int(state.step)}" if restored is not None
               else f"starting from {init_from}" if init_from else "starting")
        print(f"{how}: {config.steps} steps of {config.batch_size} x {config.seq_len} tokens on "
              f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh "
              f"{dict(mesh.shape)}, {accum} micro-batch(es) of {micro} per device; "
              f"workdir {workdir}", flush=True)
    return run


@contextlib.contextmanager
def _writing(path: pathlib.Path, ckpts: TrainCheckpoints) -> Iterator[None]:
    """Turns a failed write of `path` (a full disk) into WriteFailed, once the save in flight
    is done: the run stops in one line that names the step a rerun resumes from."""
    try:
        yield
    except OSError as e:
        ckpts.wait_until_finished()
        raise WriteFailed(f"writing {path}", e, ckpts.latest_step()) from None


class _Log:
    """Per-step bookkeeping: throughput, metrics.jsonl and the progress bar."""

    def __init__(self, run: _Run, start: int) -> None:
        config = run.config
        self.run, self.start, self.last_eval = run, start, None
        self.primary = jax.process_index() == 0
        self.metrics = MetricsLog(run.workdir, enabled=self.primary)
        with _writing(self.metrics.path, run.ckpts):
            self.metrics.truncate_after(start)
        self.tokens_per_step = config.batch_size * config.seq_len
        self.flops_per_step = self.tokens_per_step * train_flops_per_token(
            get_model_config(config), config.seq_len)
        self.peak = peak_flops_per_device(jax.devices()[0].device_kind, config.peak_flops)
        self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step",
                        disable=not self.primary, dynamic_ncols=True)
        self.clock = (time.perf_counter(), start)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time spent inside (an evaluation) out of the throughput."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.clock = (self.clock[0] + time.perf_counter() - began, self.clock[1])

    def step(self, step: int, metrics: dict[str, float], eval_loss: float | None = None) -> None:
        """Records `step`: every `log_every` steps, and whenever it comes with an evaluation."""
        self.bar.update(step - self.bar.n)
        if step == self.start + 1:
            self.clock = (time.perf_counter(), step)  # Throughput excludes compilation.
        if step % self.run.config.log_every and eval_loss is None:
            return
        now = time.perf_counter()
        seconds, steps = now - self.clock[0], step - self.clock[1]
        self.clock = (now, step)
        record = {"step": step, **metrics}
        if steps:
            record["tokens_per_s"] = self.tokens_per_step * steps / seconds
            if self.peak is not None:
                record["mfu"] = (self.flops_per_step * steps / seconds
                                 / (self.peak * jax.device_count()))
        if eval_loss is not None:
            record["eval_loss"], record["eval_ppl"] = eval_loss, math.exp(eval_loss)
            self.last_eval = eval_loss
        with _writing(self.metrics.path, self.run.ckpts):
            self.metrics.write(record)
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "tokens_per_s",
                                                               "mfu", "eval_loss")
                              if k in record}, refresh=False)


def _read_metrics(step: int, metrics: dict[str, jax.Array], ckpts: TrainCheckpoints
                  ) -> dict[str, float]:
    """`step`'s metrics on the host; a non-finite loss stops the run (TrainingDiverged)."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics["loss"]):
        ckpts.wait_until_finished()
        good = ckpts.latest_step()
        raise TrainingDiverged(
            f"loss is {metrics['loss']} at step {step}; stopping without saving. " + (
                f"The last good checkpoint is {ckpts.directory / str(good)}"
                if good is not None else "No checkpoint was saved before it."))
    return metrics


def _evaluate(run: _Run, params: Any) -> float:
    """Held-out loss of `params` on the config's first `eval_batches` batches."""
    config = run.config
    loss, _ = heldout_loss(run.eval_step, params, run.mesh, config.data, seq_len=config.seq_len,
                           batch_size=config.batch_size, max_batches=config.eval_batches,
                           data_dir=config.data_dir)
    return loss


def _loop(run: _Run) -> dict[str, Any]:
    """Trains from the run's state to `config.steps`, saving and evaluating on schedule."""
    config, ckpts, state = run.config, run.ckpts, run.state
    start = int(state.step)
    pending = None  # (step, metrics on device): read one step late so the host runs ahead.
    saved_step = ckpts.latest_step()
    with contextlib.ExitStack() as cleanup:  # Last in, first out: the lock goes last.
        if run.lock is not None:
            cleanup.callback(run.lock.release)
        cleanup.callback(ckpts.close)  # Waits for a save in flight.
        preemption = cleanup.enter_context(contextlib.closing(_Preemption()))
        log = _Log(run, start)
        cleanup.callback(log.bar.close)
        for step in range(start + 1, config.steps + 1):
            if run.lock is not None:
                run.lock.check()
            batch = global_batch(next(run.batches), run.mesh, config.batch_size)
            state, metrics = run.train_step(state, batch)
            if pending is not None:
                log.step(pending[0], _read_metrics(*pending, ckpts))
                pending = None
            preempted = preemption.reached(step)
            save = step % config.checkpoint_every == 0 or step == config.steps or preempted
            evaluate = step % config.eval_every == 0 or step == config.steps
            if save or evaluate:  # Both need this step's state, so its metrics are read now.
                metrics = _read_metrics(step, metrics, ckpts)
                eval_loss = None
                if evaluate:
                    with log.paused():
                        eval_loss = _evaluate(run, state.params)
                log.step(step, metrics, eval_loss)
            else:
                pending = (step, metrics)
            if save:
                saved_step = ckpts.save(state, {**run.batches.get_state(),
                                                FINGERPRINT: run.fingerprint})
            if preempted:
                ckpts.wait_until_finished()
                if log.primary:
                    print(f"preempted (SIGTERM): saved step {step} in {ckpts.directory}; run the "
                          "same command to resume", flush=True)
                return {"step": step, "preempted": True}
        ckpts.wait_until_finished()  # A failed last save stops the run here, before the summary.
        curve = None
        if log.primary:
            with _writing(run.workdir / CURVE_FILE, ckpts):
                curve = plot_loss_curve(run.workdir)
    return _summary(run, int(state.step), saved_step, log, curve)


def _summary(run: _Run, step: int, saved_step: int | None, log: _Log,
             curve: pathlib.Path | None) -> dict[str, Any]:
    primary = log.primary
    records = read_metrics(run.workdir) if primary else []
    # The last evaluation logged, by this run or (a finished workdir run again) an earlier one.
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    eval_loss = log.last_eval if log.last_eval is not None or not evals else evals[-1]
    summary = {"step": step, "first_loss": records[0]["loss"] if records else None,
               "last_loss": records[-1]["loss"] if records else None,
               "eval_loss": eval_loss, "checkpoint": run.ckpts.directory / str(saved_step),
               "loss_curve": curve}
    if primary:
        held_out = None if eval_loss is None else round(eval_loss, 4)
        print(f"done: step {step}, train loss {summary['last_loss']:.4f} (its batch), held-out "
              f"loss {held_out} (the first {run.config.eval_batches} held-out batches; "
              f"train.eval covers the whole split)\n"
              f"checkpoint: {summary['checkpoint']} (load with "
              f"backpack_jax.checkpoint.load({str(run.workdir)!r}))\nloss curve: {curve}",
              flush=True)
    return summary


def train(config: ml_collections.ConfigDict, workdir: str, init_from: str | None = None
          ) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary with the last losses and paths."""
    return _loop(prepare(config, workdir, init_from))


USAGE = ("usage: python -m train.run --config=NAME [--workdir=DIR] [--init_from=PATH] "
         "[--config.FIELD=VALUE ...]")


def _unknown_field(error: AttributeError | KeyError) -> str:
    """ml_collections' message for a field the preset lacks, on one line."""
    detail = error.args[0] if error.args else error
    if isinstance(detail, KeyError):  # A ConfigDict's AttributeError wraps its KeyError.
        detail = detail.args[0]
    return f"unknown config field {detail}".replace("\n", "; ")


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, str | None]:
    """(config, workdir, init_from) from the command line, validated before any work.

    Raises ValueError naming the flag or field: a missing or unknown preset, an unknown field,
    a value of the wrong type, a config `validate` rejects.
    """
    preset = flags.FlagValues()
    flags.DEFINE_string("config", None, "preset name", flag_values=preset)
    try:
        rest = preset(["train.run", *argv], known_only=True)  # Keeps every other argument.
        if preset.config is None:
            raise ValueError(f"--config=NAME is required; choose from {sorted(PRESETS)}")
        parsed = flags.FlagValues()
        try:
            # Reads the --config.FIELD overrides from `rest`: each becomes a type-checked flag.
            config_flags.DEFINE_config_dict("config", get_config(preset.config),
                                            flag_values=parsed, sys_argv=rest)
        except (AttributeError, KeyError) as e:
            raise ValueError(_unknown_field(e)) from None
        flags.DEFINE_string("workdir", f"/tmp/backpack_{preset.config}",
                            "run directory; one that holds checkpoints is resumed",
                            flag_values=parsed)
        flags.DEFINE_string("init_from", None, "checkpoint to start from (same architecture)",
                            flag_values=parsed)
        extra = parsed(rest)[1:]
    except flags.Error as e:  # Unknown flag, wrongly typed value, missing value.
        raise ValueError(str(e)) from None
    if extra:
        raise ValueError(f"unexpected argument {extra[0]!r}")
    validate(parsed.config)
    return parsed.config, parsed.workdir, parsed.init_from


def main(argv: list[str] | None = None) -> None:
    """The command. absl's flags parse the command line, not `cli.parser`, since ml_collections'
    `--config.FIELD=VALUE` overrides need them; errors still follow `cli`: a mistake in the
    command or the workdir's state (bad preset or override, busy workdir, missing data, a bad
    --init_from) is the usage and/or one `error: ...` line with exit status 2. A run that fails
    after it started (a diverged loss, a lock taken over, a failed write) is one `error: ...`
    line with exit status 1: the command was right, and running it again can succeed."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        raise SystemExit(0)
    try:
        config, workdir, init_from = parse_args(argv)
    except ValueError as e:
        print(USAGE, file=sys.stderr)
        cli.fail(e)
    sharding.maybe_initialize_distributed()
    try:  # The user's input or the workdir's state, not a bug: one line.
        run = prepare(config, workdir, init_from)
    except (OSError, ValueError, WorkdirBusy) as e:
        cli.fail(e)
    try:
        _loop(run)
    except (TrainingDiverged, WorkdirBusy, WriteFailed) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
