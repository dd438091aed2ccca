"""Backpack model configuration with the Hugging Face field names.

The field names are those of the `stanfordnlp/backpack-gpt2` config.json, so a config converts to
and from that file without a translation table. Presets give the checkpoint's exact shape, the
paper's sizes (Table 9) and a tiny model for tests and CPU demos.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Keys a Hugging Face GPT-2/Backpack config.json carries that do not change the model's function.
_HF_BOOKKEEPING_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
    "_name_or_path", "use_cache", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "task_specific_params",
    "tie_word_embeddings", "pad_token_id", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "id2label", "label2id", "problem_type",
})

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
    reorder_and_upcast_attn: bool = False
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    bos_token_id: int = 50256
    eos_token_id: int = 50256

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

    def replace(self, **changes: Any) -> "BackpackConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "BackpackConfig":
        """Builds a config from a config.json dict; unknown keys that could matter are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in fields and k not in _HF_BOOKKEEPING_KEYS
                         and k != "n_ctx")
        if unknown:
            raise ValueError(f"config.json has keys BackpackConfig does not know: {unknown}")
        if "n_ctx" in hf and hf["n_ctx"] != hf.get("n_positions", cls.n_positions):
            raise ValueError(f"config.json: n_ctx={hf['n_ctx']} differs from n_positions="
                             f"{hf.get('n_positions', cls.n_positions)}")
        return cls(**{k: v for k, v in hf.items() if k in fields})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json the Hugging Face remote code loads."""
        hf = dataclasses.asdict(self)
        hf.update(model_type="gpt2", architectures=["BackpackGPT2LMHeadModel"])
        return hf


BACKPACK_GPT2 = BackpackConfig()  # Exactly stanfordnlp/backpack-gpt2.

PRESETS: dict[str, BackpackConfig] = {
    "backpack_gpt2": BACKPACK_GPT2,
    "small": BACKPACK_GPT2,  # Paper's Backpack-Small: 768 / 12 layers / 12 heads, 170M.
    "mini": BACKPACK_GPT2.replace(n_embd=640, n_layer=8, n_head=8),  # 100M.
    "micro": BACKPACK_GPT2.replace(n_embd=384, n_layer=6, n_head=6),  # 40M.
    # A few minutes of CPU training on the GPT-2 vocabulary; also the default in tests.
    "tiny": BACKPACK_GPT2.replace(n_positions=128, n_embd=64, n_layer=2, n_head=2, num_senses=4,
                                  sense_intermediate_scale=2),
}


def get_config(name: str) -> BackpackConfig:
    """Returns a preset by name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None
