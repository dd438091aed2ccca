"""One on-disk format for parameters, shared by the converter, training, generation and senses.

A model directory holds `config.json` (the Hugging Face config dict) and either
  - `params/`: an Orbax checkpoint of the parameter tree (written by `save` and by
    `python -m convert.hf_to_flax`), or
  - `checkpoints/<step>/params/`: a training workdir's Orbax `CheckpointManager` steps.
`load` also accepts a Hugging Face directory (config.json + safetensors or .bin, read by
`backpack_jax.hf`), one step directory of a training run, or a Hugging Face Hub id (`hub`), so
every CLI takes whatever checkpoint the user has. From a workdir whose newest steps fail to
read (a node died while writing one), `load` takes the newest step that loads, with a warning
line per damaged step; it moves nothing, since a reader must not change a live run's workdir
(`train.run` moves damaged steps aside when it resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from backpack_jax import hf, hub, model
from backpack_jax.config import BackpackConfig

PARAMS_DIR = "params"
STEPS_DIR = "checkpoints"


class UnreadableCheckpoint(ValueError):
    """A checkpoint's files fail to read: damaged, rather than written for another model."""


def read_error(error: BaseException) -> str:
    """Why a read failed, on one line: the innermost cause (the storage layer's own reason)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its pending tasks finish (for a minute at most) before closing."""

    def close(self) -> None:
        pending = asyncio.all_tasks(self)
        if pending and not (self.is_running() or self.is_closed()):
            settle = asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                self.run_until_complete(asyncio.wait_for(settle, 60))
        super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingLoop()


@contextlib.contextmanager
def settled_reads() -> Iterator[None]:
    """Makes a failed Orbax restore fail quietly: one exception, no chatter.

    Orbax runs each restore in a fresh event loop and closes it as soon as one read fails; the
    reads still in flight then complete into the closed loop, and each prints an "Event loop is
    closed" traceback or "Task exception was never retrieved", at any later time. Inside this
    context Orbax's loops wait for them before closing.
    """
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def save(directory: str | os.PathLike, params: model.Params, config: BackpackConfig) -> None:
    """Saves params (Orbax, written atomically by Orbax) and config.json into `directory`."""
    directory = pathlib.Path(directory).absolute()
    for name in (PARAMS_DIR, hf.CONFIG_FILE):
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists; choose a new directory")
    hf.write_config(directory, config)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)


def with_sharding(tree: Any, sharding: Any) -> Any:
    """Shape/dtype structs of `tree` laid out by `sharding` (one Sharding or a matching tree):
    the restore target Orbax needs to place arrays regardless of how they were saved."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_params(params_dir: str | os.PathLike, config: BackpackConfig) -> model.Params:
    """Restores an Orbax parameter tree onto one device, checking it against the config's shapes.

    The shapes are compared before any array is read, so a mismatch is one error naming the
    parameters; the explicit sharding lets a checkpoint written by a multi-device run load
    anywhere.
    """
    params_dir = pathlib.Path(params_dir).absolute()
    target = with_sharding(model.abstract_params(config),
                           jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with ocp.StandardCheckpointer() as checkpointer, settled_reads():
        try:
            stored = _shapes(ocp.PyTreeCheckpointHandler().metadata(params_dir))
        except Exception as e:  # Whatever the storage layer raises: missing, truncated, garbled.
            raise UnreadableCheckpoint(f"{params_dir} does not load: {read_error(e)}") from e
        wanted = _shapes(target)
        problems = [f"{name} is {stored.get(name, 'missing')}, the config needs {shape}"
                    for name, shape in wanted.items() if stored.get(name) != shape]
        problems += [f"{name} {shape} is not in the model" for name, shape in stored.items()
                     if name not in wanted]
        if problems:
            raise ValueError(f"{params_dir} does not hold the model its {hf.CONFIG_FILE} "
                             f"describes ({len(problems)} parameter(s) differ): "
                             + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
        try:
            return checkpointer.restore(params_dir, target)
        except Exception as e:
            raise UnreadableCheckpoint(f"{params_dir} does not load: {read_error(e)}") from e


def step_dirs(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The finished steps of a training workdir's checkpoints, newest first."""
    steps = pathlib.Path(directory) / STEPS_DIR
    if not steps.is_dir():
        return []
    finished = [p for p in steps.iterdir() if p.name.isdigit() and (p / PARAMS_DIR).is_dir()]
    return sorted(finished, key=lambda p: int(p.name), reverse=True)


def latest_step_dir(directory: str | os.PathLike) -> pathlib.Path | None:
    """The newest finished step of a training workdir's checkpoints, if any."""
    return next(iter(step_dirs(directory)), None)


def _newest_readable_step(workdir: pathlib.Path, steps: list[pathlib.Path]
                          ) -> tuple[model.Params, BackpackConfig]:
    """The parameters of the newest step that loads; a warning line for each newer one."""
    config = hf.read_config(workdir)
    failed = []
    for step in steps:
        try:
            params = restore_params(step / PARAMS_DIR, config)
        except UnreadableCheckpoint as e:
            failed.append((step.name, read_error(e)))
            continue
        for name, reason in failed:
            print(f"warning: checkpoint step {name} of {workdir} does not load ({reason}); "
                  f"using step {step.name}", file=sys.stderr, flush=True)
        return params, config
    raise UnreadableCheckpoint(f"no checkpoint step of {workdir} loads (steps "
                               f"{', '.join(n for n, _ in failed)}; step {failed[0][0]}: "
                               f"{failed[0][1]})")


def load(path: str | os.PathLike, revision: str | None = None
         ) -> tuple[model.Params, BackpackConfig]:
    """Loads (params, config) from a converted model, a training workdir or step, a Hugging Face
    directory, or a Hub id (`org/name`, `org/name@revision`, or `revision=`; see `hub`).

    An existing local path always wins over a Hub id spelled the same way.
    """
    local = pathlib.Path(path).expanduser().absolute()
    if not local.exists() and (repo := hub.parse(str(path))) is not None:
        repo_id, at = repo
        if at is not None and revision is not None and at != revision:
            raise ValueError(f"{path} names revision {at!r} but revision={revision!r} was "
                             "also given")
        return hf.load_hf(hub.snapshot(repo_id, at or revision))
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to Hub ids only, and {path} is a local "
                         "path")
    path = local
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist (nor is it a Hub id "
                                "such as stanfordnlp/backpack-gpt2)")
    if (path / PARAMS_DIR).is_dir():
        config_dir = path if (path / hf.CONFIG_FILE).is_file() else path.parent.parent
        config = hf.read_config(config_dir)
        return restore_params(path / PARAMS_DIR, config), config
    steps = step_dirs(path)
    if steps:
        return _newest_readable_step(path, steps)
    weights = [f for f in hf.files.WEIGHT_FILES if (path / f).is_file()]
    if (path / hf.CONFIG_FILE).is_file() and weights:
        return hf.load_hf(path)
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected {hf.CONFIG_FILE} with {PARAMS_DIR}/ (converted "
        f"model), {STEPS_DIR}/<step>/{PARAMS_DIR}/ (training workdir), or Hugging Face weights")
