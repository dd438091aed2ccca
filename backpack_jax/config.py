"""The one config system: the model's hyperparameters and the presets (model + training recipe).

`BackpackConfig` uses the field names of the `stanfordnlp/backpack-gpt2` config.json, so a config
converts to and from that file without a translation table. A preset (`get_config(name)`) is an
`ml_collections.ConfigDict`: the paper's training recipe with the model's fields under `model`.
Presets: `gpt2_small` (the checkpoint's exact shape, the paper's Backpack-Small), `gpt2_mini`,
`gpt2_micro` (the paper's Table 9) and `tiny` (CPU demos and tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

# Keys a Hugging Face GPT-2/Backpack config.json carries that do not change the model's function.
_HF_BOOKKEEPING_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "use_cache", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "task_specific_params",
    "tie_word_embeddings", "pad_token_id", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "id2label", "label2id", "problem_type",
    "sense_delta_pairs",  # an export's sense edit, read by sense_finetune.load_delta
})
# Keys HF configs carry whose value here must be the one given (this implementation has no other).
_HF_FIXED_KEYS = {"reorder_and_upcast_attn": False, "add_cross_attention": False}

SUPPORTED_ACTIVATIONS = ("gelu_new",)


@dataclasses.dataclass(frozen=True)
class BackpackConfig:
    """Hyperparameters of a Backpack-GPT2 model (hashable, so usable as a jit static arg)."""

    vocab_size: int = 50264
    n_positions: int = 512
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None means 4 * n_embd, as in GPT-2.
    num_senses: int = 16
    sense_intermediate_scale: int = 4
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = True
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    bos_token_id: int = 50256  # For Hugging Face's generation; the model never reads it.
    eos_token_id: int = 50256  # generate's default padding and stop token.

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"BackpackConfig.{field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "num_senses",
                      "sense_intermediate_scale"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
                 "must be a positive integer")
        need(self.n_inner is None or (isinstance(self.n_inner, int) and self.n_inner > 0),
             "n_inner", "must be None or a positive integer")
        need(self.n_embd % self.n_head == 0, "n_embd",
             f"must be divisible by n_head={self.n_head}")
        need(self.n_embd % self.num_senses == 0, "n_embd",
             f"must be divisible by num_senses={self.num_senses}")
        need(self.activation_function in SUPPORTED_ACTIVATIONS, "activation_function",
             f"only {SUPPORTED_ACTIVATIONS} is implemented")
        need(self.layer_norm_epsilon > 0, "layer_norm_epsilon", "must be positive")
        for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            need(0.0 <= getattr(self, field) < 1.0, field, "must be in [0, 1)")
        for field in ("bos_token_id", "eos_token_id"):
            need(0 <= getattr(self, field) < self.vocab_size, field,
                 f"must be a token id in [0, vocab_size={self.vocab_size})")

    @property
    def inner_dim(self) -> int:
        """Hidden width of the GPT-2 MLPs."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def sense_head_dim(self) -> int:
        """Query/key width per sense in the weight network (48 for the real checkpoint)."""
        return self.n_embd // self.num_senses

    def replace(self, **changes: Any) -> BackpackConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> BackpackConfig:
        """Builds a config from a config.json dict; unknown keys that could matter are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in fields and k not in _HF_BOOKKEEPING_KEYS
                         and k not in _HF_FIXED_KEYS and k != "n_ctx")
        if unknown:
            raise ValueError(f"config.json has keys BackpackConfig does not know: {unknown}")
        for key, value in _HF_FIXED_KEYS.items():
            if hf.get(key, value) != value:
                raise ValueError(f"config.json: {key}={hf[key]!r} is not implemented "
                                 f"(only {value})")
        if "n_ctx" in hf and hf["n_ctx"] != hf.get("n_positions", cls.n_positions):
            raise ValueError(f"config.json: n_ctx={hf['n_ctx']} differs from n_positions="
                             f"{hf.get('n_positions', cls.n_positions)}")
        return cls(**{k: v for k, v in hf.items() if k in fields})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json the Hugging Face remote code loads."""
        hf = dataclasses.asdict(self)
        hf.update(model_type="gpt2", architectures=["BackpackGPT2LMHeadModel"])
        return hf


# The paper's training recipe (Backpack-Small), shared by all three paper sizes.
_PAPER_RECIPE = dict(steps=100_000, batch_size=1024, seq_len=512, lr=6e-4, warmup_steps=5_000,
                     weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0)


def _model(**changes: Any) -> ml_collections.ConfigDict:
    """BackpackConfig's fields (backpack-gpt2's values unless changed) as a ConfigDict."""
    fields = dataclasses.asdict(BackpackConfig(**changes))
    # n_inner=None means 4*n_embd; a typed placeholder keeps an override type-checked.
    return ml_collections.ConfigDict({k: config_dict.placeholder(int) if k == "n_inner"
                                      and v is None else v for k, v in fields.items()})


def _preset(model: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
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
    cfg.remat = "none"  # Which activations each block keeps: a train.configs.REMAT_POLICIES name.
    # Per-device micro-batch (sequences) and accumulation steps; None derives one from the other
    # (both None: no accumulation). The global batch never depends on the device count.
    cfg.microbatch_size = config_dict.placeholder(int)
    cfg.grad_accum_steps = config_dict.placeholder(int)
    cfg.peak_flops = config_dict.placeholder(float)  # Per device, for MFU where not in the table.
    cfg.update(fields)
    return cfg


def gpt2_small() -> ml_collections.ConfigDict:
    """Backpack-Small (170M): exactly `stanfordnlp/backpack-gpt2`, with the paper's recipe."""
    return _preset(_model(), data="openwebtext", microbatch_size=16)


def gpt2_mini() -> ml_collections.ConfigDict:
    """Backpack-Mini (100M) with the paper's recipe."""
    return _preset(_model(n_embd=640, n_layer=8, n_head=8), data="openwebtext",
                   microbatch_size=16)


def gpt2_micro() -> ml_collections.ConfigDict:
    """Backpack-Micro (40M) with the paper's recipe."""
    return _preset(_model(n_embd=384, n_layer=6, n_head=6), data="openwebtext",
                   microbatch_size=32)


def tiny() -> ml_collections.ConfigDict:
    """A few minutes on a 2-core CPU, on the embedded corpus; the loss falls visibly."""
    model = _model(n_positions=128, n_embd=64, n_layer=2, n_head=2, num_senses=4,
                   sense_intermediate_scale=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _preset(model, steps=200, batch_size=8, seq_len=128, lr=1e-2, warmup_steps=20,
                   eval_every=50, eval_batches=8, log_every=5, checkpoint_every=50,
                   dtype="float32")


PRESETS = {f.__name__: f for f in (gpt2_small, gpt2_mini, gpt2_micro, tiny)}


def get_config(name: str) -> ml_collections.ConfigDict:
    """A fresh, type-safe ConfigDict of the named preset (model under `model`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(PRESETS)}") from None


def get_model_config(config: str | ml_collections.ConfigDict) -> BackpackConfig:
    """The BackpackConfig of a preset (by name) or of a config's `model` field."""
    if isinstance(config, str):
        config = get_config(config)
    return BackpackConfig(**config.model.to_dict())
