"""GPT-2 tokenizer: pinned encodings, exact round trips, offline construction, file checks."""

import json
import random

import pytest
import tiktoken.load

from backpack_jax import tokenizer as tokenizer_lib
from backpack_jax.tokenizer import EOT_ID, N_VOCAB, Tokenizer, get_tokenizer

# Ids cross-checked with transformers' GPT2Tokenizer built from the same local files.
KNOWN = {
    "Hello world": [15496, 995],
    " GPT-2 is great!\n\n": [402, 11571, 12, 17, 318, 1049, 0, 628],
    "I'm     here": [40, 1101, 220, 220, 220, 220, 994],
    "日本語 🎉 naïve": [33768, 98, 17312, 105, 45739, 252, 12520, 236, 231, 41492],
    "a\x00b\x1f\r\n  \t": [64, 188, 65, 219, 201, 198, 220, 220, 197],
}

# Code point ranges for random text: ASCII (controls included), Latin-1, combining marks, CJK,
# emoji, and the top of the Basic Multilingual Plane; surrogates are not text and are left out.
_RANGES = [(0x00, 0x7F), (0x80, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
           (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
# Multi-character pieces that exercise the pre-tokenizer's contractions and whitespace rules.
_PIECES = [" ", "  ", "\n", "\t", "'s", "'ll", " the", "<|endoftext|>"]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randrange(0, 60)):
            if rng.random() < 0.3:
                chars.append(rng.choice(_PIECES))
            else:
                lo, hi = rng.choice(_RANGES)
                chars.append(chr(rng.randint(lo, hi)))
        texts.append("".join(chars))
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def test_vocabulary_and_end_of_text(tok):
    assert (tok.n_vocab, tok.eot_id) == (N_VOCAB, EOT_ID) == (50257, 50256)
    assert get_tokenizer() is tok
    assert tok.decode([EOT_ID]) == "<|endoftext|>"


@pytest.mark.parametrize("text", sorted(KNOWN))
def test_known_encodings(tok, text):
    assert tok.encode(text) == KNOWN[text]


def test_end_of_text_is_literal_unless_allowed(tok):
    text = "a<|endoftext|>b"
    assert EOT_ID not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [64, EOT_ID, 65]
    assert tok.encode(text, allowed_special="all") == [64, EOT_ID, 65]


def test_round_trip_on_random_unicode(tok):
    for text in _random_texts(300, seed=0):
        ids = tok.encode(text)
        assert all(0 <= i < EOT_ID for i in ids)
        assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = _random_texts(20, seed=1)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(["<|endoftext|>"], allowed_special="all") == [[EOT_ID]]


def test_matches_transformers_gpt2_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    vocab = json.loads(tokenizer_lib._data_file("encoder.json").read_text(encoding="utf-8"))
    merge_lines = tokenizer_lib._data_file("vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in merge_lines[1:] if line]
    reference = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    for text in _random_texts(200, seed=2):
        text = text.replace("<|endoftext|>", "")  # transformers always treats it as special
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text


def test_built_without_tiktoken_downloads(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tiktoken tried to fetch a file")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    assert Tokenizer().encode("Hello world") == [15496, 995]


def test_file_with_wrong_hash_is_refused(monkeypatch):
    monkeypatch.setitem(tokenizer_lib._SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(RuntimeError, match="vocab.bpe has sha256 1ce16647"):
        Tokenizer()


def test_word_ids_are_the_word_inside_a_sentence(tok):
    assert tokenizer_lib.word_ids("nurse", tok) == tok.encode(" nurse") == [15849]
    assert tokenizer_lib.word_ids("nurse", tok, leading_space=False) == tok.encode("nurse")
    assert tokenizer_lib.word_ids(" nurse", tok) == [15849]  # a given space is kept, not doubled
    with pytest.raises(ValueError, match="the word is empty"):
        tokenizer_lib.word_ids("  ", tok)


def test_single_token_is_the_one_check_with_one_message(tok):
    assert tokenizer_lib.single_token("nurse", tok) == 15849
    assert tokenizer_lib.single_token(" she", tok, "--target", leading_space=False) == 673
    with pytest.raises(ValueError) as e:
        tokenizer_lib.single_token("diaries", tok, "a word of a topic's bag")
    assert str(e.value) == ("' diaries' is 2 tokens (' di', 'aries'); a word of a topic's bag "
                            "must be one token")
    with pytest.raises(ValueError, match=r"^'nurse' is 2 tokens \('n', 'urse'\); the word must"):
        tokenizer_lib.single_token("nurse", tok, leading_space=False)
