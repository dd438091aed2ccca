"""Writes checkpoints in every Hugging Face layout a Backpack may come in, for converter tests.

Layouts (`LAYOUTS`):
  safetensors           model.safetensors, tied tensors once (canonical names)
  safetensors_aliases   model.safetensors with every alias stored as its own copy
  alias_only            model.safetensors with wte only as `lm_head.weight` and wpe only as
                        `backpack.position_embeddings.weight`
  sharded               three safetensors shards + model.safetensors.index.json
  sharded_bin           three .bin shards + pytorch_model.bin.index.json, with buffers
  bin                   pytorch_model.bin with GPT-2's attention-mask buffers, no aliases
  bin_aliases           pytorch_model.bin as the original: aliases sharing storage + buffers
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np
import safetensors.torch
import torch

from backpack_jax.config import BackpackConfig

LAYOUTS = ("safetensors", "safetensors_aliases", "alias_only", "sharded", "sharded_bin", "bin",
           "bin_aliases")
# Spelled out here, not imported from backpack_jax.hf.names, so a wrong table there fails the
# tests.
WTE = "backpack.gpt2_model.wte.weight"
WPE = "backpack.gpt2_model.wpe.weight"
ALIASES = {"backpack.word_embeddings.weight": WTE, "lm_head.weight": WTE,
           "backpack.position_embeddings.weight": WPE}


def write_config_json(directory: pathlib.Path, config: BackpackConfig, **overrides) -> None:
    """config.json as the hub's: the fields plus the bookkeeping keys transformers adds."""
    hf = config.to_hf_dict() | {
        "auto_map": {"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
                     "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"},
        "torch_dtype": "float32", "transformers_version": "4.29.2", "use_cache": True,
        "summary_type": "cls_index", "summary_use_proj": True, "summary_activation": None,
        "summary_proj_to_labels": True, "summary_first_dropout": 0.1,
    }
    hf.update(overrides)
    (directory / "config.json").write_text(json.dumps(hf, indent=2))


def attention_buffers(config: BackpackConfig) -> dict[str, torch.Tensor]:
    """The non-parameter buffers old GPT-2 modules saved in pytorch_model.bin."""
    n = config.n_positions
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    out = {}
    for i in range(config.n_layer):
        out[f"backpack.gpt2_model.h.{i}.attn.bias"] = mask
        out[f"backpack.gpt2_model.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def _save_safetensors(tensors: Mapping[str, torch.Tensor], file: pathlib.Path) -> None:
    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in tensors.items()},
                                str(file), metadata={"format": "pt"})


def _write_shards(directory: pathlib.Path, state: Mapping[str, torch.Tensor], binary: bool
                  ) -> None:
    """Three shards and the index transformers writes next to them."""
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        shard = {k: state[k] for k in names[i::3]}
        if binary:
            file = f"pytorch_model-{i + 1:05d}-of-00003.bin"
            torch.save(shard, directory / file)
        else:
            file = f"model-{i + 1:05d}-of-00003.safetensors"
            _save_safetensors(shard, directory / file)
        weight_map |= {k: file for k in shard}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    index_name = "pytorch_model.bin.index.json" if binary else "model.safetensors.index.json"
    (directory / index_name).write_text(json.dumps(index, indent=2))


def write_hf_checkpoint(directory: str | pathlib.Path, tensors: Mapping[str, np.ndarray],
                        config: BackpackConfig, layout: str = "safetensors",
                        dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Writes `tensors` (canonical HF names, e.g. `torch_reference.random_tensors(...)`) and
    config.json into `directory` in one of `LAYOUTS`, stored as `dtype`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_config_json(directory, config)
    state = {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in tensors.items()}
    if layout in ("safetensors_aliases", "bin_aliases"):
        state |= {alias: state[target] for alias, target in ALIASES.items()}
    if layout == "alias_only":
        state["lm_head.weight"] = state.pop(WTE)
        state["backpack.position_embeddings.weight"] = state.pop(WPE)
    if layout in ("bin", "bin_aliases", "sharded_bin"):
        state |= attention_buffers(config)
    if layout in ("bin", "bin_aliases"):
        torch.save(state, directory / "pytorch_model.bin")
    elif layout in ("sharded", "sharded_bin"):
        _write_shards(directory, state, binary=layout == "sharded_bin")
    else:
        _save_safetensors(state, directory / "model.safetensors")
    return directory


# Small configs with odd sizes (no dimension a power of two where avoidable), for parity tests.
TEST_CONFIGS = {
    "odd": BackpackConfig(vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=3,
                          num_senses=6, bos_token_id=0, eos_token_id=0),
    # n_inner set, scale 3, no layer-index scaling, no 1/sqrt(d) scaling, a large epsilon.
    "variant": BackpackConfig(vocab_size=61, n_positions=24, n_embd=40, n_layer=2, n_head=5,
                              num_senses=4, n_inner=72, sense_intermediate_scale=3,
                              scale_attn_by_inverse_layer_idx=False, scale_attn_weights=False,
                              layer_norm_epsilon=1e-3, bos_token_id=60, eos_token_id=60),
}
