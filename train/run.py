"""Train a Backpack language model.

    python -m train.run --config=tiny --workdir=/tmp/backpack_tiny [--init_from=PATH]
                        [--config.FIELD=VALUE ...]

A workdir that already holds checkpoints is resumed from its latest step (same losses as an
uninterrupted run). SIGTERM saves a checkpoint and exits cleanly; a NaN or infinite loss stops
the run, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

from backpack_jax import huge_pages

if __name__ == "__main__":  # glibc reads its tunables at start-up: before jax is loaded
    huge_pages.reexec_with_huge_pages()

import jax
import ml_collections
from jax.experimental import multihost_utils
from tqdm import tqdm

from backpack_jax import checkpoint
from backpack_jax.config import BackpackConfig
from train import configs, data, optim, sharding
from train.checkpoints import TrainCheckpoints
from train.eval import heldout_loss
from train.metrics import (MetricsLog, peak_flops_per_device, plot_loss_curve, read_metrics,
                           train_flops_per_token)
from train.step import (abstract_state, accumulation, global_batch, init_state, make_eval_step,
                        make_model, make_train_step, state_shardings)

TRAIN_CONFIG_FILE = "train_config.json"
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


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


def _initial_params(init_from: str, model_cfg: BackpackConfig):
    """Parameters of a converted / trained checkpoint whose architecture matches the config."""
    params, loaded = checkpoint.load(init_from)
    differ = {f.name: (getattr(loaded, f.name), getattr(model_cfg, f.name))
              for f in dataclasses.fields(BackpackConfig)
              if f.name not in DROPOUT_FIELDS
              and getattr(loaded, f.name) != getattr(model_cfg, f.name)}
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
        differ = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
                  if saved.get(k) != now.get(k)}
        if differ:
            raise ValueError(f"{workdir} holds a run with another config (saved, now): {differ}; "
                             "use a new --workdir")
    elif jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")  # Other processes may read it: write, then rename.
        tmp.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def train(config: ml_collections.ConfigDict, workdir: str, init_from: str | None = None
          ) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary with the last losses and paths."""
    configs.validate(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    primary = jax.process_index() == 0
    model_cfg = configs.model_from_config(config)
    mesh = sharding.make_mesh(config.mesh_shape)
    accum, micro = accumulation(config, sharding.batch_devices(mesh))
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    _check_train_config(workdir, config)
    if primary:
        checkpoint.write_config(workdir, model_cfg)

    optimizer, schedule = optim.make_optimizer(config), optim.make_schedule(config)
    ckpts = TrainCheckpoints(workdir, config.keep_checkpoints)
    batches = data.make_batches(config.data, data.TRAIN, seq_len=config.seq_len,
                                batch_size=config.batch_size, seed=config.seed,
                                data_dir=config.data_dir, process_index=jax.process_index(),
                                process_count=jax.process_count())
    preemption = _Preemption()
    latest = ckpts.latest_step()
    abstract = abstract_state(config, model_cfg, optimizer)
    shardings = state_shardings(abstract, mesh)
    if latest is not None:
        state, data_state = ckpts.restore(latest, abstract, shardings)
        batches.set_state(data_state)
    else:
        params = _initial_params(init_from, model_cfg) if init_from else None
        state = init_state(config, model_cfg, optimizer, shardings, params)
    start = int(state.step)
    log = MetricsLog(workdir, enabled=primary)
    log.truncate_after(start)

    train_step = make_train_step(config, model_cfg, optimizer, schedule, mesh, shardings)
    eval_step = make_eval_step(make_model(model_cfg, config.dtype, config.remat), accum, mesh,
                               shardings.params)
    tokens_per_step = config.batch_size * config.seq_len
    peak = peak_flops_per_device(jax.devices()[0].device_kind, config.peak_flops)
    flops_per_step = train_flops_per_token(model_cfg, config.seq_len) * tokens_per_step
    if primary:
        how = (f"resuming from step {start}" if latest is not None
               else f"starting from {init_from}" if init_from else "starting")
        print(f"{how}: "
              f"{config.steps} steps of {config.batch_size} x {config.seq_len} tokens on "
              f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), mesh "
              f"{dict(mesh.shape)}, {accum} micro-batch(es) of {micro} per device; "
              f"workdir {workdir}", flush=True)

    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not primary,
               dynamic_ncols=True)
    last_eval = None
    clock = (time.perf_counter(), start)
    pending = None  # (step, metrics on device): read one step late so the host runs ahead.

    def finish_step(step: int, metrics: dict[str, jax.Array]) -> None:
        nonlocal clock, last_eval
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            ckpts.wait_until_finished()
            good = ckpts.latest_step()
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at step {step}; stopping without saving. " + (
                    f"The last good checkpoint is {ckpts.directory / str(good)}"
                    if good is not None else "No checkpoint was saved before it."))
        bar.update(step - bar.n)
        if step == start + 1:
            clock = (time.perf_counter(), step)  # Throughput excludes compilation.
        evaluate = step % config.eval_every == 0 or step == config.steps
        if step % config.log_every and not evaluate:
            return
        now = time.perf_counter()
        seconds, steps = now - clock[0], step - clock[1]
        clock = (now, step)
        record = {"step": step, **metrics}
        if steps:
            record["tokens_per_s"] = tokens_per_step * steps / seconds
            if peak is not None:
                record["mfu"] = flops_per_step * steps / seconds / (peak * jax.device_count())
        if evaluate:
            record["eval_loss"], _ = heldout_loss(
                eval_step, state.params, mesh, config.data, seq_len=config.seq_len,
                batch_size=config.batch_size, max_batches=config.eval_batches,
                data_dir=config.data_dir)
            record["eval_ppl"] = math.exp(record["eval_loss"])
            last_eval = record["eval_loss"]
            clock = (time.perf_counter(), step)  # Throughput excludes evaluation.
        log.write(record)
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "tokens_per_s", "mfu",
                                                          "eval_loss") if k in record},
                        refresh=False)

    saved_step = latest
    try:
        for step in range(start + 1, config.steps + 1):
            state, metrics = train_step(state, global_batch(next(batches), mesh,
                                                            config.batch_size))
            if pending is not None:
                finish_step(*pending)
            pending = (step, metrics)
            preempted = preemption.reached(step)
            save = step % config.checkpoint_every == 0 or step == config.steps or preempted
            if save or step % config.eval_every == 0:  # Both need this step's state now.
                finish_step(*pending)
                pending = None
            if save:
                saved_step = ckpts.save(state, batches.get_state())
            if preempted:
                ckpts.wait_until_finished()
                if primary:
                    print(f"preempted (SIGTERM): saved step {step} in {ckpts.directory}; run the "
                          "same command to resume", flush=True)
                return {"step": step, "preempted": True}
        if pending is not None:
            finish_step(*pending)
    finally:
        ckpts.close()  # Waits for a save in flight.
        bar.close()
        preemption.close()
    curve = plot_loss_curve(workdir) if primary else None
    records = read_metrics(workdir) if primary else []
    summary = {"step": int(state.step), "first_loss": records[0]["loss"] if records else None,
               "last_loss": records[-1]["loss"] if records else None, "eval_loss": last_eval,
               "checkpoint": ckpts.directory / str(saved_step), "loss_curve": curve}
    if primary:
        print(f"done: step {summary['step']}, train loss {summary['last_loss']:.4f}, held-out "
              f"loss {last_eval if last_eval is None else round(last_eval, 4)}\n"
              f"checkpoint: {summary['checkpoint']} (load with "
              f"backpack_jax.checkpoint.load({str(workdir)!r}))\nloss curve: {curve}",
              flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, flags = configs.parse_args(argv, flags=("workdir", "init_from"))
    except ValueError as e:
        sys.exit(f"error: {e}\nusage: python -m train.run --config=NAME [--workdir=DIR] "
                 "[--init_from=PATH] [--config.FIELD=VALUE ...]")
    sharding.maybe_initialize_distributed()
    workdir = flags["workdir"] or f"/tmp/backpack_{config_name(argv)}"
    try:
        train(config, workdir, flags["init_from"])
    except TrainingDiverged as e:
        sys.exit(f"error: {e}")


def config_name(argv: list[str]) -> str:
    return next(a.partition("=")[2] for a in argv if a.startswith("--config="))


if __name__ == "__main__":
    main()
