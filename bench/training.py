"""One optimizer step: train/'s jitted step vs a PyTorch AdamW step on the same batch."""

from __future__ import annotations

import numpy as np
import torch

from backpack_jax import config as config_lib, flops
from backpack_jax.config import BackpackConfig
from bench import reference as reference_lib
from bench.timing import CALLS_PER_TURN, best_seconds, seconds
from train import configs, optim, sharding, step as train_step


def train_config(name: str, batch: int, seq_len: int, dtype: str, remat: str = "none"):
    """The named training config at a benchmark-sized batch (dropout as in the recipe)."""
    cfg = config_lib.get_config(name)
    with cfg.unlocked():
        cfg.batch_size, cfg.seq_len, cfg.dtype, cfg.remat = batch, seq_len, dtype, remat
        cfg.microbatch_size, cfg.grad_accum_steps = None, None
    configs.validate(cfg)
    return cfg


def jax_step(cfg, model_cfg: BackpackConfig, params):
    """(step_fn, state) from train/: clipping, masked AdamW, donated state."""
    optimizer, schedule = optim.make_optimizer(cfg), optim.make_schedule(cfg)
    mesh = sharding.make_mesh(cfg.mesh_shape)
    shardings = train_step.state_shardings(
        train_step.abstract_state(cfg, model_cfg, optimizer), mesh)
    state = train_step.init_state(cfg, model_cfg, optimizer, shardings, params)
    return train_step.make_train_step(cfg, model_cfg, optimizer, schedule, mesh, shardings), state


def torch_step(cfg, reference: torch.nn.Module):
    """The same recipe in PyTorch: AdamW (decay on linear weights only), clipping at 1.0."""
    embeddings = {id(reference.backpack.gpt2_model.wte.weight),
                  id(reference.backpack.gpt2_model.wpe.weight)}
    decay = [p for p in reference.parameters() if p.ndim == 2 and id(p) not in embeddings]
    no_decay = [p for p in reference.parameters() if p.ndim != 2 or id(p) in embeddings]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
    reference.train()

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = reference(inputs)[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(name: str, batch: int, seq_len: int, repeats: int, with_reference: bool = True,
        dtype: str = "float32", remat: str = "none") -> dict:
    cfg = train_config(name, batch, seq_len, dtype, remat)
    model_cfg = config_lib.get_model_config(cfg)
    reference, params = reference_lib.reference_and_params(model_cfg, seed=1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    batch_np = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    step_fn, state = jax_step(cfg, model_cfg, params)
    holder = {"state": state}

    def one_jax_step():
        holder["state"], metrics = step_fn(holder["state"], batch_np)
        return metrics["loss"]

    compile_s, _ = seconds(one_jax_step)
    result = {"config": name, "batch": batch, "seq_len": seq_len, "dtype": dtype,
              "compile_s": compile_s}
    if with_reference:
        torch_fn = torch_step(cfg, reference)
        inputs, targets = (torch.from_numpy(batch_np[k].astype(np.int64))
                           for k in ("inputs", "targets"))
        torch_fn(inputs, targets)  # allocates the optimizer state
    best_jax = best_ref = float("inf")
    for _ in range(repeats):
        best_jax = min(best_jax, best_seconds(one_jax_step, CALLS_PER_TURN))
        if with_reference:
            best_ref = min(best_ref, best_seconds(lambda: torch_fn(inputs, targets),
                                                  CALLS_PER_TURN))
    n = batch * seq_len
    result["jax_tokens_per_s"] = n / best_jax
    result["jax_step_s"] = best_jax
    step_flops = n * 3 * flops.forward_flops_per_token(model_cfg, seq_len)
    result["jax_gflops"] = step_flops / best_jax / 1e9
    if with_reference:
        result["ref_tokens_per_s"] = n / best_ref
        result["ref_step_s"] = best_ref
        result["speedup"] = best_ref / best_jax
    return result
