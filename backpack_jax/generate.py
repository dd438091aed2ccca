"""Cached autoregressive decoding for Backpack LMs, and a streaming command-line sampler.

Each new token costs one token's work: the prompt is run once (prefill) into a `DecodeCache`
holding every GPT-2 layer's keys and values, the weight network's keys and the sense vectors of
the tokens seen so far (and the state of a sense edit that reweights alpha, such as the paper's
annealed topic control, `topic.TopicControl`); each decode step then runs the model on the one
new token against that cache. `stream` dispatches one jitted step per token so that each
arrives as soon as it is chosen; `generate` runs the whole loop on the device
(`lax.while_loop`), without a host round trip per token. Both are compiled once per (batch
size, prompt length, length budget).

Prompts of different lengths are left-padded to a common length; each row's position ids count
from its first real token and `attend_BxSxT` hides the padding slots, so a padded row yields the
same tokens as that prompt run alone.

    python -m backpack_jax.generate --checkpoint PATH --prompt "The meaning of life is"
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from backpack_jax import checkpoint, checks, cli
from backpack_jax.config import BackpackConfig
from backpack_jax.decode_cache import DecodeCache
from backpack_jax.edits import SenseEdit, check_edit
from backpack_jax.model import BackpackLM, Params
from backpack_jax.tokenizer import get_tokenizer


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One decode step: the token chosen for every row and the logits it was drawn from."""

    tokens: np.ndarray  # [B] int32
    logits: np.ndarray | None  # [B, V] float32 (the model's, before temperature/filtering)


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `generate`.

    `tokens` holds each prompt, left-padded to the longest with `pad_id`, followed by the new
    tokens. Fewer than `max_new_tokens` columns follow when every row emitted `eos_id` early.
    """

    tokens: np.ndarray  # [B, P + new] int32
    prompt_lengths: np.ndarray  # [B] real (unpadded) prompt lengths
    logits: np.ndarray | None = None  # [B, new, V] float32, when asked
    pad_id: int = 0

    @property
    def new_tokens(self) -> np.ndarray:
        """[B, new]: just the generated part."""
        return self.tokens[:, self.tokens.shape[1] - self.num_new:]

    @property
    def num_new(self) -> int:
        return self.tokens.shape[1] - self.prompt_width

    @property
    def prompt_width(self) -> int:
        return int(self.prompt_lengths.max())

    def sequences(self) -> list[list[int]]:
        """Each row's prompt and new tokens, without the left padding."""
        width = self.prompt_width
        return [row[width - n:].tolist()
                for row, n in zip(self.tokens, self.prompt_lengths, strict=True)]


@flax.struct.dataclass
class _Sampling:
    """The sampling rule as data, so that changing its numbers does not recompile; top_k is a
    shape (the candidates), so each k compiles once."""

    temperature: jax.Array  # float32 (unused when greedy)
    top_p: jax.Array  # float32; 1 = off
    eos_id: jax.Array  # int32; -1 = none
    rng: jax.Array | None
    greedy: bool = flax.struct.field(pytree_node=False)
    top_k: int | None = flax.struct.field(pytree_node=False, default=None)  # None = every token
    nucleus: bool = flax.struct.field(pytree_node=False, default=False)  # top_p was given


def _left_pad(prompt_ids: Any, config: BackpackConfig, max_new_tokens: int, pad_id: int,
              pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validates prompts and left-pads them (to at least `pad_to`): returns ids [B, P] and real
    lengths [B]."""
    if hasattr(prompt_ids, "ndim"):
        if prompt_ids.ndim != 2:
            raise ValueError(f"prompt_ids must be a [batch, seq] array or a list of token-id "
                             f"lists, got an array of shape {tuple(prompt_ids.shape)}")
        rows = list(np.asarray(prompt_ids))
    elif isinstance(prompt_ids, Sequence) and prompt_ids and all(
            isinstance(r, (Sequence, np.ndarray)) and not isinstance(r, str) for r in prompt_ids):
        rows = [np.asarray(r) for r in prompt_ids]
    else:
        raise ValueError("prompt_ids must be a [batch, seq] array or a non-empty list of token-id "
                         "lists (wrap a single prompt as [ids])")
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    for b, row in enumerate(rows):
        if len(row) >= config.n_positions:
            raise ValueError(f"prompt {b} has {len(row)} tokens, leaving no room for new tokens: "
                             f"the model has n_positions={config.n_positions}")
        if len(row) + max_new_tokens > config.n_positions:
            raise ValueError(
                f"prompt {b} has {len(row)} tokens; with max_new_tokens={max_new_tokens} that "
                f"exceeds n_positions={config.n_positions} (at most "
                f"{config.n_positions - len(row)} new tokens fit)")
        checks.validate_token_ids(row.reshape(1, -1), config, what=f"prompt {b}")
    width = int(lengths.max())
    if pad_to is not None:
        if not width <= pad_to <= config.n_positions - max_new_tokens:
            raise ValueError(f"pad_to={pad_to} must be at least the longest prompt ({width}) and "
                             f"leave room for {max_new_tokens} new tokens in "
                             f"n_positions={config.n_positions}")
        width = pad_to
    ids_BxP = np.full((len(rows), width), pad_id, dtype=np.int32)
    for b, row in enumerate(rows):
        ids_BxP[b, width - len(row):] = row
    return ids_BxP, lengths


def _check_sampling(config: BackpackConfig, max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, rng: jax.Array | None,
                    eos_id: int | None) -> _Sampling:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and 0 <= top_k <= config.vocab_size):
        raise ValueError(f"top_k must be an integer in [0, vocab_size={config.vocab_size}] "
                         f"(0 or None = off), got {top_k!r}")
    top_k = top_k or None  # 0 = off, as on the command line and in Hugging Face's generate
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    greedy = temperature == 0
    if not greedy and rng is None:
        raise ValueError(f"sampling (temperature={temperature} > 0) needs an `rng` key")
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside [0, vocab_size={config.vocab_size})")
    return _Sampling(temperature=jnp.float32(temperature if not greedy else 1.0),
                     top_p=jnp.float32(1.0 if top_p is None else top_p),
                     eos_id=jnp.int32(-1 if eos_id is None else eos_id),
                     rng=None if greedy else rng, greedy=greedy, top_k=top_k,
                     nucleus=top_p is not None)


SAMPLE_BLOCK = 256  # tokens per block of `inverse_cdf`'s two-level search


def _first_above(cum: jax.Array, u_B: jax.Array, weights: jax.Array) -> jax.Array:
    """Per row of `cum` (cumulative `weights`, [B, n] each), the first index whose cumulative
    weight exceeds u and whose own weight is positive; the last positive one when rounding
    carries u past the end."""
    positive = weights > 0
    hit = (cum > u_B[:, None]) & positive
    last_B = cum.shape[1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1), last_B)


def inverse_cdf(weights_BxV: jax.Array, u_B: jax.Array) -> jax.Array:
    """Per row, the token at which the cumulative weight passes u * the row's total (u in
    [0, 1)): the sums of blocks of SAMPLE_BLOCK tokens locate the block, then the tokens within
    it, so no cumulative sum runs over the whole vocabulary. Zero weights are never chosen."""
    B, V = weights_BxV.shape
    width = SAMPLE_BLOCK
    n_blocks = -(-V // width)
    blocks = jnp.pad(weights_BxV, ((0, 0), (0, n_blocks * width - V))).reshape(B, n_blocks, width)
    block_sums = blocks.sum(-1)
    cum_sums = jnp.cumsum(block_sums, axis=-1)
    target_B = u_B * cum_sums[:, -1]
    block_B = _first_above(cum_sums, target_B, block_sums)
    before_B = jnp.take_along_axis(cum_sums - block_sums, block_B[:, None], axis=1)[:, 0]
    chosen = jnp.take_along_axis(blocks, block_B[:, None, None], axis=1)[:, 0]
    within_B = _first_above(jnp.cumsum(chosen, axis=-1), target_B - before_B, chosen)
    return (block_B * width + within_B).astype(jnp.int32)


def _draw(key: jax.Array, logits_BxV: jax.Array) -> jax.Array:
    """One token per row from softmax(logits), by the inverse CDF at one uniform per row.

    `jax.random.categorical` draws a Gumbel variate for every logit (V random numbers and two
    logarithms per row and step), which on a CPU costs tens of milliseconds per step at B=32.
    The distribution is the same; the draws for a given key differ from categorical's.
    """
    weights_BxV = jnp.exp(logits_BxV - logits_BxV.max(axis=-1, keepdims=True))
    return inverse_cdf(weights_BxV, jax.random.uniform(key, logits_BxV.shape[:1]))


def _most_likely(logits_BxV: jax.Array) -> jax.Array:
    """jnp.argmax (the first of equal maxima) as a max and a min over the matching indices: two
    plain reductions, which XLA:CPU runs a few times faster than argmax's paired reduction."""
    V = logits_BxV.shape[-1]
    best_Bx1 = logits_BxV.max(axis=-1, keepdims=True)
    matches_BxV = jnp.where(logits_BxV == best_Bx1, jnp.arange(V, dtype=jnp.int32), V)
    return jnp.minimum(matches_BxV.min(axis=-1), V - 1)  # V - 1 only for a row of NaNs


def _choose(logits_BxV: jax.Array, done_B: jax.Array, step: jax.Array | int,
            sampling: _Sampling) -> tuple[jax.Array, jax.Array]:
    """Picks the next token of every row (temperature, then top-k, then top-p) and updates done."""
    if sampling.greedy:
        next_B = _most_likely(logits_BxV)
    else:
        logits_BxV = logits_BxV / sampling.temperature
        key = jax.random.fold_in(sampling.rng, step)
        if sampling.top_k is None and not sampling.nucleus:
            next_B = _draw(key, logits_BxV)
        else:
            # The candidates, most likely first: the k best (a partial sort), else all of them.
            k = logits_BxV.shape[-1] if sampling.top_k is None else sampling.top_k
            cand_BxQ, ids_BxQ = jax.lax.top_k(logits_BxV, k)
            # Keep the most likely until their mass reaches top_p (always at least one).
            probs_BxQ = jax.nn.softmax(cand_BxQ, axis=-1)
            keep_BxQ = (jnp.cumsum(probs_BxQ, axis=-1) - probs_BxQ < sampling.top_p) | (
                sampling.top_p >= 1.0)
            pick_B = _draw(key, jnp.where(keep_BxQ, cand_BxQ, -jnp.inf))
            next_B = jnp.take_along_axis(ids_BxQ, pick_B[:, None], axis=-1)[:, 0]
    next_B = jnp.where(done_B, sampling.eos_id, next_B.astype(jnp.int32))
    return next_B, done_B | (next_B == sampling.eos_id)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "length"))
def _prefill(params, ids_BxP, start_B, sense_edit, sampling, *, config, dtype, length):
    """Runs the prompts into a fresh cache of `length` slots and picks the first new token."""
    B, P = ids_BxP.shape
    s_P, t_T = jnp.arange(P), jnp.arange(length)
    attend_BxPxT = (t_T[None, None] <= s_P[None, :, None]) & (
        t_T[None, None] >= start_B[:, None, None])
    pos_BxP = jnp.maximum(s_P[None] - start_B[:, None], 0)
    out, cache = BackpackLM(config, dtype).apply(
        {"params": params}, ids_BxP, pos_BxP, attend_BxPxT,
        cache=DecodeCache.zeros(config, B, length, dtype), cache_index=0, sense_edit=sense_edit)
    logits_BxV = out.logits[:, -1]
    next_B, done_B = _choose(logits_BxV, jnp.zeros(B, bool), 0, sampling)
    return cache, next_B, done_B, logits_BxV


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _decode_step(params, cache, token_B, index, start_B, done_B, step, sense_edit, sampling, *,
                 config, dtype):
    """Feeds one token per row at cache slot `index` and picks the next one."""
    t_T = jnp.arange(cache.length)
    attend_Bx1xT = ((t_T[None] <= index) & (t_T[None] >= start_B[:, None]))[:, None]
    pos_Bx1 = (index - start_B)[:, None]
    out, cache = BackpackLM(config, dtype).apply(
        {"params": params}, token_B[:, None], pos_Bx1, attend_Bx1xT, cache=cache,
        cache_index=index, sense_edit=sense_edit)
    logits_BxV = out.logits[:, 0]
    next_B, done_B = _choose(logits_BxV, done_B, step, sampling)
    return cache, next_B, done_B, logits_BxV


@functools.partial(jax.jit, static_argnames=("config", "dtype", "max_new_tokens",
                                             "return_logits"))
def _generate_loop(params, ids_BxP, start_B, sense_edit, sampling, *, config, dtype,
                   max_new_tokens, return_logits):
    """Prefill and every decode step in one computation; returns (tokens [B, N], how many
    were produced (fewer than N when every row reached eos), logits [B, N, V] or None)."""
    B, P = ids_BxP.shape
    N = max_new_tokens
    cache, next_B, done_B, logits_BxV = _prefill(
        params, ids_BxP, start_B, sense_edit, sampling, config=config, dtype=dtype,
        length=P + N - 1)
    tokens_BxN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(next_B)
    logits_BxNxV = None
    if return_logits:
        logits_BxNxV = jnp.zeros((B, N, config.vocab_size), jnp.float32).at[:, 0].set(logits_BxV)

    def more(carry):
        step, _, _, done_B, _, _ = carry
        return (step < N) & ~((sampling.eos_id >= 0) & done_B.all())

    def decode(carry):
        step, cache, next_B, done_B, tokens_BxN, logits_BxNxV = carry
        cache, next_B, done_B, logits_BxV = _decode_step(
            params, cache, next_B, P + step - 1, start_B, done_B, step, sense_edit, sampling,
            config=config, dtype=dtype)
        tokens_BxN = tokens_BxN.at[:, step].set(next_B)
        if logits_BxNxV is not None:
            logits_BxNxV = logits_BxNxV.at[:, step].set(logits_BxV)
        return step + 1, cache, next_B, done_B, tokens_BxN, logits_BxNxV

    step, _, _, _, tokens_BxN, logits_BxNxV = jax.lax.while_loop(
        more, decode, (jnp.int32(1), cache, next_B, done_B, tokens_BxN, logits_BxNxV))
    return tokens_BxN, step, logits_BxNxV


def _prepare(config, prompt_ids, max_new_tokens, temperature, top_k, top_p, rng, eos_id,
             pad_to):
    sampling = _check_sampling(config, max_new_tokens, temperature, top_k, top_p, rng, eos_id)
    pad_id = config.eos_token_id if eos_id is None else eos_id
    ids_BxP, lengths_B = _left_pad(prompt_ids, config, max_new_tokens, pad_id, pad_to)
    return sampling, pad_id, ids_BxP, lengths_B


def _steps(params, config, ids_BxP, lengths_B, max_new_tokens, sampling, return_logits,
           sense_edit, dtype) -> Iterator[StepOutput]:
    P = ids_BxP.shape[1]
    start_B = jnp.asarray(P - lengths_B, jnp.int32)
    # The last new token is never fed back, so it needs no cache slot.
    cache, next_B, done_B, logits_BxV = _prefill(
        params, jnp.asarray(ids_BxP), start_B, sense_edit, sampling, config=config, dtype=dtype,
        length=P + max_new_tokens - 1)
    stops = int(sampling.eos_id) >= 0
    for step in range(1, max_new_tokens + 1):
        yield StepOutput(np.asarray(next_B),
                         np.asarray(logits_BxV, np.float32) if return_logits else None)
        if step == max_new_tokens or (stops and bool(done_B.all())):
            return
        cache, next_B, done_B, logits_BxV = _decode_step(
            params, cache, next_B, jnp.int32(P + step - 1), start_B, done_B, jnp.int32(step),
            sense_edit, sampling, config=config, dtype=dtype)


def stream(params: Params, config: BackpackConfig, prompt_ids: Any, max_new_tokens: int, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           rng: jax.Array | None = None, eos_id: int | None = None, return_logits: bool = False,
           sense_edit: SenseEdit | None = None, dtype: Any = jnp.float32,
           pad_to: int | None = None) -> Iterator[StepOutput]:
    """Yields one `StepOutput` per new token as soon as it is chosen (see `generate`).

    Arguments are validated when this is called, not when iteration starts.
    """
    check_edit(sense_edit)
    sampling, _, ids_BxP, lengths_B = _prepare(config, prompt_ids, max_new_tokens, temperature,
                                               top_k, top_p, rng, eos_id, pad_to)
    return _steps(params, config, ids_BxP, lengths_B, max_new_tokens, sampling, return_logits,
                  sense_edit, dtype)


def generate(params: Params, config: BackpackConfig, prompt_ids: Any, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, eos_id: int | None = None,
             return_logits: bool = False, sense_edit: SenseEdit | None = None,
             dtype: Any = jnp.float32, pad_to: int | None = None) -> Generation:
    """Continues each prompt by up to `max_new_tokens` tokens with a KV/sense cache.

    Args:
      prompt_ids: a [B, S] int array, or a list of B token-id lists of any lengths.
      temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / T).
      top_k / top_p: when sampling, keep only the k most likely tokens / the smallest most-likely
        set whose probability reaches top_p (applied after temperature, top-k first); top_k 0 or
        None keeps every token.
      rng: a `jax.random` key; required when sampling. The same key gives the same samples.
      eos_id: a row that emits it keeps emitting it; decoding stops once every row has.
      return_logits: also return the model's logits [B, new, V] each new token was drawn from.
      sense_edit: an intervention on sense vectors (see `backpack_jax.senses`); the edited
        senses are also the ones cached for the prefix.
      dtype: compute dtype (LayerNorm, softmax and logits stay float32).
      pad_to: left-pad the prompts to this width (>= the longest): a caller with prompts of
        many lengths compiles once per width it picks instead of once per length. The padding
        is masked, so the tokens are the same.
    """
    check_edit(sense_edit)
    sampling, pad_id, ids_BxP, lengths_B = _prepare(config, prompt_ids, max_new_tokens,
                                                    temperature, top_k, top_p, rng, eos_id,
                                                    pad_to)
    P = ids_BxP.shape[1]
    tokens_BxN, produced, logits_BxNxV = _generate_loop(
        params, jnp.asarray(ids_BxP), jnp.asarray(P - lengths_B, jnp.int32), sense_edit,
        sampling, config=config, dtype=dtype, max_new_tokens=max_new_tokens,
        return_logits=return_logits)
    produced = int(produced)
    new_BxN = np.asarray(tokens_BxN)[:, :produced]
    logits = np.asarray(logits_BxNxV)[:, :produced] if return_logits else None
    return Generation(tokens=np.concatenate([ids_BxP, new_BxN], axis=1),
                      prompt_lengths=lengths_B, logits=logits, pad_id=pad_id)


class TextStream:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences.

    A token can end inside a multi-byte character, which decodes to trailing U+FFFD until the
    rest arrives; everything before such a tail is final, so only the tail is held back.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        if token >= self._tokenizer.n_vocab:  # The model's padded vocabulary rows.
            return self.flush() + f"<|{token}|>"
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        stable = max(len(text.rstrip("\ufffd")), self._emitted)
        out, self._emitted = text[self._emitted:stable], stable
        return out

    def flush(self) -> str:
        out = self._tokenizer.decode(self._ids)[self._emitted:]
        self._ids, self._emitted = [], 0
        return out


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("backpack_jax.generate",
                   "Sample from a Backpack LM checkpoint, streaming tokens to stdout.", json=False)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max_new_tokens", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 = off")
    p.add_argument("--top_p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sample i uses fold_in(PRNGKey(seed), i)")
    p.add_argument("--num_samples", type=int, default=1, help="continuations to print")
    p.add_argument("--ignore_eos", action="store_true", help="keep going after <|endoftext|>")
    cli.run(p, argv, _sample)


def _sample(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    params, config = checkpoint.load(args.checkpoint)
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt is empty after tokenization")
    # The flags' "off" values (top_k 0, top_p 1) are the API's too; the API validates the rest.
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_id=None if args.ignore_eos else tokenizer.eot_id)
    for i in range(args.num_samples):
        steps = stream(params, config, [prompt], args.max_new_tokens,
                       rng=jax.random.fold_in(jax.random.PRNGKey(args.seed), i), **options)
        if args.num_samples > 1:
            print(f"\n===== sample {i} =====", flush=True)
        text = TextStream(tokenizer)
        sys.stdout.write(args.prompt)
        for step in steps:
            token = int(step.tokens[0])
            if token == options["eos_id"]:
                break
            sys.stdout.write(text.push(token))
            sys.stdout.flush()
        sys.stdout.write(text.flush() + "\n")


if __name__ == "__main__":
    main()
