"""The PyTorch reference (bench/torch_reference.py) and the same weights as JAX params."""

from __future__ import annotations

import os

import torch

from backpack_jax.config import BackpackConfig
from backpack_jax.hf import from_state_dict
from backpack_jax.model import Params
from bench.torch_reference import TorchBackpackLM, random_reference


def pin_torch_threads() -> int:
    """One torch thread per core, as XLA's CPU client uses, so both sides get the same cores."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def reference_and_params(config: BackpackConfig, seed: int = 0
                         ) -> tuple[TorchBackpackLM, Params]:
    """(TorchBackpackLM in eval mode, the identical JAX params)."""
    reference = random_reference(config, seed)
    return reference, from_state_dict(reference.canonical_tensors(), config)
