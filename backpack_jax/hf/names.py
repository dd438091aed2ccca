"""The Hugging Face <-> Flax parameter name table.

The Flax tree mirrors the HF module tree, so one rule names every parameter:

    Flax path                                        HF tensor
    backpack/gpt2_model/wte/embedding                backpack.gpt2_model.wte.weight
    backpack/gpt2_model/h_3/ln_1/{scale,bias}        backpack.gpt2_model.h.3.ln_1.{weight,bias}
    backpack/gpt2_model/h_3/attn/c_attn/kernel       backpack.gpt2_model.h.3.attn.c_attn.weight
    backpack/sense_network/final_mlp/c_proj/kernel   backpack.sense_network.final_mlp.c_proj.weight
    backpack/sense_weight_net/c_attn/kernel          backpack.sense_weight_net.c_attn.weight  (T)

HF's Conv1D stores [in, out] like a Flax kernel; only the weight network is an nn.Linear
([out, in]), marked (T): transposed on the way in and out. The HF model also exposes the tied
tensors under alias names, and the original .bin carries attention-mask buffers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import jax

from backpack_jax import model
from backpack_jax.config import BackpackConfig

WTE = "backpack.gpt2_model.wte.weight"
WPE = "backpack.gpt2_model.wpe.weight"

# Alias name -> canonical name of the same (tied) tensor.
ALIASES = {
    "backpack.word_embeddings.weight": WTE,
    "lm_head.weight": WTE,
    "backpack.position_embeddings.weight": WPE,
}

# nn.Linear weights, stored [out, in] in HF and [in, out] in Flax.
TRANSPOSED = frozenset({"backpack.sense_weight_net.c_attn.weight"})

# Non-parameter buffers of old GPT-2 attention modules: the bool causal mask and its fill value.
_BUFFER = re.compile(r"backpack\.gpt2_model\.h\.(\d+)\.attn\.(bias|masked_bias)")
SENSE_EDIT_PREFIX = "sense_delta."
_LAYER = re.compile(r"h_\d+")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Entry:
    flax_path: tuple[str, ...]
    hf_name: str
    flax_shape: tuple[int, ...]

    @property
    def transposed(self) -> bool:
        return self.hf_name in TRANSPOSED

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.flax_shape[::-1] if self.transposed else self.flax_shape


def hf_name(flax_path: tuple[str, ...]) -> str:
    """`(backpack, gpt2_model, h_3, ln_1, scale)` -> `backpack.gpt2_model.h.3.ln_1.weight`."""
    *modules, leaf = flax_path
    modules = [f"h.{m[2:]}" if _LAYER.fullmatch(m) else m for m in modules]
    return ".".join(modules + [_LEAF.get(leaf, leaf)])


def table(config: BackpackConfig) -> list[Entry]:
    """Every parameter of a model with this config, in Flax tree order."""
    shapes = model.abstract_params(config)
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    paths = [(tuple(k.key for k in path), tuple(leaf.shape)) for path, leaf in leaves]
    return [Entry(path, hf_name(path), shape) for path, shape in paths]


def is_buffer(name: str, config: BackpackConfig) -> bool:
    """True for the attention-mask buffers of a layer the config has (they carry no weights)."""
    match = _BUFFER.fullmatch(name)
    return match is not None and int(match.group(1)) < config.n_layer


def is_sense_edit(name: str) -> bool:
    """True for the tensors of a learned sense edit in an export (`sense_finetune`): not
    parameters of the model, so a reader of the parameters skips them."""
    return name.startswith(SENSE_EDIT_PREFIX)


def tied_names(canonical: str) -> Iterator[str]:
    """The canonical name first, then its aliases."""
    yield canonical
    yield from (alias for alias, target in ALIASES.items() if target == canonical)
