"""Command-line converters between Hugging Face and this project's checkpoints.

The conversion itself lives in `backpack_jax.hf`, re-exported here so that
`from convert import load_hf, save_hf` works; `save_hf` here is `convert.export.save_hf`, which
adds what transformers needs to load the directory as a Backpack (config with auto_map, model
code, tokenizer, model card).
"""

from backpack_jax.hf import ConversionError, from_state_dict, load_hf, to_state_dict
from convert.export import save_hf

__all__ = ["ConversionError", "from_state_dict", "load_hf", "save_hf", "to_state_dict"]
