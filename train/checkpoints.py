"""Training checkpoints: an Orbax CheckpointManager in WORKDIR/checkpoints.

Each step directory holds three items:
  - `params`: the plain parameter tree (StandardSave), the layout `backpack_jax.checkpoint.load`
    reads, so any step of a run is a usable model;
  - `opt_state`: the optimizer state (StandardSave);
  - `train`: JSON with the step, the dropout RNG key and the data iterator's state.
Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so an
interrupted save never replaces (or looks like) a finished one.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from backpack_jax.checkpoint import STEPS_DIR, with_sharding
from train.step import TrainState


class TrainCheckpoints:
    """Saves (asynchronously) and restores the full train state and the data position."""

    def __init__(self, workdir: str | os.PathLike, keep: int) -> None:
        self.directory = pathlib.Path(workdir).absolute() / STEPS_DIR
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
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

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
