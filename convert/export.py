"""Hugging Face exports that transformers loads as a Backpack, offline and with `generate()`.

`save_hf` writes, next to `backpack_jax.hf.write_hf`'s weights, what
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs: a config.json of
model_type `backpack-gpt2` whose `auto_map` names this project's PyTorch Backpack (`hf_export/`,
copied in), GPT-2's tokenizer files, and a model card. Without the auto_map transformers would
build a plain GPT-2 and silently drop the sense network.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

from backpack_jax import checkpoint, hf, tokenizer
from backpack_jax.atomic import atomic_path
from backpack_jax.config import BackpackConfig
from backpack_jax.hf.names import SENSE_EDIT_PREFIX
from backpack_jax.model import Params
from backpack_jax.sense_finetune import SenseDelta, delta_tensors, load_delta

MODEL_TYPE = "backpack-gpt2"
CODE_DIR = pathlib.Path(__file__).parent / "hf_export"
CODE_FILES = ("configuration_backpack.py", "modeling_backpack.py")
LOCAL_AUTO_MAP = {"AutoConfig": "configuration_backpack.BackpackGPT2Config",
                  "AutoModelForCausalLM": "modeling_backpack.BackpackGPT2LMHeadModel"}
# The authors' remote code on the Hub (weights only: no mask, loss, cache or generate()).
HUB_CODE_REPO = "stanfordnlp/backpack-gpt2"
HUB_AUTO_MAP = {
    "AutoConfig": f"{HUB_CODE_REPO}--configuration_backpack_gpt2.BackpackGPT2Config",
    "AutoModelForCausalLM": f"{HUB_CODE_REPO}--modeling_backpack_gpt2.BackpackGPT2LMHeadModel",
}
# GPT-2's BPE files under the names transformers' GPT2Tokenizer reads.
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
EOT = "<|endoftext|>"


def save_hf(params: Params, config: BackpackConfig, out_dir: str | os.PathLike, *,
            hub_code: bool = False, trained_in: str | os.PathLike | None = None,
            sense_edit: SenseDelta | str | os.PathLike | None = None) -> pathlib.Path:
    """Writes a Hugging Face directory that transformers loads as a Backpack.

    Args:
      hub_code: point `auto_map` at the authors' code on the Hub (`stanfordnlp/backpack-gpt2`)
        instead of copying ours in; loading then needs the network, and that code has no
        attention mask, loss, cache or `generate()`.
      trained_in: the training workdir (or one of its steps) the params come from; the model
        card then says how they were trained.
      sense_edit: a learned sense edit (`sense_finetune.SenseDelta` or a file `save_delta`
        wrote) that the exported model applies: its pairs and deltas are buffers of the model.
    """
    if sense_edit is not None and hub_code:
        raise ValueError("a sense edit needs this project's model code, not --hub-code")
    if sense_edit is not None and not isinstance(sense_edit, SenseDelta):
        sense_edit = load_delta(sense_edit, config)
    edit = {} if sense_edit is None else delta_tensors(sense_edit, SENSE_EDIT_PREFIX)
    out_dir = hf.write_hf(params, config, out_dir, extra=edit)
    hf_config = config.to_hf_dict() | {
        "model_type": MODEL_TYPE, "auto_map": HUB_AUTO_MAP if hub_code else LOCAL_AUTO_MAP,
        "dtype": "float32", "tie_word_embeddings": True, "use_cache": True}
    if sense_edit is not None:
        hf_config["sense_delta_pairs"] = len(sense_edit.pairs)
    _write_text(out_dir / hf.CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if not hub_code:
        for name in CODE_FILES:
            shutil.copyfile(CODE_DIR / name, out_dir / name)
    has_tokenizer = config.vocab_size >= tokenizer.N_VOCAB
    if has_tokenizer:
        _write_tokenizer(out_dir, config)
    training = training_summary(trained_in) if trained_in is not None else None
    _write_text(out_dir / "README.md", model_card(config, hub_code, has_tokenizer, training))
    return out_dir


def _write_text(path: pathlib.Path, text: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)


def _write_tokenizer(out_dir: pathlib.Path, config: BackpackConfig) -> None:
    for name, source in TOKENIZER_FILES.items():
        _write_text(out_dir / name, tokenizer.read_bpe_file(source))
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.n_positions,
                "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT,
                "padding_side": "left", "add_prefix_space": False}  # Left: ready for generate().
    _write_text(out_dir / "tokenizer_config.json", json.dumps(settings, indent=2) + "\n")


def training_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Recipe, step, tokens seen and the last held-out loss up to that step, from a training
    workdir or one of its step directories."""
    path = pathlib.Path(path)
    steps = checkpoint.step_dirs(path)
    workdir, step_dir = (path, steps[0]) if steps else (path.parent.parent, path)
    recipe_file = workdir / "train_config.json"
    if not step_dir.name.isdigit() or not recipe_file.is_file():
        raise ValueError(f"{path} is not a training workdir or one of its steps")
    recipe = json.loads(recipe_file.read_text())
    step = int(step_dir.name)
    evals = []
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evals = [row for row in rows if "eval_loss" in row and row["step"] <= step]
    return {
        "step": step, "tokens": step * recipe["batch_size"] * recipe["seq_len"],
        "recipe": {"planned steps": recipe.get("steps"), "batch_size": recipe.get("batch_size"),
                   "seq_len": recipe.get("seq_len"), "lr": recipe.get("lr"),
                   "warmup_steps": recipe.get("warmup_steps"),
                   "weight_decay": recipe.get("weight_decay"), "dtype": recipe.get("dtype"),
                   "data": recipe.get("data") or "backpack-jax's built-in corpus"},
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_step": evals[-1]["step"] if evals else None,
    }


def model_card(config: BackpackConfig, hub_code: bool, has_tokenizer: bool,
               training: dict[str, Any] | None) -> str:
    """README.md: Hub metadata, how to load and generate, the config, and how it was trained."""
    # Plain GPT-2 BPE: tokenizer_type skips the model's config (and so its remote code).
    load = ("tok = AutoTokenizer.from_pretrained(path, tokenizer_type='gpt2')" if has_tokenizer
            else "tok = AutoTokenizer.from_pretrained('openai-community/gpt2')  # GPT-2's BPE")
    lines = [
        "---", "library_name: transformers", "license: apache-2.0",
        "pipeline_tag: text-generation",
        "tags:", "- backpack", "- backpack-jax", "- custom_code", "- text-generation", "---", "",
        "# Backpack-GPT2", "",
        "A [Backpack language model](https://arxiv.org/abs/2305.16765) (Hewitt et al., ACL 2023) "
        "exported by backpack-jax. Each token is predicted from a weighted "
        "sum of per-word sense vectors; the weights come from a GPT-2 Transformer.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "path = '.'  # this directory, or its Hub repository id",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        load,
        "ids = tok('The meaning of life is', return_tensors='pt')",
        "out = model.generate(**ids, max_new_tokens=20, do_sample=False)",
        "print(tok.decode(out[0]))",
        "```", "",
        ("`auto_map` points at the authors' code on the Hub (`stanfordnlp/backpack-gpt2`): "
         "loading needs the network, and that code has no attention mask, loss, cache or "
         "`generate()`." if hub_code else
         "The model code (`configuration_backpack.py`, `modeling_backpack.py`; transformers 5) "
         "ships in this directory. `model(ids, labels=ids).loss` is the language-modelling loss; "
         "`output_contextualization=True` / `output_senses=True` return the Backpack's weights "
         "[B, K, S, T] and sense vectors [B, K, S, D]; "
         "`model.run_with_custom_contextualization(ids, alpha)` predicts from given weights."),
        "", "## Config", "", "| field | value |", "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(config.to_hf_dict().items())
              if k not in ("model_type", "architectures")]
    if training is not None:
        loss = training["eval_loss"]
        lines += ["", "## Training", "",
                  f"Trained with backpack-jax for {training['step']:,} steps "
                  f"({training['tokens']:,} tokens). "
                  + (f"Held-out loss {loss:.4f} at step {training['eval_step']:,}."
                     if loss is not None else "No held-out loss was logged."),
                  "", "| recipe | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in training["recipe"].items()]
    return "\n".join(lines) + "\n"
