"""What the CLIs print about a converted model."""

import jax
import numpy as np

from backpack_jax.model import Params


def count_params(params: Params) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
