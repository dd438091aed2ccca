"""Device mesh and shardings, with every partitioning rule kept in this one file.

Parameters get logical axis names from their path (PARAM_LOGICAL_AXES); logical axes map to the
mesh axes (data, fsdp, tensor) by LOGICAL_TO_MESH. Optimizer-state leaves carry the parameter's
path inside theirs (`.../mu/backpack/.../kernel`), so the same table shards them too. A dimension
the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (pattern searched in the leaf's path, logical axes of its dimensions); first match wins.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"wte/embedding$", ("vocab", "embed")),
    (r"wpe/embedding$", (None, "embed")),
    (r"(attn|sense_weight_net)/c_attn/kernel$", ("embed", "qkv")),
    (r"(attn|sense_weight_net)/c_attn/bias$", ("qkv",)),
    (r"attn/c_proj/kernel$", ("heads", "embed")),
    (r"final_mlp/c_proj/kernel$", ("mlp", "senses")),
    (r"final_mlp/c_proj/bias$", ("senses",)),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_fc/bias$", ("mlp",)),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    (r"/(scale|bias)$", (None,)),  # Other biases and LayerNorms: width D, too small to split.
)

LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "qkv": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "senses": "fsdp",  # The sense projection's output (K*D): its input is already on tensor.
}


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one -1 entry takes what the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if shape.count(-1) == 1:
        rest = math.prod(n for n in shape if n != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh_shape={tuple(mesh_shape)}: {len(devices)} devices are not "
                             f"divisible by {rest}")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh_shape={tuple(mesh_shape)} needs {math.prod(shape)} devices, "
                         f"but there are {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the leaf at `path`; scalars and counters are replicated."""
    if ndim == 0:
        return ()
    for pattern, axes in PARAM_LOGICAL_AXES:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"{path}: rule {pattern!r} names {len(axes)} axes for a "
                                 f"{ndim}-d array")
            return axes
    raise ValueError(f"no partitioning rule for {path!r}; add one to PARAM_LOGICAL_AXES")


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of `axes`, replicating a dimension its mesh axes do not divide."""
    spec, used = [], set()
    for axis, size in zip(axes, shape, strict=True):
        mesh_axes = LOGICAL_TO_MESH.get(axis) if axis is not None else None
        if mesh_axes is not None:
            names = tuple(np.atleast_1d(mesh_axes))
            if size % math.prod(mesh.shape[a] for a in names) or used & set(names):
                mesh_axes = None
            else:
                used |= set(names)
        spec.append(mesh_axes)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of parameters or optimizer state (arrays or ShapeDtypeStructs)."""
    def leaf_sharding(path, leaf):
        shape = np.shape(leaf)
        return NamedSharding(mesh, spec_for(logical_axes(_path_str(path), len(shape)), shape,
                                            mesh))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over data x fsdp; positions kept whole."""
    return NamedSharding(mesh, P(LOGICAL_TO_MESH["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return math.prod(mesh.shape[a] for a in LOGICAL_TO_MESH["batch"])


def maybe_initialize_distributed() -> None:
    """Joins a multi-process job under SLURM (srun) or when JAX_COORDINATOR_ADDRESS is set.

    With the coordinator variable, JAX_NUM_PROCESSES and JAX_PROCESS_ID give this process's
    place; under SLURM, JAX reads them from the SLURM variables itself.
    """
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        jax.distributed.initialize()
