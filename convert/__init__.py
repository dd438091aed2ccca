"""Hugging Face <-> Flax conversion of Backpack checkpoints (`stanfordnlp/backpack-gpt2` layout)."""

from convert.hf_io import load_hf, save_hf
from convert.state_dict import ConversionError, from_state_dict, to_state_dict

__all__ = ["ConversionError", "from_state_dict", "load_hf", "save_hf", "to_state_dict"]
