"""Training checkpoints: an Orbax CheckpointManager in WORKDIR/checkpoints.

Each step directory holds three items:
  - `params`: the plain parameter tree (StandardSave), the layout `backpack_jax.checkpoint.load`
    reads, so any step of a run is a usable model;
  - `opt_state`: the optimizer state (StandardSave);
  - `train`: JSON with the step, the dropout RNG key and the data iterator's state.
Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so an
interrupted save never replaces (or looks like) a finished one. A finished step can still be
damaged later (a node dying during a filesystem flush): resuming moves it aside to
`<step>.damaged-<time>`, kept for inspection, and uses the newest step that restores.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from backpack_jax.checkpoint import STEPS_DIR, read_error, settled_reads, with_sharding
from train.step import TrainState


class TrainCheckpoints:
    """Saves (asynchronously) and restores the full train state and the data position."""

    def __init__(self, workdir: str | os.PathLike, keep: int) -> None:
        self.directory = pathlib.Path(workdir).absolute() / STEPS_DIR
        self.keep = keep
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict[str, Any]) -> int:
        """Starts saving `state` under its step; returns once the arrays are copied off device."""
        step = int(state.step)
        train = {"step": step, "rng": np.asarray(state.rng).tolist(), "data": data_state}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train=ocp.args.JsonSave(train)))
        return step

    def restore(self, step: int, like: TrainState, shardings: TrainState
                ) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at `step`, laid out by `shardings`, and the data iterator state."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_sharding(like.params, shardings.params)),
            opt_state=ocp.args.StandardRestore(
                with_sharding(like.opt_state, shardings.opt_state)),
            train=ocp.args.JsonRestore()))
        train = restored["train"]
        if train["step"] != step:
            raise ValueError(f"checkpoint {self.directory / str(step)} says step {train['step']}")
        state = TrainState(
            step=jax.device_put(np.int32(step), shardings.step),
            params=restored["params"], opt_state=restored["opt_state"],
            rng=jax.device_put(np.asarray(train["rng"], np.uint32), shardings.rng))
        return state, train["data"]

    def restore_latest(self, like: TrainState, shardings: TrainState
                       ) -> tuple[TrainState, dict[str, Any]] | None:
        """`restore` of the newest step that restores; None if there are no checkpoints.

        Newer steps that fail to read or verify are reported (a line each) and moved aside once
        an older one has restored. If none restores, ValueError says so and nothing moves: then
        the cause may not be the files (too little memory, another JAX or Orbax).
        """
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with settled_reads():
                    restored, reason = self.restore(step, like, shardings), None
            except Exception as e:  # Any failure to read: run.py has ruled out another config.
                restored, reason = None, read_error(e)
            if jax.process_count() > 1 and not multihost_utils.process_allgather(
                    np.int32(reason is None)).all():
                reason = reason or "another process could not read it"
            if reason is None:
                if failed:
                    self._move_aside(failed)
                return restored
            failed.append((step, reason))
        if failed:
            raise ValueError(
                f"no checkpoint in {self.directory} restores (steps "
                f"{', '.join(str(s) for s, _ in failed)}; step {failed[0][0]}: {failed[0][1]}); "
                "nothing was moved: repair them, or use another --workdir")
        return None

    def _move_aside(self, failed: list[tuple[int, str]]) -> None:
        """Renames damaged steps to `<step>.damaged-<time>`, which neither Orbax nor `load` read."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step, reason in failed:
                aside = self.directory / f"{step}.damaged-{stamp}"
                os.rename(self.directory / str(step), aside)
                print(f"warning: checkpoint step {step} does not restore ({reason}); moved it "
                      f"to {aside}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("damaged checkpoints moved aside")
        self.manager.close()  # It still lists the moved steps.
        self.manager = self._open()

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
