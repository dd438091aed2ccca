"""The Backpack-GPT2 config for transformers: GPT-2's fields plus the sense network's.

Copied into every Hugging Face export next to `modeling_backpack.py`, so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` needs nothing from this project.
"""

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config


@strict
class BackpackGPT2Config(GPT2Config):
    """`stanfordnlp/backpack-gpt2`'s config: its defaults are that checkpoint's shape."""

    model_type = "backpack-gpt2"

    vocab_size: int = 50264
    n_positions: int = 512
    num_senses: int = 16
    sense_intermediate_scale: int = 4
    scale_attn_by_inverse_layer_idx: bool = True
    sense_delta_pairs: int = 0  # (token, sense) pairs of a learned sense edit, 0 for none
