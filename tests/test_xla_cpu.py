"""XLA:CPU's forms (backpack_jax/xla_cpu.py) compute what model.py's plain forms compute.

Whole-model checks compare `model.PLAIN` and `model.XLA_CPU` in values and gradients, in float32
and bfloat16, for full-length, decode-sized and row-chunked inputs and for cached decoding; the
dropout keep-mask, whose random bits differ by design, is checked for its statistics instead.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backpack_jax import decode_cache, model, xla_cpu
from convert import from_state_dict
from tests.hf_checkpoints import TEST_CONFIGS
from tests.torch_reference import random_reference
from train.loss import cross_entropy

# float32: the forms differ only in the order of sums.
RTOL = 2e-6
@functools.cache
def _odd():
    config = TEST_CONFIGS["odd"]
    reference = random_reference(config, seed=0)
    return config, reference, from_state_dict(reference.tensors, config)


def _ids(config, batch, seq, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, config.vocab_size, (batch, seq)))


def _err(got, want):
    return float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max())


def _scale(x):
    return max(float(np.abs(np.asarray(x, np.float32)).max()), 1e-6)


def _close(got, want, rtol, what):
    err, scale = _err(got, want), _scale(want)
    assert err <= rtol * scale, f"{what}: {err:.2e} vs {scale:.2e}"


@pytest.fixture
def chunk_tokens(monkeypatch):
    """Sets how many tokens `model.apply` runs at a time with XLA:CPU's kernels."""
    return lambda tokens: monkeypatch.setattr(xla_cpu, "TOKENS_PER_CHUNK", tokens)


def _leaves(tree):
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch, seq, tokens", [(3, 11, 512), (1, 5, 512), (2, 1, 512),
                                                (3, 11, 22)], ids=["full", "few-rows",
                                                                   "one-position", "row-chunks"])
def test_forward_and_gradients_equal_the_plain_form(dtype, batch, seq, tokens, chunk_tokens):
    """float32: equal up to the order of sums. bfloat16: each form rounds differently, so each is
    compared with the float32 result, and the tuned form must be as accurate as the plain one."""
    config, _, params = _odd()
    ids = _ids(config, batch, seq + 1, seed=seq)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def run(kernels, dtype):
        def loss(p):
            out = model.apply(p, inputs, config, dtype=dtype, kernels=kernels,
                              return_contextualization=True, return_senses=True)
            return cross_entropy(out.logits, targets), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return [("logits", out.logits), ("alpha", out.contextualization),
                ("senses", out.senses)] + _leaves(grads)

    chunk_tokens(tokens)
    plain, tuned = run(model.PLAIN, dtype), run(model.XLA_CPU, dtype)
    exact = plain if dtype == jnp.float32 else run(model.PLAIN, jnp.float32)
    for (what, got), (_, want), (_, fp32) in zip(tuned, plain, exact, strict=True):
        if dtype == jnp.float32:
            _close(got, want, RTOL if what in ("logits", "alpha", "senses") else 10 * RTOL, what)
        else:
            assert _err(got, fp32) <= 1.5 * _err(want, fp32) + 1e-3 * _scale(fp32), what


@pytest.mark.parametrize("batch", [1, 2])  # 1: the matmul splits its contraction
def test_cached_decoding_equals_the_plain_form(batch):
    """A prefill and three decode steps through the cache, as `generate` runs them."""
    config, _, params = _odd()
    prompt_BxP = _ids(config, batch, 5, seed=7)
    length = 8

    def decode(kernels):
        lm = model.BackpackLM(config, kernels=kernels)
        attend_BxPxT = jnp.tril(jnp.ones((5, length), bool))[None]
        cache = decode_cache.DecodeCache.zeros(config, batch, length)
        out, cache = lm.apply({"params": params}, prompt_BxP, jnp.arange(5)[None],
                              attend_BxPxT, cache=cache)
        logits = [out.logits[:, -1]]
        for index in range(5, length):
            token_Bx1 = logits[-1].argmax(-1)[:, None]
            attend_Bx1xT = (jnp.arange(length) <= index)[None, None]
            out, cache = lm.apply({"params": params}, token_Bx1, jnp.full((1, 1), index),
                                  attend_Bx1xT, cache=cache, cache_index=index)
            logits.append(out.logits[:, 0])
        return jnp.stack(logits, 1)

    plain, tuned = decode(model.PLAIN), decode(model.XLA_CPU)
    np.testing.assert_array_equal(tuned.argmax(-1), plain.argmax(-1))
    _close(tuned, plain, RTOL, "decode logits")


def test_tied_lm_head_gradients_equal_autodiff_of_the_product():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    o, wte = jax.random.normal(k1, (2, 5, 8)), jax.random.normal(k2, (11, 8))
    cotangent = jax.random.normal(k3, (2, 5, 11))
    tuned = jax.grad(lambda o, w: jnp.sum(xla_cpu.lm_head(o, w) * cotangent), (0, 1))
    plain = jax.grad(lambda o, w: jnp.sum(model.PLAIN.lm_head(o, w) * cotangent), (0, 1))
    for got, want in zip(tuned(o, wte), plain(o, wte), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, seq, tokens, rows", [(8, 512, 512, 1), (6, 4, 10, 2),
                                                      (7, 64, 512, 7), (16, 64, 512, 8),
                                                      (997, 1, 512, 512), (3, 600, 512, 1)])
def test_rows_per_chunk(batch, seq, tokens, rows):
    assert xla_cpu.rows_per_chunk(batch, seq, tokens) == rows


@pytest.mark.parametrize("batch", [6, 7])  # 3 chunks of 2 rows; the same and one row more
def test_forward_in_row_chunks_matches_reference(batch, chunk_tokens):
    """A batch in chunks of whole rows gives the whole batch's outputs, custom alpha included."""
    config, ref, params = _odd()
    ids = np.asarray(_ids(config, batch, 4, seed=4))
    kernels = model.XLA_CPU
    chunk_tokens(10)
    out = model.apply(params, jnp.asarray(ids), config, return_senses=True, kernels=kernels)
    with torch.no_grad():
        ref_logits, _ = ref(torch.as_tensor(ids))
        want_senses = ref.senses(torch.as_tensor(ids)).numpy()
    _close(out.logits, ref_logits.numpy(), 1e-4, "logits")
    _close(out.senses, want_senses, 1e-5, "senses")
    alpha = np.random.RandomState(5).dirichlet(np.ones(4), size=(batch, config.num_senses, 4))
    alpha = alpha.astype(np.float32)
    out = model.apply(params, jnp.asarray(ids), config, contextualization=jnp.asarray(alpha),
                      kernels=kernels)
    with torch.no_grad():
        ref_logits, _ = ref(torch.as_tensor(ids), contextualization=torch.as_tensor(alpha))
    _close(out.logits, ref_logits.numpy(), 1e-4, "logits with custom alpha")


def test_apply_runs_rows_in_chunks_only_for_inference_with_xla_cpu_kernels(chunk_tokens):
    """The one place that chooses: a loop over chunks of rows with XLA:CPU's kernels outside
    training, the whole batch with the plain kernels or with dropout (whose masks are drawn for
    the whole batch)."""
    config, _, params = _odd()
    ids = _ids(config, 6, 4)
    chunk_tokens(8)

    def loops(**kwargs):
        jaxpr = jax.make_jaxpr(lambda: model.apply(params, ids, config, **kwargs))()
        return " scan[" in str(jaxpr)  # lax.map over the chunks

    assert loops(kernels=model.XLA_CPU)
    assert not loops(kernels=model.PLAIN)
    assert not loops(kernels=model.XLA_CPU, train=True, rng=jax.random.PRNGKey(0))


@pytest.fixture(params=["threefry", "no primitive"])
def threefry(request, monkeypatch):
    """XLA:CPU's keep-mask as it is, and as it runs on a JAX without the threefry primitive."""
    if request.param == "no primitive":
        monkeypatch.setattr(xla_cpu, "_THREEFRY", None)
    return request.param


# Last axis a multiple of 4 (one threefry block per 4 elements), only of 2, odd; a key of
# another PRNG implementation always takes jax.random.bits.
@pytest.mark.parametrize("shape, impl", [((4, 64, 2048), None), ((512, 1026), None),
                                         ((3, 1001), None), ((64, 2048), "rbg")])
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_dropout_drops_at_its_rate_and_is_unbiased(shape, impl, rate, threefry):
    x = jnp.ones(shape, jnp.float32)
    key = jax.random.PRNGKey(0) if impl is None else jax.random.key(0, impl=impl)
    dropout = model.Dropout(rate, model.XLA_CPU)
    y = np.asarray(dropout.apply({}, x, False, rngs={"dropout": key}))
    keep_prob = 1 - round(rate * 2 ** 16) / 2 ** 16
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / keep_prob, rtol=1e-6)
    n = y.size  # the dropped fraction is within 4 binomial standard deviations of the rate
    assert abs((~kept).mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert abs(y.mean() - 1) < 4 * np.sqrt(rate / (1 - rate) / n)
    four = shape[-1] % 4 == 0 and impl is None and threefry == "threefry"
    group = 4 if four else 2 if shape[-1] % 2 == 0 else 1
    dropped = (~kept).reshape(-1, group)  # The levels cut from one block or word drop
    for i, j in itertools.combinations(range(group), 2):  # independently of each other.
        both = (dropped[:, i] & dropped[:, j]).mean()
        assert abs(both - rate ** 2) < 4 * np.sqrt(rate ** 2 / dropped.shape[0]), (i, j)
    np.testing.assert_array_equal(dropout.apply({}, x, True), x)
