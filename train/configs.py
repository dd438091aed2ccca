"""Training configurations: the paper's recipe at three sizes, and a CPU demo.

`get_config(name)` returns an `ml_collections.ConfigDict`; `parse_args(argv)` applies
`--config=NAME` and `--config.a.b=VALUE` overrides in ml_collections style, rejecting unknown
fields and wrongly typed values before any work starts.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
from ml_collections import config_dict

from backpack_jax import config as model_config

# The recipe of the paper (section 3 of /work/shared/BACKPACK.md), shared by all three sizes.
_PAPER_RECIPE = dict(steps=100_000, batch_size=1024, seq_len=512, lr=6e-4, warmup_steps=5_000,
                     weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)

# `remat` names: which activations each Transformer block keeps for the backward pass.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # No rematerialisation.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ("float32", "bfloat16")


def _model_dict(preset: str, **changes: Any) -> ml_collections.ConfigDict:
    fields = dataclasses.asdict(model_config.get_config(preset).replace(**changes))
    # n_inner=None means 4*n_embd; keep its type (int) so an override is still type-checked.
    model = {k: (config_dict.placeholder(int) if k == "n_inner" and v is None else v)
             for k, v in fields.items()}
    return ml_collections.ConfigDict(model)


def _base(model: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = model
    cfg.update(_PAPER_RECIPE)
    cfg.seed = 0
    cfg.data = config_dict.placeholder(str)  # None: the embedded default corpus.
    cfg.data_dir = config_dict.placeholder(str)
    cfg.eval_every = 1000
    cfg.eval_batches = 20  # Held-out batches of `batch_size` sequences per evaluation.
    cfg.log_every = 10
    cfg.checkpoint_every = 1000
    cfg.keep_checkpoints = 3
    # Device mesh (data, fsdp, tensor); -1 takes the devices the other axes leave.
    cfg.mesh_shape = (-1, 1, 1)
    cfg.dtype = "bfloat16"  # Compute dtype; parameters and optimizer state stay float32.
    cfg.remat = "none"  # A REMAT_POLICIES name, applied to each Transformer block.
    # Per-device micro-batch (sequences) and accumulation steps; None derives one from the other
    # (both None: no accumulation). The global batch never depends on the device count.
    cfg.microbatch_size = config_dict.placeholder(int)
    cfg.grad_accum_steps = config_dict.placeholder(int)
    cfg.peak_flops = config_dict.placeholder(float)  # Per device, for MFU where not in the table.
    cfg.update(fields)
    return cfg


def gpt2_small() -> ml_collections.ConfigDict:
    """Backpack-Small (170M), the `stanfordnlp/backpack-gpt2` shape, with the paper's recipe."""
    return _base(_model_dict("backpack_gpt2"), data="openwebtext", microbatch_size=16)


def gpt2_mini() -> ml_collections.ConfigDict:
    """Backpack-Mini (100M) with the paper's recipe."""
    return _base(_model_dict("mini"), data="openwebtext", microbatch_size=16)


def gpt2_micro() -> ml_collections.ConfigDict:
    """Backpack-Micro (40M) with the paper's recipe."""
    return _base(_model_dict("micro"), data="openwebtext", microbatch_size=32)


def tiny() -> ml_collections.ConfigDict:
    """A few minutes on a 2-core CPU, on the embedded corpus; the loss falls visibly."""
    return _base(_model_dict("tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
                 steps=200, batch_size=8, seq_len=128, lr=1e-2, warmup_steps=20,
                 eval_every=50, eval_batches=8, log_every=5, checkpoint_every=50,
                 dtype="float32")


PRESETS = {f.__name__: f for f in (gpt2_small, gpt2_mini, gpt2_micro, tiny)}


def get_config(name: str) -> ml_collections.ConfigDict:
    """A fresh, type-safe ConfigDict for the named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(PRESETS)}") from None


def model_from_config(cfg: ml_collections.ConfigDict) -> model_config.BackpackConfig:
    """The BackpackConfig the `model` field describes (validated by BackpackConfig itself)."""
    return model_config.BackpackConfig(**cfg.model.to_dict())


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks relations between fields that types alone do not catch."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"config: {message}")

    model = model_from_config(cfg)
    for field in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                  "checkpoint_every", "keep_checkpoints"):
        need(cfg[field] > 0, f"{field}={cfg[field]} must be positive")
    need(cfg.seq_len <= model.n_positions,
         f"seq_len={cfg.seq_len} exceeds model.n_positions={model.n_positions}")
    need(0 <= cfg.warmup_steps <= cfg.steps,
         f"warmup_steps={cfg.warmup_steps} must be in [0, steps={cfg.steps}]")
    need(cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.grad_clip_norm > 0,
         "lr and grad_clip_norm must be positive, weight_decay non-negative")
    need(len(cfg.mesh_shape) == 3 and all(isinstance(n, int) and (n > 0 or n == -1)
                                          for n in cfg.mesh_shape)
         and list(cfg.mesh_shape).count(-1) <= 1,
         f"mesh_shape={cfg.mesh_shape} must be 3 positive ints (data, fsdp, tensor), "
         "at most one of them -1")
    need(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r} must be one of {DTYPES}")
    need(cfg.remat in REMAT_POLICIES,
         f"remat={cfg.remat!r} must be one of {tuple(REMAT_POLICIES)}")
    for field in ("microbatch_size", "grad_accum_steps"):
        need(cfg[field] is None or cfg[field] > 0, f"{field}={cfg[field]} must be positive")
    need(cfg.peak_flops is None or cfg.peak_flops > 0, "peak_flops must be positive")


def _parse_value(text: str, current: Any, field_type: type | None) -> Any:
    """Parses an override the way the field's type asks (strings stay raw)."""
    if field_type is str or isinstance(current, str):
        return None if text == "None" else text
    if field_type is bool or isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # Let the ConfigDict's type check reject it with the field's name.


def apply_override(cfg: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Sets `cfg.<path>` from command-line text, with ml_collections' type safety."""
    *parents, leaf = path.split(".")
    node = cfg
    for i, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ValueError(f"unknown config field {'.'.join(parents[:i + 1])!r}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise ValueError(f"unknown config field {path!r}")
    field = node.get_ref(leaf)
    value = _parse_value(text, node[leaf], field.get_type())
    if isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ValueError(f"config field {path!r}: cannot set {text!r} ({e})") from None


def parse_args(argv: Sequence[str], flags: Sequence[str] = ()
               ) -> tuple[ml_collections.ConfigDict, dict[str, str | None]]:
    """Parses `--config=NAME`, `--config.x.y=V` and the named `--flag=V`s; strict about typos."""
    values: dict[str, str | None] = {flag: None for flag in flags}
    name, overrides = None, []
    for arg in argv:
        key, eq, text = arg.partition("=")
        if not key.startswith("--") or not eq:
            raise ValueError(f"cannot parse argument {arg!r}; expected --name=value")
        key = key[2:]
        if key == "config":
            name = text
        elif key.startswith("config."):
            overrides.append((key[len("config."):], text))
        elif key in values:
            values[key] = text
        else:
            raise ValueError(f"unknown flag --{key}; known: --config, --config.<field>, "
                             + ", ".join(f"--{f}" for f in flags))
    if name is None:
        raise ValueError(f"--config=NAME is required; choose from {sorted(PRESETS)}")
    cfg = get_config(name)
    for path, text in overrides:
        apply_override(cfg, path, text)
    validate(cfg)
    return cfg, values
