"""The PyTorch side of the comparisons: the Backpack this project exports to Hugging Face
(`convert/hf_export/modeling_backpack.py`), on the same weights as the JAX side."""

from __future__ import annotations

import os

import jax
import numpy as np
import torch

from backpack_jax import model
from backpack_jax.config import BackpackConfig
from backpack_jax.hf import to_state_dict
from backpack_jax.model import Params
from convert.hf_export.configuration_backpack import BackpackGPT2Config
from convert.hf_export.modeling_backpack import BackpackGPT2LMHeadModel


def pin_torch_threads() -> int:
    """One torch thread per core, as XLA's CPU client uses, so both sides get the same cores."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def reference_and_params(config: BackpackConfig, seed: int = 0
                         ) -> tuple[BackpackGPT2LMHeadModel, Params]:
    """(the exported PyTorch Backpack in eval mode, the identical JAX params from `model.init`).

    The PyTorch model keeps no cache (`use_cache=False`): each call is one full forward pass.
    """
    params = model.init(config, jax.random.PRNGKey(seed))
    fields = {k: v for k, v in config.to_hf_dict().items()
              if k not in ("model_type", "architectures")}
    reference = BackpackGPT2LMHeadModel(BackpackGPT2Config(**fields, use_cache=False))
    reference.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value
                               in to_state_dict(params, config).items()}, strict=True)
    return reference.eval(), params
