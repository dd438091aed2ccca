"""One on-disk format for parameters, shared by the converter, training, generation and senses.

A model directory holds `config.json` (the Hugging Face config dict) and either
  - `params/`: an Orbax checkpoint of the parameter tree (written by `save` and by
    `python -m convert.hf_to_flax`), or
  - `checkpoints/<step>/params/`: a training workdir's Orbax `CheckpointManager` steps.
`load` also accepts a Hugging Face directory (config.json + safetensors or .bin, read by
`backpack_jax.hf`) or one step directory of a training run, so every CLI takes whatever
checkpoint the user has.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from backpack_jax import hf, model
from backpack_jax.config import BackpackConfig

PARAMS_DIR = "params"
STEPS_DIR = "checkpoints"


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
    with ocp.StandardCheckpointer() as checkpointer:
        stored = _shapes(ocp.PyTreeCheckpointHandler().metadata(params_dir))
        wanted = _shapes(target)
        problems = [f"{name} is {stored.get(name, 'missing')}, the config needs {shape}"
                    for name, shape in wanted.items() if stored.get(name) != shape]
        problems += [f"{name} {shape} is not in the model" for name, shape in stored.items()
                     if name not in wanted]
        if problems:
            raise ValueError(f"{params_dir} does not hold the model its {hf.CONFIG_FILE} "
                             f"describes ({len(problems)} parameter(s) differ): "
                             + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))
        return checkpointer.restore(params_dir, target)


def latest_step_dir(directory: str | os.PathLike) -> pathlib.Path | None:
    """The newest finished step of a training workdir's checkpoints, if any."""
    steps = pathlib.Path(directory) / STEPS_DIR
    if not steps.is_dir():
        return None
    finished = [p for p in steps.iterdir() if p.name.isdigit() and (p / PARAMS_DIR).is_dir()]
    return max(finished, key=lambda p: int(p.name), default=None)


def load(path: str | os.PathLike) -> tuple[model.Params, BackpackConfig]:
    """Loads (params, config) from a converted model, a training workdir or step, or an HF dir."""
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / PARAMS_DIR).is_dir():
        config_dir = path if (path / hf.CONFIG_FILE).is_file() else path.parent.parent
        config = hf.read_config(config_dir)
        return restore_params(path / PARAMS_DIR, config), config
    step = latest_step_dir(path)
    if step is not None:
        config = hf.read_config(path)
        return restore_params(step / PARAMS_DIR, config), config
    weights = [f for f in hf.files.WEIGHT_FILES if (path / f).is_file()]
    if (path / hf.CONFIG_FILE).is_file() and weights:
        return hf.load_hf(path)
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected {hf.CONFIG_FILE} with {PARAMS_DIR}/ (converted "
        f"model), {STEPS_DIR}/<step>/{PARAMS_DIR}/ (training workdir), or Hugging Face weights")
