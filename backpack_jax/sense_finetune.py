"""Sense finetuning (Hewitt, Chen, Xie, Adams, Liang, Manning, *Model Editing with Canonical
Examples*, 2024): from a few canonical examples, pick about ten (token, sense) pairs and learn an
additive update for each; nothing else of the model changes.

- `SenseDelta`: the learned edit, a `SenseEdit` adding delta_RxD[r] to sense sense_R[r] of token
  token_R[r] wherever it occurs (`model.apply`, `generate`, attribution: `sense_edit=`).
  `save_delta` / `load_delta` write and read it (one small safetensors file; `load_delta` also
  reads the one inside a Hugging Face export).
- `read_examples`: the authors' JSONL (`prefix` + `suffix`, `prefix` + `suffix1`/`suffix2`, or
  `text`), tokenized with the positions whose next-token loss counts.
- `select_senses`: the released code's alpha-mass selection (its `importance.py`).
- `finetune`: Adam over the deltas (or, as the baseline, every parameter) with the released
  trainer's loss, KL regularisation, schedule and step rule, scoring the model after each epoch
  with the protocol's `intervention_score` and `text_loss` (`evals.canonical` runs it all).

The released code is followed where it and the paper differ; docs/experiments.md lists where.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
import tqdm

from backpack_jax import batching, checks, model
from backpack_jax.atomic import atomic_path
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import SenseEdit
from backpack_jax.hf.files import read_tensors
from backpack_jax.hf.names import SENSE_EDIT_PREFIX
from backpack_jax.model import Params
from backpack_jax.tokenizer import EOT_TOKEN, Tokenizer

LOSSES = ("good", "bad", "good-v-bad", "balance")
# The keys of each kind of line in the authors' JSONL (other keys are ignored).
FIELDS = {"pair": ("prefix", "suffix1", "suffix2"), "suffix": ("prefix", "suffix"),
          "text": ("text",)}
PAIR_LOSSES = ("good-v-bad", "balance")
# The released trainer's Adam (bitsandbytes' 8-bit Adam there; full precision here).
BETAS = (0.9, 0.995)
DELTA_FORMAT = "backpack-jax sense delta"


# ------------------------------------------------------------------------------ the edit

@flax.struct.dataclass
class SenseDelta(SenseEdit):
    """Adds delta_RxD[r] to sense sense_R[r] of token token_R[r] wherever the token occurs; the
    (token, sense) pairs are unique. Differentiable in delta_RxD, so training takes gradients of
    the R deltas alone: every other sense has no parameter to move."""

    token_R: jax.Array  # int32
    sense_R: jax.Array  # int32
    delta_RxD: jax.Array  # float32

    def edit(self, input_ids_BxS: jax.Array, senses_BxSxKxD: jax.Array) -> jax.Array:
        dtype = senses_BxSxKxD.dtype
        hit_BxSxR = (input_ids_BxS[..., None] == self.token_R).astype(dtype)
        at_RxK = (self.sense_R[:, None] == jnp.arange(senses_BxSxKxD.shape[2])).astype(dtype)
        return senses_BxSxKxD + jnp.einsum("bsr,rk,rd->bskd", hit_BxSxR, at_RxK,
                                           self.delta_RxD.astype(dtype))

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(np.asarray(self.token_R).tolist(), np.asarray(self.sense_R).tolist(),
                        strict=True))


def sense_delta(config: BackpackConfig, pairs: Sequence[tuple[int, int]],
                delta_RxD: Any = None) -> SenseDelta:
    """A `SenseDelta` over `pairs` (token id, sense index), zero unless `delta_RxD` is given."""
    pairs = [(checks.check_token(config, t), checks.check_sense(config, k)) for t, k in pairs]
    if len(set(pairs)) != len(pairs):
        raise ValueError("the (token, sense) pairs of a sense delta must be unique")
    R, D = len(pairs), config.n_embd
    delta_RxD = np.zeros((R, D), np.float32) if delta_RxD is None else np.asarray(
        delta_RxD, np.float32)
    if delta_RxD.shape != (R, D):
        raise ValueError(f"delta has shape {delta_RxD.shape}, expected {(R, D)} for {R} pairs "
                         f"of width n_embd={D}")
    return SenseDelta(token_R=jnp.asarray([t for t, _ in pairs], jnp.int32).reshape(R),
                      sense_R=jnp.asarray([k for _, k in pairs], jnp.int32).reshape(R),
                      delta_RxD=jnp.asarray(delta_RxD))


def delta_tensors(edit: SenseDelta, prefix: str = "") -> dict[str, np.ndarray]:
    """The edit's three arrays by name (`prefix` + token / sense / delta)."""
    return {f"{prefix}token": np.asarray(edit.token_R, np.int64),
            f"{prefix}sense": np.asarray(edit.sense_R, np.int64),
            f"{prefix}delta": np.asarray(edit.delta_RxD, np.float32)}


def save_delta(path: str | os.PathLike, edit: SenseDelta, config: BackpackConfig) -> None:
    """Writes the edit to one safetensors file, atomically, with the model shape it is for."""
    meta = {"format": DELTA_FORMAT, "n_embd": str(config.n_embd),
            "num_senses": str(config.num_senses), "vocab_size": str(config.vocab_size)}
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(delta_tensors(edit), str(tmp), metadata=meta)


def load_delta(path: str | os.PathLike, config: BackpackConfig) -> SenseDelta:
    """Reads a `save_delta` file, or the delta inside a Hugging Face export directory, checked
    against `config` (ids in range, width n_embd, unique pairs)."""
    path = pathlib.Path(path)
    if path.is_dir():
        tensors, prefix = read_tensors(path), SENSE_EDIT_PREFIX
    elif not path.is_file():
        raise FileNotFoundError(f"no sense delta at {path}")
    else:
        prefix = ""
        try:
            tensors = safetensors.numpy.load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a safetensors file: {e}") from e
    names = [prefix + n for n in ("token", "sense", "delta")]
    if not all(n in tensors for n in names):
        raise ValueError(f"{path} holds no sense delta (tensors {sorted(names)} missing)")
    token_R, sense_R, delta_RxD = (tensors[n] for n in names)
    if token_R.ndim != 1 or sense_R.shape != token_R.shape or delta_RxD.ndim != 2 or (
            delta_RxD.shape[0] != token_R.shape[0]):
        raise ValueError(f"{path}: inconsistent sense delta shapes token {token_R.shape}, "
                         f"sense {sense_R.shape}, delta {delta_RxD.shape}")
    try:
        return sense_delta(config, list(zip(token_R.tolist(), sense_R.tolist(), strict=True)),
                           delta_RxD)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ------------------------------------------------------------------------------ the data

@dataclasses.dataclass(frozen=True)
class Text:
    """Token ids and the positions [start, stop) whose next-token losses count."""

    ids: tuple[int, ...]
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Example:
    """One line of a data file: one text (prefix + suffix, or a whole text) or, for the pair
    losses, two (prefix + suffix1, prefix + suffix2)."""

    texts: tuple[Text, ...]


def _encode(text: str, tokenizer: Tokenizer) -> list[int]:
    # The authors' Hugging Face tokenizer reads "<|endoftext|>" in text as the special token
    # (their background files start with it), so this does too.
    return tokenizer.encode(text, allowed_special={EOT_TOKEN})


def read_examples(path: str | os.PathLike, tokenizer: Tokenizer, config: BackpackConfig,
                  kind: str | None = None) -> list[Example]:
    """Reads a JSONL file in the authors' schema. `kind` is "suffix" (prefix, suffix), "pair"
    (prefix, suffix1, suffix2) or "text" (text); None takes it from the first line. Other keys
    are ignored. A bad line is a ValueError naming the file and line."""
    if kind not in (None, *FIELDS):
        raise ValueError(f"kind must be one of {list(FIELDS)} or None, got {kind!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            keys = {k for k, fields in FIELDS.items() if {*fields} <= record.keys()}
            kind = kind or next((k for k in FIELDS if k in keys), None)  # pair before suffix
            if kind is None or kind not in keys:
                wanted = [kind] if kind else list(FIELDS)
                raise ValueError(f"{where}: needs {' or '.join(_keys(k) for k in wanted)}; has "
                                 f"{sorted(record)}")
            for key in FIELDS[kind]:
                if not isinstance(record[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string")
            examples.append(Example(_texts(record, kind, tokenizer, config, where)))
    if not examples:
        raise ValueError(f"{path} has no examples")
    return examples


def _keys(kind: str) -> str:
    return " and ".join(repr(k) for k in FIELDS[kind])


def _texts(record: dict, kind: str, tokenizer: Tokenizer, config: BackpackConfig,
           where: str) -> tuple[Text, ...]:
    if kind == "text":
        ids = _encode(record["text"], tokenizer)
        if len(ids) < 2:
            raise ValueError(f"{where}: the text has {len(ids)} token(s); at least 2 are needed "
                             f"for a next-token loss")
        texts = [Text(tuple(ids), 0, len(ids) - 1)]
    else:
        prefix = _encode(record["prefix"], tokenizer)
        if not prefix:
            raise ValueError(f"{where}: the prefix tokenizes to nothing")
        texts = []
        for key in FIELDS[kind][1:]:
            suffix = _encode(record[key], tokenizer)
            if not suffix:
                raise ValueError(f"{where}: {key} {record[key]!r} tokenizes to nothing")
            # Position i predicts token i + 1: the suffix is predicted from the last prefix
            # token on.
            texts.append(Text(tuple(prefix + suffix), len(prefix) - 1,
                              len(prefix) + len(suffix) - 1))
    for t in texts:
        if len(t.ids) > config.n_positions:
            raise ValueError(f"{where}: {len(t.ids)} tokens, more than this model's "
                             f"n_positions={config.n_positions}")
        if max(t.ids) >= config.vocab_size:
            raise ValueError(f"{where}: token id {max(t.ids)} is outside this model's "
                             f"vocab_size={config.vocab_size}")
    return tuple(texts)


def _padded(texts: Sequence[Text], config: BackpackConfig) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """(ids [B, S] right-padded with 0, loss mask [B, S], real-token mask [B, S]); S is a
    `batching.bucket` width, so few shapes compile. Right padding changes no earlier position."""
    S = batching.bucket(max(len(t.ids) for t in texts), config.n_positions)
    ids_BxS = np.zeros((len(texts), S), np.int32)
    loss_BxS = np.zeros((len(texts), S), np.float32)
    real_BxS = np.zeros((len(texts), S), np.float32)
    for b, t in enumerate(texts):
        ids_BxS[b, :len(t.ids)] = t.ids
        loss_BxS[b, t.start:t.stop] = 1.0
        real_BxS[b, :len(t.ids)] = 1.0
    return ids_BxS, loss_BxS, real_BxS


def next_token_nll(logits_BxSxV: jax.Array, ids_BxS: jax.Array) -> jax.Array:
    """-log p(token s + 1 | ..s) at every position s (the last one scores token 0, as the
    released code; a loss mask drops it)."""
    targets_BxS = jnp.concatenate([ids_BxS[:, 1:], jnp.zeros_like(ids_BxS[:, :1])], axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxSxV.astype(jnp.float32), targets_BxS)


def edited_logits(params: Params, config: BackpackConfig, ids_BxS: jax.Array,
                  edit: SenseEdit | None) -> jax.Array:
    return model.apply(params, ids_BxS, config, sense_edit=edit).logits


@functools.partial(jax.jit, static_argnames="config")
def _nll_BxS(params: Params, ids_BxS: jax.Array, edit: SenseEdit | None,
             config: BackpackConfig) -> jax.Array:
    return next_token_nll(edited_logits(params, config, ids_BxS, edit), ids_BxS)


def scorer(params: Params, config: BackpackConfig, edit: SenseEdit | None = None) -> Callable:
    """`nll_fn(ids_BxS) -> nll_BxS` of the Backpack under `edit`, for the evaluations below."""
    return lambda ids_BxS: _nll_BxS(params, jnp.asarray(ids_BxS), edit, config)


# -------------------------------------------------------------------------- the selection

@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen (token, sense) pairs, highest score first."""

    pairs: list[tuple[int, int]]
    scores: list[float]

    def rows(self, tokenizer: Tokenizer) -> list[dict[str, Any]]:
        return [{"token": t, "text": tokenizer.decode([t]), "sense": k, "score": s}
                for (t, k), s in zip(self.pairs, self.scores, strict=True)]


@functools.partial(jax.jit, static_argnames="config")
def _alpha_BxKxSxS(params: Params, ids_BxS: jax.Array, config: BackpackConfig) -> jax.Array:
    return model.apply(params, ids_BxS, config, return_contextualization=True).contextualization


def alpha_mass_VxK(params: Params, config: BackpackConfig, text: Text) -> np.ndarray:
    """For every (token, sense), the summed alpha it receives from the loss positions of
    `text`: sum over query positions i in [start, stop) of alpha[k, i, j], added into the row of
    the token at source position j."""
    ids_1xS, loss_1xS, _ = _padded([text], config)
    alpha_KxSxS = np.asarray(_alpha_BxKxSxS(params, jnp.asarray(ids_1xS), config)[0])
    mass_KxS = np.einsum("kij,i->kj", alpha_KxSxS, loss_1xS[0])
    out_VxK = np.zeros((config.vocab_size, config.num_senses), np.float64)
    np.add.at(out_VxK, ids_1xS[0, :len(text.ids)], mass_KxS[:, :len(text.ids)].T)
    return out_VxK


def select_senses(params: Params, config: BackpackConfig, examples: Sequence[Example],
                  background: Sequence[Example], *, loss: str, per_example: int,
                  lam: float, vocab_limit: int | None = None, progress: bool = True
                  ) -> Selection:
    """The released code's alpha-based selection (`regularized_attn_weight_per_example`).

    Per example, each (token, sense) scores its alpha mass at the example's loss positions
    (good-v-bad: the first suffix's minus the second's; balance: their sum) minus `lam` times
    its mean mass over the background texts. Of the pairs with positive mass, the top
    `per_example` are kept (their score floored at 0.01); a pair kept by several examples keeps
    its highest score. (The released code ranks the others below them but may still take some,
    arbitrarily among ties, when an example has fewer than `per_example`; they are never taken
    here.) The union, highest first, is the selection. Tokens from
    `vocab_limit` on (default: the tokenizer's 50257) are never chosen, as in the code.
    """
    if per_example < 1:
        raise ValueError(f"the selection is empty: senses per example must be >= 1, got "
                         f"{per_example}")
    if not examples:
        raise ValueError("the selection is empty: no canonical examples")
    _check_loss(loss, examples)
    limit = min(vocab_limit or 50257, config.vocab_size)
    background_VxK = np.zeros((config.vocab_size, config.num_senses))
    for ex in tqdm.tqdm(background, desc="selection: background", disable=not progress):
        background_VxK += alpha_mass_VxK(params, config, ex.texts[0])
    background_VxK /= max(len(background), 1)
    chosen: dict[int, float] = {}
    for ex in tqdm.tqdm(examples, desc="selection: examples", disable=not progress):
        masses = [alpha_mass_VxK(params, config, t) for t in ex.texts]
        mass_VxK = masses[0] if len(masses) == 1 else (
            masses[0] - masses[1] if loss == "good-v-bad" else masses[0] + masses[1])
        flat = (mass_VxK - lam * background_VxK)[:limit].reshape(-1)
        candidates = np.flatnonzero(mass_VxK[:limit].reshape(-1) > 0)
        for i in candidates[np.argsort(-flat[candidates], kind="stable")][:per_example]:
            chosen[int(i)] = max(chosen.get(int(i), -np.inf), float(flat[i]), 0.01)
    if not chosen:
        raise ValueError("the selection is empty: no (token, sense) receives positive alpha "
                         "mass from the examples (e.g. good-v-bad on suffixes predicted from "
                         "the same positions)")
    order = sorted(chosen, key=lambda i: (-chosen[i], i))
    K = config.num_senses
    return Selection([(i // K, i % K) for i in order], [chosen[i] for i in order])


def _check_loss(loss: str, examples: Sequence[Example]) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    pair = len(examples[0].texts) == 2
    if pair != (loss in PAIR_LOSSES):
        raise ValueError(f"loss {loss!r} needs {'two suffixes' if not pair else 'one suffix'} "
                         f"per example, but the examples have {len(examples[0].texts)}: use "
                         f"{' or '.join(PAIR_LOSSES if pair else ('good', 'bad'))}")


# ---------------------------------------------------------------------------- the losses

def _suffix_means_B(logits_fn: Callable, batch: tuple) -> jax.Array:
    ids_BxS, loss_BxS = batch[0], batch[1]
    nll_BxS = next_token_nll(logits_fn(ids_BxS), ids_BxS)
    return (nll_BxS * loss_BxS).sum(-1) / jnp.maximum(loss_BxS.sum(-1), 1.0)


def training_loss(logits_fn: Callable, batches: Sequence[tuple], loss: str) -> jax.Array:
    """The released code's training loss of one batch of examples (`batches`: one padded
    (ids, loss mask, real mask) per suffix). good: the mean over examples of each one's mean
    suffix token loss; bad: its negative; good-v-bad: the mean of (first - second); balance: the
    mean of |first - second|."""
    means = [_suffix_means_B(logits_fn, b) for b in batches]
    if loss in ("good", "bad"):
        return means[0].mean() * (1 if loss == "good" else -1)
    diff_B = means[0] - means[1]
    return (jnp.abs(diff_B) if loss == "balance" else diff_B).mean()


def kl_to_original(logits_fn: Callable, original_fn: Callable, batch: tuple) -> jax.Array:
    """KL(original || tuned) summed over the real positions and the vocabulary, per text (the
    released regulariser: torch's kl_div with reduction 'batchmean')."""
    ids_BxS, real_BxS = batch[0], batch[2]
    new_BxSxV = jax.nn.log_softmax(logits_fn(ids_BxS).astype(jnp.float32))
    old_BxSxV = jax.lax.stop_gradient(jax.nn.log_softmax(original_fn(ids_BxS)))
    kl_BxS = (jnp.exp(old_BxSxV) * (old_BxSxV - new_BxSxV)).sum(-1)
    return (kl_BxS * real_BxS).sum() / ids_BxS.shape[0]


# ---------------------------------------------------------------------------- evaluation

def nll_sums(nll_fn: Callable, texts: Sequence[Text], config: BackpackConfig,
             batch_size: int = 8, desc: str | None = None) -> np.ndarray:
    """Per text, [summed loss over its loss positions, number of positions], [L, 2].
    `nll_fn(ids_BxS) -> nll_BxS` is `next_token_nll` of some model."""
    out_Lx2 = np.zeros((len(texts), 2))
    sweep = list(batching.windows(len(texts), batch_size))
    for w in tqdm.tqdm(sweep, desc=desc, disable=desc is None, leave=False):
        ids_BxS, loss_BxS, _ = _padded(texts[w.start:w.stop], config)
        nll_BxS = np.asarray(nll_fn(ids_BxS), np.float64)
        sums_Bx2 = np.stack([(nll_BxS * loss_BxS).sum(-1), loss_BxS.sum(-1)], -1)
        out_Lx2[w.start + w.new:w.stop] = sums_Bx2[w.fresh]
    return out_Lx2


def intervention_score(nll_fn: Callable, examples: Sequence[Example], config: BackpackConfig,
                       loss: str, threshold: float | None, batch_size: int = 8) -> float:
    """The released evaluators with per-example normalisation (the setting of all the authors'
    configs). Per example, s = the summed suffix loss (bad: its negative; good-v-bad: first minus
    second; balance: |first - second|). Returns the mean of s, or with a threshold the share of
    examples failing, s > threshold. Lower is better."""
    _check_loss(loss, examples)
    sums = [nll_sums(nll_fn, [ex.texts[i] for ex in examples], config, batch_size,
                     desc="scoring")[:, 0] for i in range(len(examples[0].texts))]
    s_L = (sums[0] * (1 if loss != "bad" else -1) if len(sums) == 1 else
           sums[0] - sums[1] if loss == "good-v-bad" else np.abs(sums[0] - sums[1]))
    return float((s_L > threshold).mean() if threshold is not None else s_L.mean())


def text_loss(nll_fn: Callable, texts: Sequence[Example], config: BackpackConfig,
              batch_size: int = 8) -> float:
    """Mean next-token loss over every token of the texts (general degradation)."""
    sums_Lx2 = nll_sums(nll_fn, [ex.texts[0] for ex in texts], config, batch_size,
                        desc="general")
    return float(sums_Lx2[:, 0].sum() / sums_Lx2[:, 1].sum())


# ------------------------------------------------------------------------------ training

@dataclasses.dataclass(frozen=True)
class Settings:
    """The released trainer's knobs; defaults as in the authors' Backpack sweeps."""

    loss: str = "good"
    epochs: int = 10
    lr: float = 1e-3
    grad_acc_steps: int = 5  # a step every this many examples (see `finetune`)
    kl_weight: float = 0.0  # 0: no regularisation
    seed: int = 0


ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=0.0, b1=BETAS[0], b2=BETAS[1])


@functools.partial(jax.jit, static_argnames=("config", "loss", "full"))
def _step(trainable: Any, params: Params, edit: SenseDelta | None, opt_state: Any,
          batches: tuple, background: tuple | None, kl_weight: jax.Array, *,
          config: BackpackConfig, loss: str, full: bool) -> tuple[Any, Any, jax.Array]:
    def tuned(t):
        if full:
            return lambda ids: edited_logits(t, config, ids, None)
        return lambda ids: edited_logits(params, config, ids, edit.replace(delta_RxD=t))

    def objective(t):
        value = training_loss(tuned(t), batches, loss)
        if background is not None:
            original = functools.partial(edited_logits, params, config, edit=None)
            value = value + kl_weight * kl_to_original(tuned(t), original, background)
        return value

    value, grads = jax.value_and_grad(objective)(trainable)
    updates, opt_state = ADAM.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value


def finetune(params: Params, config: BackpackConfig, examples: Sequence[Example],
             settings: Settings, *, selection: Selection | None = None,
             background: Sequence[Example] = (), evaluate: Callable[[Callable], dict] | None
             = None, progress: bool = True) -> tuple[list[dict], list[Any]]:
    """Trains the deltas of `selection` (sense finetuning) or, without one, every parameter
    (the full-finetuning baseline), as the released trainer does:

    - Adam, betas (0.9, 0.995), the learning rate cosine-annealed to 0 over the epochs
      (stepped once per epoch);
    - examples one at a time, reshuffled every epoch; an optimizer step every
      `grad_acc_steps` examples from the gradient of that last example alone (the trainer
      zeroes the gradients at every example, so the earlier ones of a group are discarded:
      they are skipped here, which gives the same updates);
    - with `kl_weight`, plus kl_weight x KL(original || tuned) on a background text drawn at
      random for each step.

    `evaluate(nll_fn)` scores a model (`nll_fn(ids_BxS) -> nll_BxS`) before training (a first
    row, epoch 0) and after every epoch. Returns (one stats dict per row, the delta [R, D] of
    each row: None before training; for the baseline, the parameters after the last epoch and
    None before).
    """
    _check_loss(settings.loss, examples)
    if settings.epochs < 0 or settings.grad_acc_steps < 1 or settings.lr <= 0:
        raise ValueError("epochs must be >= 0, grad_acc_steps >= 1 and lr > 0")
    if settings.kl_weight and not background:
        raise ValueError("KL regularisation (kl_weight > 0) needs background texts")
    full = selection is None
    if not full and not selection.pairs:
        raise ValueError("the selection is empty: nothing to finetune")
    edit = None if full else sense_delta(config, selection.pairs)
    trainable = params if full else edit.delta_RxD

    def nll_fn_of(t):
        return scorer(t, config) if full else scorer(params, config, edit.replace(delta_RxD=t))

    stats: list[dict] = []
    states: list[Any] = []
    if evaluate is not None:
        stats.append({"epoch": 0, **evaluate(nll_fn_of(trainable))})
        states.append(None)
    opt_state = ADAM.init(trainable)
    schedule = optax.cosine_decay_schedule(settings.lr, max(settings.epochs, 1))
    rng = np.random.default_rng(settings.seed)
    steps_per_epoch = len(examples) // settings.grad_acc_steps
    for epoch in range(settings.epochs):
        opt_state.hyperparams["learning_rate"] = jnp.asarray(schedule(epoch), jnp.float32)
        order = rng.permutation(len(examples))[settings.grad_acc_steps - 1::
                                               settings.grad_acc_steps]
        losses = []
        for i in tqdm.tqdm(order, desc=f"epoch {epoch + 1}/{settings.epochs}",
                           disable=not progress, total=steps_per_epoch, leave=False):
            batches = tuple(tuple(map(jnp.asarray, _padded([t], config)))
                            for t in examples[i].texts)
            bg = None
            if settings.kl_weight:
                text = background[rng.integers(len(background))].texts[0]
                bg = tuple(map(jnp.asarray, _padded([text], config)))
            trainable, opt_state, value = _step(
                trainable, params, edit, opt_state, batches, bg,
                jnp.float32(settings.kl_weight), config=config, loss=settings.loss, full=full)
            losses.append(float(value))
        row = {"epoch": epoch + 1, "lr": float(schedule(epoch)),
               "train_loss": float(np.mean(losses)) if losses else None}
        if evaluate is not None:
            row |= evaluate(nll_fn_of(trainable))
        stats.append(row)
        last = epoch == settings.epochs - 1
        states.append(trainable if not full or last else None)  # one copy of every parameter
    return stats, states
