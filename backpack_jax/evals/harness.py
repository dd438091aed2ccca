"""lm-evaluation-harness (paper Table 2): the model type `backpack-jax` for lm-eval 0.4.x.

    python -m backpack_jax.evals.harness --model backpack-jax --model_args checkpoint=DIR \
        --tasks lambada_openai,wikitext --batch_size 16 [--output_path OUT]

lm-eval finds model types only in its own registry: its `lm_eval` command loads no plugins, so
it cannot see this one. This module registers `backpack-jax` when it is imported, and run as a
command it hands every argument to lm-eval's own command line (the same flags, tables and
`--output_path` files). From Python, import it and call
`lm_eval.simple_evaluate(model="backpack-jax", model_args="checkpoint=DIR", ...)`.

model_args: `checkpoint` (anything `backpack_jax.checkpoint.load` reads), and optionally
`batch_size`, `max_length` (default the model's n_positions, 512 for backpack-gpt2),
`max_gen_toks` (256), `dtype` (float32 or bfloat16) and `seed` (for sampled generation).
Values in model_args win over lm-eval's --batch_size, which it always passes (default 1).

Every log-likelihood request becomes a token sequence of at most max_length + 1 tokens whose
last n tokens are scored: a context and continuation (the context truncated from the left when
too long), or one window of a document (`rolling_windows`). `score` runs them in batches of
equal-length-ish rows, longest first, padded on the right to `batching.bucket` widths so that
only a handful of shapes compile; each batch is one jitted call that returns only the sums.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from backpack_jax import batching, cli, generate, model
from backpack_jax.checkpoint import load
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer

_PURPOSE = "the lm-evaluation-harness model (backpack_jax.evals.harness)"
try:
    lm_model = cli.require("lm_eval.api.model", _PURPOSE)
    lm_registry = cli.require("lm_eval.api.registry", _PURPOSE)
    lm_utils = cli.require("lm_eval.utils", _PURPOSE)
    # lm-eval fills its registry with its own models only while the registry is empty.
    cli.require("lm_eval.models", _PURPOSE)
except cli.MissingExtraError as e:
    if __name__ == "__main__":
        cli.fail(e)
    raise

MODEL_NAME = "backpack-jax"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# A sequence of token ids and how many of its last tokens are scored (each from the ones before).
Scored = tuple[list[int], int]


def rolling_windows(ids: Sequence[int], max_length: int, prefix_id: int) -> list[Scored]:
    """Disjoint windows that score every token of a document exactly once, as lm-eval's
    rolling log-likelihood does: the first token is predicted from `prefix_id`, each window
    scores up to `max_length` new tokens, and the last one is given as much earlier context as
    fits in `max_length` inputs."""
    full = [prefix_id, *ids]  # full[j + 1] = ids[j]: input full[j] predicts it.
    windows = []
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        windows.append((full[max(0, end - max_length):end + 1], end - start))
    return windows


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _score_batch(params: Params, ids_BxS: jax.Array, scored_BxS: jax.Array, *,
                 config: BackpackConfig, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Sum of log p(ids[s + 1] | ids[:s + 1]) over the scored positions s of each row, and
    whether each scored token was the model's most likely one. The last column is a target
    only."""
    inputs_BxS, targets_BxS = ids_BxS[:, :-1], ids_BxS[:, 1:]
    logits_BxSxV = model.apply(params, inputs_BxS, config, dtype=dtype).logits.astype(
        jnp.float32)
    target_logp_BxS = (jnp.take_along_axis(logits_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]
                       - jax.nn.logsumexp(logits_BxSxV, axis=-1))
    greedy_BxS = jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS
    scored_BxS = scored_BxS[:, 1:]
    return (jnp.where(scored_BxS, target_logp_BxS, 0.0).sum(axis=-1),
            (greedy_BxS | ~scored_BxS).all(axis=-1))


def score(params: Params, config: BackpackConfig, sequences: Sequence[Scored], *,
          batch_size: int, max_length: int | None = None, dtype: Any = jnp.float32,
          desc: str = "scoring", disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, all greedy) of the scored tokens of each sequence.

    Sequences run longest first in batches of `batch_size` rows (`batching.windows`: the last
    batch is shifted back, so every call has the same batch size), right-padded to
    `batching.bucket` widths.
    """
    max_length = max_length or config.n_positions
    for i, (ids, n) in enumerate(sequences):
        if not 0 <= n < len(ids) <= max_length + 1:
            raise ValueError(f"sequence {i} has {len(ids)} tokens with {n} scored: it needs "
                             f"1 to {max_length + 1} tokens and fewer scored than that")
        if not 0 <= min(ids) <= max(ids) < config.vocab_size:
            raise ValueError(f"sequence {i} holds token ids outside [0, vocab_size="
                             f"{config.vocab_size}): {min(ids)} to {max(ids)}")
    if not sequences:
        return []
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=disable_tqdm) as bar:
        for w in batching.windows(len(order), batch_size):
            batch = order[w.start:w.stop]
            width = batching.bucket(len(sequences[batch[0]][0]) - 1, max_length) + 1
            ids_BxS = np.full((len(batch), width), config.eos_token_id, np.int32)
            scored_BxS = np.zeros((len(batch), width), bool)
            for b, i in enumerate(batch):
                ids, n = sequences[i]
                ids_BxS[b, :len(ids)] = ids
                scored_BxS[b, len(ids) - n:len(ids)] = True
            logprob_B, greedy_B = map(np.asarray, _score_batch(
                params, jnp.asarray(ids_BxS), jnp.asarray(scored_BxS), config=config,
                dtype=dtype))
            for b in range(w.new, len(batch)):
                results[batch[b]] = (float(logprob_B[b]), bool(greedy_B[b]))
            bar.update(len(batch) - w.new)
    return results


def _stop_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[:min((j for j in (text.find(s) for s in until if s) if j >= 0),
                     default=len(text))]


@lm_registry.register_model(MODEL_NAME)
class BackpackHarnessLM(lm_model.LM):
    """A Backpack checkpoint as an lm-eval model: log-likelihoods, rolling log-likelihoods for
    perplexity, and generation until a stop string (on `backpack_jax.generate`)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 dtype: str = "float32", seed: int = 0, max_batch_size: int | None = None,
                 device: str | None = None) -> None:
        """`max_batch_size` is the batch size of `batch_size=auto`; `device` is lm-eval's
        torch device, which JAX does not use (it runs on its default backend)."""
        super().__init__()
        if checkpoint is None:
            raise ValueError(f"the {MODEL_NAME} model needs model_args checkpoint=DIR")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose from {sorted(DTYPES)}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or 16
        self.batch_size = int(batch_size)
        self.params, self.config = load(str(checkpoint))
        self.max_length = int(max_length or self.config.n_positions)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.max_length <= self.config.n_positions:
            raise ValueError(f"max_length={self.max_length} must be in [1, n_positions="
                             f"{self.config.n_positions}]")
        self.dtype = DTYPES[dtype]
        self.seed = int(seed)
        self.tokenizer = get_tokenizer()
        self.eot_id = self.tokenizer.eot_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict | None = None) -> BackpackHarnessLM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict | None = None) -> BackpackHarnessLM:
        """model_args win over the harness's own flags (--batch_size, --device), which it
        passes even when the user did not set them."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        if unknown := sorted(set(arg_dict) - known):
            raise ValueError(f"unknown model_args {unknown} for {MODEL_NAME}; it takes "
                             f"{sorted(known - {'device', 'max_batch_size'})}")
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k in known}
        return cls(**{**extra, **arg_dict})

    # ------------------------------------------------------------------------ log-likelihood

    def encode_pair(self, context: str, continuation: str) -> Scored:
        """Context and continuation ids as one scored sequence, lm-eval's way: whitespace ending
        the context moves to the continuation, the whole text is encoded once and split where the
        context's own encoding ends, an empty context becomes <|endoftext|>, and a sequence
        longer than max_length + 1 loses tokens on the left (the continuation is kept)."""
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        context_ids = self.tokenizer.encode(context) if context else [self.eot_id]
        whole = self.tokenizer.encode(context + continuation)
        continuation_ids = whole[len(context_ids):] if context else whole
        if len(continuation_ids) > self.max_length:
            raise ValueError(f"continuation {continuation[:40]!r}... is {len(continuation_ids)} "
                             f"tokens, more than max_length={self.max_length}")
        ids = (context_ids + continuation_ids)[-(self.max_length + 1):]
        return ids, len(continuation_ids)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation)."""
        pairs = [req.args for req in requests]
        results = self._score([self.encode_pair(*pair) for pair in pairs], "loglikelihood",
                              disable_tqdm)
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """log p(text) of each whole text, from `rolling_windows` of max_length tokens."""
        texts = [req.args[0] for req in requests]
        windows = [rolling_windows(ids, self.max_length, self.eot_id)
                   for ids in self.tokenizer.encode_batch(texts)]
        flat = self._score([w for doc in windows for w in doc], "loglikelihood_rolling",
                           disable_tqdm)
        results, used = [], 0
        for text, doc in zip(texts, windows, strict=True):
            results.append(sum(logprob for logprob, _ in flat[used:used + len(doc)]))
            used += len(doc)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    def _score(self, sequences: list[Scored], desc: str, disable_tqdm: bool
               ) -> list[tuple[float, bool]]:
        return score(self.params, self.config, sequences, batch_size=self.batch_size,
                     max_length=self.max_length, dtype=self.dtype, desc=desc,
                     disable_tqdm=disable_tqdm)

    # ---------------------------------------------------------------------------- generation

    def _generation_options(self, gen_kwargs: dict[str, Any]
                            ) -> tuple[list[str], int, dict[str, Any]]:
        """(stop strings, max new tokens, sampling arguments of `generate.generate`)."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", None)
        temperature = kwargs.pop("temperature", None)
        sample = bool(do_sample) if do_sample is not None else bool(temperature)
        sampling = ({"temperature": 1.0 if temperature is None else float(temperature),
                     "top_k": kwargs.pop("top_k", None), "top_p": kwargs.pop("top_p", None)}
                    if sample else {"temperature": 0.0})
        for key in ("top_k", "top_p"):  # Ignored by greedy decoding, as in transformers.
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"generation arguments {sorted(kwargs)} are not supported; "
                             "use until, max_gen_toks, do_sample, temperature, top_k, top_p")
        if not 1 <= max_gen_toks < self.max_length:
            raise ValueError(f"max_gen_toks={max_gen_toks} must be in [1, max_length="
                             f"{self.max_length})")
        return until, max_gen_toks, sampling

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continues each context until a stop string, <|endoftext|> or max_gen_toks tokens.

        Requests with the same generation arguments run together, longest context first, in
        batches (`batching.windows`) left-padded to `batching.bucket` widths through the cached
        `generate.generate`, so few shapes compile; a context longer than
        max_length - max_gen_toks loses tokens on the left. The stop strings are cut from the
        decoded text (decoding stops early only once every row has emitted <|endoftext|>).
        """
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(args)
        calls = 0
        with tqdm(total=len(args), desc="generate_until", unit="req",
                  disable=disable_tqdm) as bar:
            for indices in groups.values():
                until, max_gen_toks, sampling = self._generation_options(args[indices[0]][1])
                room = self.max_length - max_gen_toks
                prompts = {i: (self.tokenizer.encode(args[i][0]) or [self.eot_id])[-room:]
                           for i in indices}
                indices = sorted(indices, key=lambda i: -len(prompts[i]))
                for w in batching.windows(len(indices), self.batch_size):
                    batch = indices[w.start:w.stop]
                    rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), calls)
                    width = batching.bucket(len(prompts[batch[0]]), room)
                    out = generate.generate(self.params, self.config,
                                            [prompts[i] for i in batch], max_gen_toks,
                                            eos_id=self.eot_id, dtype=self.dtype, pad_to=width,
                                            rng=rng if sampling["temperature"] else None,
                                            **sampling)
                    calls += 1
                    for i, row in list(zip(batch, out.new_tokens.tolist(), strict=True))[w.fresh]:
                        row = row[:row.index(self.eot_id)] if self.eot_id in row else row
                        text = self.tokenizer.decode([t for t in row
                                                      if t < self.tokenizer.n_vocab])
                        results[i] = _stop_at(text, until)
                        self.cache_hook.add_partial("generate_until", args[i], results[i])
                    bar.update(len(batch) - w.new)
        return results


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with `backpack-jax` registered; a user error (a bad argument or
    checkpoint, a dataset that cannot be found offline) is one `error: ...` line (`cli.fail`).
    lm-eval parses the flags itself, so its own parsing errors keep argparse's format."""
    lm_cli = cli.require("lm_eval.__main__", _PURPOSE)
    sys.argv = ["python -m backpack_jax.evals.harness", *(sys.argv[1:] if argv is None else argv)]
    try:
        lm_cli.cli_evaluate()
    except (*cli.USER_ERRORS, ConnectionError) as e:
        cli.fail(e)


if __name__ == "__main__":
    main()
