"""Hugging Face <-> Flax conversion of Backpack checkpoints (`stanfordnlp/backpack-gpt2` layout).

`names` is the parameter name table, `state_dict` turns HF tensors into the Flax tree and back,
`files` reads and writes HF directories (config.json and weights).
"""

from backpack_jax.hf.files import CONFIG_FILE, load_hf, read_config, write_config, write_hf
from backpack_jax.hf.state_dict import ConversionError, from_state_dict, to_state_dict

__all__ = ["CONFIG_FILE", "ConversionError", "from_state_dict", "load_hf", "read_config",
           "to_state_dict", "write_config", "write_hf"]
