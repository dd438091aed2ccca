"""Reading and writing Hugging Face checkpoint directories.

A directory holds config.json (the HF config dict, which every model directory of this project
also holds) and one of (first found wins): `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, `pytorch_model.bin`, or sharded .bin with
`pytorch_model.bin.index.json`. PyTorch is needed for .bin files only.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Mapping

import numpy as np
import safetensors
import safetensors.numpy
import tqdm

from backpack_jax.atomic import atomic_path
from backpack_jax.config import BackpackConfig
from backpack_jax.hf import names
from backpack_jax.hf.state_dict import ConversionError, from_state_dict, to_state_dict
from backpack_jax.model import Params

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
# Files at least this large get a progress bar.
_PROGRESS_BYTES = 64 << 20


def write_config(directory: str | os.PathLike, config: BackpackConfig) -> None:
    """Writes config.json atomically (a temporary name, then a rename; nothing left on failure)."""
    path = pathlib.Path(directory) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def read_config(directory: str | os.PathLike) -> BackpackConfig:
    path = pathlib.Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    return BackpackConfig.from_hf_dict(json.loads(path.read_text()))


def _widen(x: np.ndarray) -> np.ndarray:
    """float16/bfloat16 -> float32; other dtypes are left for the name/shape check to judge."""
    return x.astype(np.float32) if x.dtype.name in ("float16", "bfloat16") else x


def _progress(file: pathlib.Path, total: int) -> tqdm.tqdm:
    return tqdm.tqdm(total=total, desc=f"reading {file.name}", unit="tensor",
                     disable=file.stat().st_size < _PROGRESS_BYTES)


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with safetensors.safe_open(str(file), framework="np") as f:
            keys = list(f.keys())
            with _progress(file, len(keys)) as bar:
                tensors = {}
                for key in keys:
                    tensors[key] = _widen(f.get_tensor(key))
                    bar.update()
                return tensors
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConversionError(f"cannot read {file}: {e} (truncated or corrupt safetensors file?)"
                              ) from e


def read_torch_bin(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"reading {file} needs PyTorch: pip install torch==2.13.0 (or "
                              f"convert the checkpoint to safetensors)") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, runtime) for a bad file.
        raise ConversionError(f"cannot read {file}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{file} does not hold a state dict of tensors")
    tensors = {}
    for name, t in tqdm.tqdm(state.items(), desc=f"reading {file.name}", unit="tensor",
                             disable=file.stat().st_size < _PROGRESS_BYTES):
        tensors[name] = t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else (
            t.numpy())
    return tensors


def _read_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise ConversionError(f"weights file {file} does not exist")
    return read_safetensors(file) if file.suffix == ".safetensors" else read_torch_bin(file)


def read_sharded(index_file: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads every shard an index's `weight_map` names; each must hold the tensors it claims."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_file} is not a shard index with a weight_map: {e}") from e
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_file(index_file.parent / shard))
    absent = sorted(n for n, shard in weight_map.items() if n not in tensors)
    if absent:
        raise ConversionError(f"{index_file} lists tensors its shards do not hold:", absent)
    return tensors


def weights_file(directory: pathlib.Path) -> pathlib.Path:
    """The weights file (or shard index) of an HF directory."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise ConversionError(f"no weights in {directory}: expected one of {list(WEIGHT_FILES)}, "
                          f"found {found}")


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (or of one weights file / shard index), float32 widened."""
    path = pathlib.Path(path)
    file = path if path.is_file() else weights_file(path)
    return read_sharded(file) if file.name.endswith(".index.json") else _read_file(file)


def load_hf(path: str | os.PathLike) -> tuple[Params, BackpackConfig]:
    """Loads an HF Backpack checkpoint: a directory with config.json and weights (or a weights
    file / shard index next to its config.json).

    Raises:
      ConversionError: no weights, unreadable files, a config.json the tensors contradict, or
        tensors that do not match (all listed at once).
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    directory = path.parent if path.is_file() else path
    try:
        config = read_config(directory)
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(f"cannot read {directory / CONFIG_FILE}: {e}") from e
    tensors = read_tensors(path)
    if any(names.is_sense_edit(name) for name in tensors):
        print(f"note: {directory} carries a learned sense edit; these are the unedited "
              f"parameters (sense_finetune.load_delta({str(directory)!r}, config) reads the "
              f"edit)", file=sys.stderr)
    return from_state_dict(tensors, config), config


def write_hf(params: Params, config: BackpackConfig, out_dir: str | os.PathLike,
             extra: Mapping[str, np.ndarray] | None = None) -> pathlib.Path:
    """Writes config.json and model.safetensors that the HF remote code loads.

    The tied embeddings are stored once, as `backpack.gpt2_model.{wte,wpe}.weight`; the
    safetensors metadata says `format: pt`, which transformers requires. `extra` tensors (an
    export's sense edit) are written beside the parameters.
    """
    out_dir = pathlib.Path(out_dir)
    target = out_dir / SAFETENSORS
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose a new directory")
    tensors = to_state_dict(params, config) | dict(extra or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)
    write_config(out_dir, config)
    return out_dir

