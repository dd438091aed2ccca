"""The Flax Backpack against an independent PyTorch reference (transformers' GPT2Model inside).

Parity goes through files: the reference's weights are written in each Hugging Face layout and
read back with `load_hf`, so names, transposes and aliases are checked on the way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from backpack_jax import model
from backpack_jax.config import get_model_config
from convert import from_state_dict, load_hf
from tests.hf_checkpoints import LAYOUTS, TEST_CONFIGS, write_hf_checkpoint
from tests.torch_reference import random_reference
from train.loss import cross_entropy

LOGIT_RTOL = 1e-4  # max |dlogits| <= LOGIT_RTOL * max |logits|
ALPHA_ATOL = 1e-5


@functools.cache
def _reference(name: str):
    config = TEST_CONFIGS[name]
    return config, random_reference(config, seed=len(name))


@pytest.fixture(scope="module")
def full_size():
    """The real checkpoint's shape (170M random parameters), freed after this module."""
    config = get_model_config("gpt2_small")
    return config, random_reference(config, seed=0)


def _ids(config, batch, seq, seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, seq))


def _run_reference(ref, ids, **kwargs):
    kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        logits, alpha = ref(torch.as_tensor(ids), **kwargs)
    return logits.numpy(), alpha.numpy()


def _compare(what, logits, alpha, ref_logits, ref_alpha):
    rel = np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max()
    alpha_err = np.abs(np.asarray(alpha) - ref_alpha).max()
    print(f"parity {what}: max|dlogits|/max|logits| = {rel:.2e}, max|dalpha| = {alpha_err:.2e}")
    assert rel <= LOGIT_RTOL, what
    assert alpha_err <= ALPHA_ATOL, what


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(TEST_CONFIGS))
def test_parity_through_every_layout(name, layout, tmp_path):
    config, ref = _reference(name)
    write_hf_checkpoint(tmp_path, ref.tensors, config, layout)
    params, loaded_config = load_hf(tmp_path)
    assert loaded_config == config
    ids = _ids(config, 3, 11)
    out = model.apply(params, jnp.asarray(ids), config, return_contextualization=True)
    assert out.logits.dtype == jnp.float32
    _compare(f"{name}/{layout}", out.logits, out.contextualization, *_run_reference(ref, ids))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["safetensors", "bin_aliases"])
def test_parity_backpack_gpt2_shape(full_size, layout, tmp_path):
    config, ref = full_size
    write_hf_checkpoint(tmp_path, ref.tensors, config, layout)
    params, _ = load_hf(tmp_path)
    ids = _ids(config, 2, 7)
    out = model.apply(params, jnp.asarray(ids), config, return_contextualization=True)
    _compare(f"backpack_gpt2/{layout}", out.logits, out.contextualization,
             *_run_reference(ref, ids))


def _params(name):
    config, ref = _reference(name)
    return config, ref, from_state_dict(ref.tensors, config)


KERNELS = pytest.mark.parametrize("kernels", [model.PLAIN, model.XLA_CPU], ids=["plain", "xla_cpu"])


@KERNELS
@pytest.mark.parametrize("batch, seq", [(1, 1), (1, 5), (2, 4)])
def test_parity_for_decode_sized_inputs(batch, seq, kernels):
    """At most 8 tokens take XLA:CPU's decode-step forms: split matrix-vector products and, for
    one position, the per-sense mix."""
    config, ref, params = _params("odd")
    ids = _ids(config, batch, seq, seed=2)
    out = model.apply(params, jnp.asarray(ids), config, return_contextualization=True,
                      kernels=kernels)
    _compare(f"odd/{batch}x{seq}", out.logits, out.contextualization, *_run_reference(ref, ids))


def test_parity_at_full_length_and_shifted_positions():
    config, ref, params = _params("odd")
    ids = _ids(config, 2, config.n_positions, seed=1)
    out = model.apply(params, jnp.asarray(ids), config, return_contextualization=True)
    _compare("odd/full length", out.logits, out.contextualization, *_run_reference(ref, ids))
    ids = ids[:, :9]
    positions = np.arange(5, 14)[None].repeat(2, 0)
    out = model.apply(params, jnp.asarray(ids), config, position_ids=jnp.asarray(positions),
                      return_contextualization=True)
    _compare("odd/positions 5..13", out.logits, out.contextualization,
             *_run_reference(ref, ids, position_ids=positions))


@pytest.mark.parametrize("name", sorted(TEST_CONFIGS))
def test_senses_match_reference(name):
    config, ref, params = _params(name)
    ids = _ids(config, 2, 6)
    out = model.apply(params, jnp.asarray(ids), config, return_senses=True)
    with torch.no_grad():
        want = ref.senses(torch.as_tensor(ids)).numpy()
    assert out.senses.shape == (2, config.num_senses, 6, config.n_embd)
    np.testing.assert_allclose(out.senses, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_custom_contextualization_matches_reference():
    config, ref, params = _params("odd")
    ids = _ids(config, 2, 5)
    alpha = np.random.RandomState(3).dirichlet(np.ones(5), size=(2, config.num_senses, 5))
    alpha = alpha.astype(np.float32)
    out = model.apply(params, jnp.asarray(ids), config, contextualization=jnp.asarray(alpha))
    ref_logits, _ = _run_reference(ref, ids, contextualization=alpha)
    assert np.abs(out.logits - ref_logits).max() <= LOGIT_RTOL * np.abs(ref_logits).max()


def test_reference_uses_eager_attention_with_layer_scaling():
    """Guards the reference itself: SDPA once ignored scale_attn_by_inverse_layer_idx."""
    config, ref = _reference("odd")
    gpt2 = ref.gpt2
    assert gpt2.config._attn_implementation == "eager"
    for i, block in enumerate(gpt2.h):
        assert block.attn.scaling == pytest.approx(config.head_dim ** -0.5 / (i + 1))
    # The flag changes the logits far beyond the parity tolerance, so parity tests would see it.
    ids = _ids(config, 2, 9)
    flipped = random_reference(config.replace(scale_attn_by_inverse_layer_idx=False),
                               seed=len("odd"))
    logits, _ = _run_reference(ref, ids)
    other, _ = _run_reference(flipped, ids)
    assert np.abs(logits - other).max() > 100 * LOGIT_RTOL * np.abs(logits).max()


def _logits(params, ids, config, **kwargs):
    return np.asarray(model.apply(params, jnp.asarray(ids), config, **kwargs).logits)


@KERNELS
def test_dropout_is_stochastic_and_reproducible(kernels):
    config, _, params = _params("odd")
    ids = _ids(config, 2, 8)
    key, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    a = _logits(params, ids, config, train=True, rng=key, kernels=kernels)
    np.testing.assert_array_equal(a, _logits(params, ids, config, train=True, rng=key,
                                             kernels=kernels))
    assert not np.allclose(a, _logits(params, ids, config, train=True, rng=other,
                                      kernels=kernels))
    assert not np.allclose(a, _logits(params, ids, config, kernels=kernels))
    with pytest.raises(ValueError, match="rng"):
        model.apply(params, jnp.asarray(ids), config, train=True)


@KERNELS
@pytest.mark.parametrize("site", ["embd_pdrop", "resid_pdrop", "attn_pdrop"])
def test_each_dropout_site_acts_alone_and_zero_rate_is_eval(site, kernels):
    config, _, params = _params("odd")
    silent = config.replace(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    ids = _ids(config, 2, 8)
    key = jax.random.PRNGKey(2)
    eval_logits = _logits(params, ids, silent, kernels=kernels)
    np.testing.assert_allclose(_logits(params, ids, silent, train=True, rng=key,
                                       kernels=kernels), eval_logits,
                               rtol=0, atol=1e-6 * np.abs(eval_logits).max())
    one = silent.replace(**{site: 0.3})
    assert not np.allclose(_logits(params, ids, one, train=True, rng=key, kernels=kernels),
                           eval_logits)


@KERNELS
@pytest.mark.parametrize("name", sorted(TEST_CONFIGS))
def test_gradients_match_reference(name, kernels):
    """d(mean next-token cross-entropy)/d(every parameter) against torch autograd of the
    reference, with the plain forms and with XLA:CPU's custom VJPs."""
    config, ref, params = _params(name)
    ids = _ids(config, 2, 9, seed=4)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    ref.zero_grad()
    logits, _ = ref(torch.as_tensor(inputs))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                      torch.as_tensor(targets).flatten()).backward()
    want = from_state_dict(ref.grads(), config)

    def loss(p):
        logits = model.apply(p, jnp.asarray(inputs), config, kernels=kernels).logits
        return cross_entropy(logits, jnp.asarray(targets))

    got = jax.jit(jax.grad(loss))(params)
    for path, g_want in jax.tree_util.tree_leaves_with_path(want):
        g_got = functools.reduce(lambda node, key: node[key.key], path, got)
        scale = max(float(np.abs(g_want).max()), 1e-6)
        err = float(np.abs(np.asarray(g_got) - g_want).max())
        assert err <= 1e-4 * scale, f"{jax.tree_util.keystr(path)}: {err:.2e} vs {scale:.2e}"


def test_bfloat16_compute_is_close_to_float32():
    config, _, params = _params("odd")
    ids = _ids(config, 2, 10)
    full = model.apply(params, jnp.asarray(ids), config)
    half = model.apply(params, jnp.asarray(ids), config, dtype=jnp.bfloat16)
    assert half.logits.dtype == jnp.float32
    err = np.abs(np.asarray(half.logits) - np.asarray(full.logits)).max()
    print(f"bfloat16: max|dlogits|/max|logits| = {err / np.abs(full.logits).max():.2e}")
    assert err <= 0.05 * np.abs(full.logits).max()
    np.testing.assert_array_equal(half.logits.argmax(-1), full.logits.argmax(-1))


@pytest.fixture(scope="module")
def odd():
    config, _, params = _params("odd")
    return config, params


@pytest.mark.parametrize("ids,match", [
    (np.array([[1, 2], [3, -1]]), r"input_ids\[1, 1\] = -1 is outside \[0, 97\)"),
    (np.array([[1, 97, 2]]), r"input_ids\[0, 1\] = 97 is outside \[0, 97\)"),
    (np.array([[0.0, 1.0]]), "must hold integers"),
    (np.array([1, 2, 3]), "2-D"),
    (np.zeros((1, 2, 3), int), "2-D"),
    (np.zeros((1, 41), int), "n_positions=40"),
    (np.zeros((1, 0), int), "empty"),
])
def test_bad_input_ids(odd, ids, match):
    config, params = odd
    with pytest.raises(ValueError, match=match):
        model.apply(params, jnp.asarray(ids), config)


@pytest.mark.parametrize("positions,match", [
    (np.arange(4)[None], r"position_ids must have shape \[2, 3\]"),
    (np.array([[0, 1, 40], [0, 1, 2]]), r"position_ids\[0, 2\] = 40 is outside \[0, 40\)"),
    (np.array([0, -1, 2]), r"position_ids\[0, 1\] = -1"),
    (np.array([0.0, 1.0, 2.0]), "must hold integers"),
])
def test_bad_position_ids(odd, positions, match):
    config, params = odd
    with pytest.raises(ValueError, match=match):
        model.apply(params, jnp.zeros((2, 3), jnp.int32), config,
                    position_ids=jnp.asarray(positions))


def test_bad_contextualization_shape(odd):
    config, params = odd
    with pytest.raises(ValueError, match="contextualization must have shape"):
        model.apply(params, jnp.zeros((2, 3), jnp.int32), config,
                    contextualization=jnp.zeros((2, config.num_senses, 3, 4)))
