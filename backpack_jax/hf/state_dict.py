"""HF state dict <-> Flax params, checking names, shapes, tied aliases and the config.

Every problem with a state dict is collected and reported in one `ConversionError`, so a user
fixing a checkpoint sees the whole list at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax.config import BackpackConfig
from backpack_jax.hf import names
from backpack_jax.hf.names import WPE, WTE
from backpack_jax.model import Params

# Floating dtypes we read (half precision is widened to float32).
_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
_LAYER_TENSOR = re.compile(r"backpack\.gpt2_model\.h\.(\d+)\.")
_GPT2_C_FC = "backpack.gpt2_model.h.0.mlp.c_fc.weight"
_SENSE_C_FC = "backpack.sense_network.final_mlp.c_fc.weight"
_SENSE_C_PROJ = "backpack.sense_network.final_mlp.c_proj.weight"


class ConversionError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem found."""

    def __init__(self, summary: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        super().__init__("\n  ".join([summary] + self.problems))


def _resolve_aliases(tensors: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """Returns the tensors under canonical names only; tied copies must agree exactly."""
    out = {k: v for k, v in tensors.items() if k not in names.ALIASES}
    for canonical in (WTE, WPE):
        present = [n for n in names.tied_names(canonical) if n in tensors]
        if not present:
            continue
        first = tensors[present[0]]
        for other in present[1:]:
            same = (np.shape(tensors[other]) == np.shape(first)
                    and np.array_equal(np.asarray(tensors[other], np.float32),
                                       np.asarray(first, np.float32)))
            if not same:
                problems.append(f"tied tensors differ: {other} != {present[0]} (they must be the "
                                f"same tensor)")
        out[canonical] = first
    return out


def _config_disagreements(tensors: Mapping[str, Any], config: BackpackConfig) -> list[str]:
    """Config fields that the tensors' shapes contradict (n_head cannot be read off shapes)."""
    def shape(name: str) -> tuple[int, ...] | None:
        s = np.shape(tensors[name]) if name in tensors else None
        return s if s is not None and len(s) == 2 else None

    evidence = []  # (field, value in config, value the tensor implies, tensor, its shape)
    if s := shape(WTE):
        evidence += [("vocab_size", config.vocab_size, s[0], WTE, s),
                     ("n_embd", config.n_embd, s[1], WTE, s)]
    if s := shape(WPE):
        evidence.append(("n_positions", config.n_positions, s[0], WPE, s))
    if s := shape(_GPT2_C_FC):
        evidence.append(("n_inner", config.inner_dim, s[1], _GPT2_C_FC, s))
    if s := shape(_SENSE_C_FC):
        evidence.append(("sense_intermediate_scale", config.sense_intermediate_scale,
                         s[1] / s[0], _SENSE_C_FC, s))
    if s := shape(_SENSE_C_PROJ):
        evidence.append(("num_senses", config.num_senses, s[1] / config.n_embd, _SENSE_C_PROJ, s))
    found = [f"config {field}={have} but {name} has shape {list(s)}, which means "
             f"{field}={implied:g}" for field, have, implied, name, s in evidence
             if implied != have]
    layers = {int(m.group(1)) for n in tensors if (m := _LAYER_TENSOR.match(n))}
    if layers and max(layers) + 1 != config.n_layer:
        found.append(f"config n_layer={config.n_layer} but the tensors hold layers "
                     f"h.0..h.{max(layers)} ({max(layers) + 1} layers)")
    return found


def from_state_dict(tensors: Mapping[str, Any], config: BackpackConfig) -> Params:
    """Builds the Flax parameter tree from HF-named tensors (numpy or anything array-like).

    Accepts the tied tensors under any of their names (`names.ALIASES`, at least one present,
    all equal) and ignores GPT-2's attention-mask buffers and an export's sense edit. Half
    precision becomes float32.

    Raises:
      ConversionError: naming every config field the shapes contradict, or else every missing,
        unexpected, misshaped or non-float tensor and every pair of unequal tied copies.
    """
    problems: list[str] = []
    tensors = _resolve_aliases(tensors, problems)
    disagreements = _config_disagreements(tensors, config)
    if disagreements:
        raise ConversionError("the config disagrees with the checkpoint's tensors:",
                              disagreements)
    expected = {e.hf_name: e for e in names.table(config)}
    for name, value in tensors.items():
        entry = expected.get(name)
        if entry is None:
            if not (names.is_buffer(name, config) or names.is_sense_edit(name)):
                problems.append(f"unexpected tensor {name} with shape {list(np.shape(value))}")
        elif tuple(np.shape(value)) != entry.hf_shape:
            problems.append(f"misshaped tensor {name}: shape {list(np.shape(value))}, expected "
                            f"{list(entry.hf_shape)}")
        elif np.asarray(value).dtype.name not in _FLOAT_DTYPES:
            problems.append(f"tensor {name} has dtype {np.asarray(value).dtype}, expected a "
                            f"floating type")
    for name in expected.keys() - tensors.keys():
        aliases = [a for a in names.tied_names(name) if a != name]
        also = f" (or its alias {' / '.join(aliases)})" if aliases else ""
        problems.append(f"missing tensor {name}{also} with shape {list(expected[name].hf_shape)}")
    if problems:
        raise ConversionError(f"the checkpoint does not match the model ({len(problems)} "
                              f"problem(s)):", sorted(problems))
    params: dict[str, Any] = {}
    for entry in expected.values():
        value = np.asarray(tensors[entry.hf_name]).astype(np.float32, copy=False)
        if entry.transposed:
            value = value.T
        node = params
        for key in entry.flax_path[:-1]:
            node = node.setdefault(key, {})
        node[entry.flax_path[-1]] = jnp.asarray(value)
    return params


def to_state_dict(params: Params, config: BackpackConfig) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy, tied tensors once under their canonical names)."""
    expected = {e.flax_path: e for e in names.table(config)}
    leaves = {tuple(k.key for k in path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing parameter {'/'.join(p)}" for p in expected.keys() - leaves.keys()]
    problems += [f"unexpected parameter {'/'.join(p)}" for p in leaves.keys() - expected.keys()]
    problems += [f"misshaped parameter {'/'.join(p)}: shape {list(np.shape(leaf))}, expected "
                 f"{list(expected[p].flax_shape)}" for p, leaf in leaves.items()
                 if p in expected and tuple(np.shape(leaf)) != expected[p].flax_shape]
    if problems:
        raise ConversionError("the parameters do not match the config:", sorted(problems))
    out = {}
    for path, entry in expected.items():
        value = np.asarray(leaves[path], dtype=np.float32)
        out[entry.hf_name] = np.ascontiguousarray(value.T if entry.transposed else value)
    return out
