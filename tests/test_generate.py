"""Cached generation against the full forward pass, the PyTorch reference and itself (padding,
seeds, filters, eos), plus its errors and the streaming CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backpack_jax import checkpoint, generate, interventions, model
from backpack_jax.config import get_model_config
from backpack_jax.tokenizer import get_tokenizer
from convert import from_state_dict
from tests.torch_reference import random_reference

CONFIG = get_model_config("tiny").replace(vocab_size=512, bos_token_id=0, eos_token_id=0)
PROMPTS = [[5, 17, 300, 42, 9, 101, 7], [250, 3], [77, 410, 12, 64]]
N_NEW = 10  # one length budget for every batch of PROMPTS: compiled once


@pytest.fixture(scope="module")
def reference():
    """Seed 1: the first prompt's next-token distribution has the several likely tokens that the
    sampling test needs."""
    return random_reference(CONFIG, seed=1)


@pytest.fixture(scope="module")
def params(reference):
    return from_state_dict(reference.tensors, CONFIG)


def relative_error(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def assert_logits_match_full_forward(params, out, sense_edit=None):
    """Step j's logits must be the full forward pass's last logits on prompt + j new tokens."""
    assert out.logits.shape == (len(PROMPTS), out.num_new, CONFIG.vocab_size)
    # The model is causal, so position n+j-1 of one pass over a whole row (right-padded to a
    # common length) sees exactly the prefix of length n+j.
    rows = [seq[:-1] for seq in out.sequences()]
    width = max(map(len, rows))
    full = model.apply(params, np.array([r + [0] * (width - len(r)) for r in rows]), CONFIG,
                       sense_edit=sense_edit).logits
    for b, n in enumerate(out.prompt_lengths):
        assert relative_error(out.logits[b], full[b, n - 1:n - 1 + out.num_new]) < 1e-4
    prefix = model.apply(params, np.array([out.sequences()[1][:4]]), CONFIG,
                         sense_edit=sense_edit).logits[0, -1]
    assert relative_error(out.logits[1, 4 - out.prompt_lengths[1]], prefix) < 1e-4


def test_cached_logits_equal_full_forward_on_ragged_batch(params):
    out = generate.generate(params, CONFIG, PROMPTS, N_NEW, return_logits=True)
    assert out.tokens.shape == (3, 7 + N_NEW)
    assert out.tokens[1, :5].tolist() == [CONFIG.eos_token_id] * 5  # left padding
    np.testing.assert_array_equal(out.new_tokens, out.logits.argmax(-1))
    assert_logits_match_full_forward(params, out)


def test_generation_honours_sense_edit(params):
    edit = interventions.compose(
        interventions.scale_senses(CONFIG, {17: {0: 4.0, 3: -1.0}, 250: {1: 0.0}}),
        interventions.replace_senses(CONFIG, {42: {2: np.linspace(-3, 3, CONFIG.n_embd)}}))
    out = generate.generate(params, CONFIG, PROMPTS, N_NEW, return_logits=True, sense_edit=edit)
    plain = generate.generate(params, CONFIG, PROMPTS, N_NEW, return_logits=True)
    assert relative_error(out.logits[:, 0], plain.logits[:, 0]) > 1e-2  # the edit matters
    assert_logits_match_full_forward(params, out, sense_edit=edit)


def test_padded_rows_give_the_same_tokens_as_each_prompt_alone(params):
    batch = generate.generate(params, CONFIG, PROMPTS, N_NEW, return_logits=True)
    for b, prompt in enumerate(PROMPTS):
        alone = generate.generate(params, CONFIG, [prompt], N_NEW, return_logits=True)
        np.testing.assert_array_equal(alone.new_tokens[0], batch.new_tokens[b])
        assert relative_error(alone.logits[0], batch.logits[b]) < 1e-5


def test_greedy_tokens_equal_pytorch_reference_greedy_loop(params, reference):
    out = generate.generate(params, CONFIG, PROMPTS, N_NEW)
    for b, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(N_NEW):
                logits, _ = reference(ids)
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out.sequences()[b] == ids[0].tolist()


def test_sampling_is_reproducible_and_filters_as_asked(params):
    def sample(seed, **kw):
        return generate.generate(params, CONFIG, PROMPTS, N_NEW, temperature=1.0,
                                 return_logits=True, rng=jax.random.PRNGKey(seed), **kw)

    first, again, other = sample(0), sample(0), sample(1)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(sample(0, top_k=0).tokens, first.tokens)  # 0 = off
    assert (first.tokens != other.tokens).any()
    greedy = generate.generate(params, CONFIG, PROMPTS, N_NEW).tokens
    np.testing.assert_array_equal(sample(5, top_k=1).tokens, greedy)
    np.testing.assert_array_equal(sample(5, top_p=1e-6).tokens, greedy)
    assert (first.tokens != greedy).any()

    top_k = sample(2, top_k=5)
    rank = (top_k.logits > np.take_along_axis(top_k.logits, top_k.new_tokens[..., None], -1)
            ).sum(-1)
    assert rank.max() < 5 and rank.max() > 0
    top_p = sample(2, top_p=0.5)
    probs = jax.nn.softmax(top_p.logits, -1)
    chosen = np.take_along_axis(np.asarray(probs), top_p.new_tokens[..., None], -1)[..., 0]
    mass_above = np.where(probs > chosen[..., None], probs, 0).sum(-1)
    assert mass_above.max() < 0.5 and mass_above.max() > 0


def _filtered_probs(logits_V, temperature, top_k=None, top_p=None):
    """The distribution sampling should draw from, computed directly: softmax at the
    temperature, the top_k likeliest renormalised, then the likeliest whose mass before them is
    below top_p."""
    z = logits_V.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")[:top_k or len(z)]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    if top_p is not None:
        p = np.where(np.cumsum(p) - p < top_p, p, 0.0)
        p /= p.sum()
    out = np.zeros_like(z)
    out[order] = p
    return out


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.9, top_k=6),
                                     dict(temperature=1.2, top_p=0.5),
                                     dict(temperature=1.5, top_k=12, top_p=0.6)])
def test_samples_follow_the_filtered_distribution(params, options):
    """4,000 rows with one prompt draw independent first tokens: their frequencies must match
    the filtered softmax of the model's logits."""
    n = 4000
    out = generate.generate(params, CONFIG, [PROMPTS[0]] * n, 1, return_logits=True,
                            rng=jax.random.PRNGKey(11), **options)
    want = _filtered_probs(np.asarray(out.logits[0, 0]), **options)
    got = np.bincount(out.new_tokens[:, 0], minlength=CONFIG.vocab_size) / n
    assert (want > 0.05).sum() >= 3, "the test needs a few likely tokens to be meaningful"
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want)), "a filtered token was drawn"
    np.testing.assert_allclose(got, want, atol=0.03)  # 4 standard errors at p = 0.5


def test_most_likely_is_argmax_with_ties_to_the_first():
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(16, 1000)).astype(np.float32)  # many tied maxima
    logits[3] = -np.inf
    logits[3, 7] = 0.0
    np.testing.assert_array_equal(generate._most_likely(jnp.asarray(logits)),
                                  np.argmax(logits, axis=-1))


def test_inverse_cdf_finds_the_token_whose_cumulative_weight_passes_u():
    """Against numpy's search of the float64 cumulative weights, over several blocks, with
    zero weights (filtered tokens) that must never be chosen, even at u = 0 and u near 1."""
    rng = np.random.default_rng(0)
    V = 3 * generate.SAMPLE_BLOCK + 17
    weights = rng.gamma(0.3, size=(64, V)).astype(np.float32)
    weights[rng.random((64, V)) < 0.3] = 0.0
    weights[:, :5] = 0.0  # the first tokens are filtered: u = 0 must skip them
    weights[:, -40:] = 0.0  # so are the last: u near 1 must not run onto them
    u = rng.random(64).astype(np.float32)
    u[:2] = 0.0
    u[2:4] = np.nextafter(np.float32(1), np.float32(0))
    got = np.asarray(generate.inverse_cdf(jnp.asarray(weights), jnp.asarray(u)))
    cum = np.cumsum(weights.astype(np.float64), axis=1)
    want = [np.searchsorted(c, x * c[-1], side="right") for c, x in zip(cum, u, strict=True)]
    want = np.minimum(want, [np.flatnonzero(w).max() for w in weights])
    np.testing.assert_array_equal(got, want)
    assert (weights[np.arange(64), got] > 0).all()


def test_rows_that_emit_eos_keep_emitting_it_and_decoding_stops_when_all_are_done(params):
    greedy = generate.generate(params, CONFIG, PROMPTS, N_NEW).new_tokens
    eos = int(greedy[0, 3])
    out = generate.generate(params, CONFIG, PROMPTS, N_NEW, eos_id=eos)
    for row, free in zip(out.new_tokens, greedy, strict=True):
        hits = np.flatnonzero(free == eos)
        stop = hits[0] if hits.size else len(free)
        np.testing.assert_array_equal(row[:stop + 1], free[:stop + 1])
        assert (row[stop:] == eos).all()
    single = generate.generate(params, CONFIG, PROMPTS[:1], N_NEW, eos_id=eos)
    first = np.flatnonzero(greedy[0] == eos)[0]
    assert single.num_new == first + 1 and single.new_tokens[0, -1] == eos


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_k": 20,
                                          "rng": jax.random.PRNGKey(3)}])
def test_streaming_yields_the_same_tokens_and_logits_as_generate(params, options):
    """`generate` runs the loop on the device, `stream` one step per call: same computation."""
    steps = list(generate.stream(params, CONFIG, PROMPTS, N_NEW, return_logits=True, **options))
    out = generate.generate(params, CONFIG, PROMPTS, N_NEW, return_logits=True, **options)
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), out.new_tokens)
    np.testing.assert_allclose(np.stack([s.logits for s in steps], 1), out.logits,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([list(range(128))], {}, "no room for new tokens"),
    ([list(range(100))], {"max_new_tokens": 29}, "at most 28 new tokens fit"),
    ([[1, 2, 512]], {}, "outside [0, 512)"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([1, 2, 3], {}, "list of token-id lists"),
    (PROMPTS, {"temperature": -1.0}, "temperature must be >= 0"),
    (PROMPTS, {"temperature": 1.0}, "needs an `rng`"),
    (PROMPTS, {"top_k": -1, "temperature": 1.0, "rng": jax.random.PRNGKey(0)}, "top_k must be"),
    (PROMPTS, {"top_p": 0.0, "temperature": 1.0, "rng": jax.random.PRNGKey(0)}, "top_p must be"),
    (PROMPTS, {"top_p": 1.5}, "top_p must be"),
    (PROMPTS, {"max_new_tokens": 0}, "max_new_tokens must be a positive"),
    (PROMPTS, {"eos_id": 999}, "eos_id=999"),
])
def test_bad_input_is_a_clear_error(params, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError) as error:
        generate.generate(params, CONFIG, prompts, **kwargs)
    assert message in str(error.value)


def test_text_stream_holds_back_partial_utf8():
    tokenizer = get_tokenizer()
    text = "naïve 😀 ok"
    ids = tokenizer.encode(text)
    stream = generate.TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the emoji's first byte token produced no text on its own


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, random_params):
    config = get_model_config("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(path, random_params(config, 0), config)
    return path


def test_cli_streams_the_greedy_continuation(tiny_checkpoint, capsys):
    generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "The nurse said",
                   "--max_new_tokens", "8", "--temperature", "0", "--ignore_eos"])
    params, config = checkpoint.load(tiny_checkpoint)
    tokenizer = get_tokenizer()
    expected = generate.generate(params, config, [tokenizer.encode("The nurse said")], 8)
    out = capsys.readouterr().out
    assert out == "The nurse said" + tokenizer.decode(expected.new_tokens[0]) + "\n"


def test_cli_errors_name_the_problem(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "hi"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "hi " * 200])
    assert "no room for new tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "1.5"], "top_p must be in (0, 1]"), (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--top_k", "-3"], "top_k must be"), (["--temperature", "-1"], "temperature must be"),
])
def test_cli_validates_sampling_flags_like_the_api(tiny_checkpoint, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "hi", *flags])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_pad_to_changes_only_the_width(params):
    """Extra left padding is masked: the same tokens and logits, for a batch and a stream."""
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    plain = generate.generate(params, CONFIG, prompts, 4, return_logits=True)
    padded = generate.generate(params, CONFIG, prompts, 4, return_logits=True, pad_to=12)
    np.testing.assert_array_equal(padded.tokens[:, -4:], plain.tokens[:, -4:])
    assert padded.tokens.shape[1] == 12 + 4
    np.testing.assert_allclose(padded.logits, plain.logits, rtol=1e-5, atol=1e-5)
    streamed = [s.tokens for s in generate.stream(params, CONFIG, prompts, 4, pad_to=12)]
    np.testing.assert_array_equal(np.stack(streamed, 1), plain.new_tokens)
    with pytest.raises(ValueError, match="pad_to=4 must be at least the longest prompt"):
        generate.generate(params, CONFIG, prompts, 4, pad_to=4)
    with pytest.raises(ValueError, match="leave room for 4 new tokens"):
        generate.generate(params, CONFIG, prompts, 4, pad_to=CONFIG.n_positions - 3)
