"""Command-line converters between Hugging Face and this project's checkpoints.

The conversion itself lives in `backpack_jax.hf`; its entry points are re-exported here so that
`from convert import load_hf, save_hf` keeps working.
"""

from backpack_jax.hf import ConversionError, from_state_dict, load_hf, save_hf, to_state_dict

__all__ = ["ConversionError", "from_state_dict", "load_hf", "save_hf", "to_state_dict"]
