"""One on-disk format for parameters, shared by the converter, training, generation and senses.

A model directory holds `config.json` (the Hugging Face config dict) and either
  - `params/`: an Orbax checkpoint of the parameter tree (written by `save` and by
    `python -m convert.hf_to_flax`), or
  - `checkpoints/<step>/params/`: a training workdir's Orbax `CheckpointManager` steps.
`load` also accepts a Hugging Face directory (config.json + safetensors or .bin) or one step
directory of a training run, so every CLI takes whatever checkpoint the user has.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from backpack_jax import model
from backpack_jax.config import BackpackConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
STEPS_DIR = "checkpoints"


def write_config(directory: str | os.PathLike, config: BackpackConfig) -> None:
    """Writes config.json atomically (write to a temporary name, then rename)."""
    path = pathlib.Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_config(directory: str | os.PathLike) -> BackpackConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    return BackpackConfig.from_hf_dict(json.loads(path.read_text()))


def save(directory: str | os.PathLike, params: model.Params, config: BackpackConfig) -> None:
    """Saves params (Orbax, written atomically by Orbax) and config.json into `directory`."""
    directory = pathlib.Path(directory).absolute()
    for name in (PARAMS_DIR, CONFIG_FILE):
        if (directory / name).exists():
            raise FileExistsError(f"{directory / name} already exists; choose a new directory")
    write_config(directory, config)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_DIR, params)
    checkpointer.wait_until_finished()


def abstract_params(config: BackpackConfig) -> model.Params:
    """Shapes and dtypes of the parameter tree, without allocating it."""
    return jax.eval_shape(lambda: model.init(config, jax.random.PRNGKey(0)))


def with_sharding(tree: Any, sharding: Any) -> Any:
    """Shape/dtype structs of `tree` laid out by `sharding` (one Sharding or a matching tree):
    the restore target Orbax needs to place arrays regardless of how they were saved."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, sharding)


def restore_params(params_dir: str | os.PathLike, config: BackpackConfig) -> model.Params:
    """Restores an Orbax parameter tree onto one device, checking it against the config's shapes.

    The explicit sharding lets a checkpoint written by a multi-device run load anywhere.
    """
    target = with_sharding(abstract_params(config),
                           jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return ocp.StandardCheckpointer().restore(pathlib.Path(params_dir).absolute(), target)


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
        config_dir = path if (path / CONFIG_FILE).is_file() else path.parent.parent
        config = read_config(config_dir)
        return restore_params(path / PARAMS_DIR, config), config
    step = latest_step_dir(path)
    if step is not None:
        config = read_config(path)
        return restore_params(step / PARAMS_DIR, config), config
    from convert import hf_io, load_hf  # Local import: convert depends on this module.
    if (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in hf_io.WEIGHT_FILES):
        return load_hf(path)
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected {CONFIG_FILE} with {PARAMS_DIR}/ (converted model), "
        f"{STEPS_DIR}/<step>/{PARAMS_DIR}/ (training workdir), or Hugging Face weights")
