"""Training checkpoints: an Orbax CheckpointManager in WORKDIR/checkpoints.

Each step directory holds three items:
  - `params`: the plain parameter tree (StandardSave), the layout `backpack_jax.checkpoint.load`
    reads, so any step of a run is a usable model;
  - `opt_state`: the optimizer state (StandardSave);
  - `train`: JSON with the step, the dropout RNG key and the data iterator's state.
Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so an
interrupted save never replaces (or looks like) a finished one. A save that fails (a full disk),
in the call or later in Orbax's commit thread, stops the run with `WriteFailed`: its partial
directory is removed (Orbax removes any remainder when the next run opens the directory), and the
steps saved before it are untouched, older ones included. A finished step can still be damaged
later (a node dying during a filesystem flush): resuming moves it aside to
`<step>.damaged-<time>`, kept for inspection, and uses the newest step that restores.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from backpack_jax.checkpoint import STEPS_DIR, read_error, settled_reads, with_sharding
from train.step import TrainState

_ORBAX_DIR = os.path.dirname(ocp.__file__)
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # Of a step being written.
_DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


class WriteFailed(RuntimeError):
    """A write to the workdir failed (a full disk): the run stops; the steps saved are intact."""

    def __init__(self, what: str, error: BaseException, last_saved: int | None) -> None:
        reason = read_error(error)
        fix = "free space" if any(s in reason for s in _DISK_FULL) else "fix that"
        then = (f"the last saved step {last_saved} is intact: {fix} and run the same command to "
                "resume" if last_saved is not None else
                f"no step was saved: {fix} and run the same command to start again")
        super().__init__(f"{what} failed: {reason}; {then}")


class _OrbaxErrorLogs(logging.Filter):
    """Drops Orbax's error logs (tracebacks from its save threads): `WriteFailed` reports a failed
    save in one line, and a failed restore is reported by `restore_latest`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not record.pathname.startswith(_ORBAX_DIR)


class TrainCheckpoints:
    """Saves (asynchronously) and restores the full train state and the data position."""

    def __init__(self, workdir: str | os.PathLike, keep: int) -> None:
        self.directory = pathlib.Path(workdir).absolute() / STEPS_DIR
        self.keep = keep
        self._saving: int | None = None  # The step whose save may still run in the background.
        self._quiet = contextlib.ExitStack()  # Until `close`: no chatter from failed reads/writes.
        self._quiet.enter_context(settled_reads())  # A failed write leaves tasks in flight too.
        filter_ = _OrbaxErrorLogs()
        logging.getLogger("absl").addFilter(filter_)
        self._quiet.callback(logging.getLogger("absl").removeFilter, filter_)
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
        """Starts saving `state` under its step; returns once the arrays are copied off device.

        Raises WriteFailed if this save, or the previous one still in the background, fails;
        the checkpoints are closed then.
        """
        self.wait_until_finished()
        step = int(state.step)
        train = {"step": step, "rng": np.asarray(state.rng).tolist(), "data": data_state}
        self._saving = step
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                train=ocp.args.JsonSave(train)))
        except (OSError, ValueError) as e:  # Tensorstore reports a full disk as a ValueError.
            raise self._save_failed(e) from None
        return step

    def wait_until_finished(self) -> None:
        """Waits for the save in flight; raises WriteFailed if it failed."""
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise self._save_failed(e) from None
        self._saving = None

    def _save_failed(self, error: BaseException) -> WriteFailed:
        """WriteFailed for the step being saved. The run stops: Orbax's save threads are joined
        and the step's partial directory is removed, freeing its space."""
        step, self._saving = self._saving, None
        last = self.latest_step()
        self._close_manager()
        if jax.process_index() == 0:  # Orbax removes any rest when the next run opens it.
            for partial in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)
        return WriteFailed(f"saving checkpoint step {step}", error, last)

    def _close_manager(self) -> None:
        """Closes the manager. A failed save can leave an error in more than one of Orbax's save
        threads and metadata stores; each is raised once, by the first call that waits for it,
        and stops that call: closing again goes on from there."""
        for _ in range(3):
            with contextlib.suppress(OSError, ValueError):
                self.manager.close()
                return
        self.manager.close()

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

    def close(self) -> None:
        """Waits for the save in flight and closes, without raising its failure: a run stops on
        that at `wait_until_finished`, and closing on the way out of another error must not
        replace the error."""
        with contextlib.suppress(WriteFailed):
            self.wait_until_finished()
        self._close_manager()
        self._quiet.close()
