"""The per-vocabulary sense table gives the model's own senses and leaves outputs unchanged."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import generate, model, sense_table
from backpack_jax.config import get_model_config
from backpack_jax.edits import SenseEdit

CONFIG = get_model_config("tiny").replace(vocab_size=300, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def params_and_table():
    params = model.init(CONFIG, jax.random.key(0))
    # chunk 128 does not divide 300: the last chunk is shifted back and overlaps.
    return params, sense_table.build(params, CONFIG, chunk=128)


def test_rows_are_each_tokens_senses(params_and_table):
    params, table = params_and_table
    assert table.senses_VxKxD.shape == (300, CONFIG.num_senses, CONFIG.n_embd)
    # The senses the full forward pass uses, for the vocabulary as 3 texts of 100 tokens.
    ids_3x100 = jnp.arange(300, dtype=jnp.int32).reshape(3, 100)
    senses_3xKx100xD = model.apply(params, ids_3x100, CONFIG, return_senses=True).senses
    want = np.asarray(senses_3xKx100xD).transpose(0, 2, 1, 3).reshape(300, CONFIG.num_senses, -1)
    np.testing.assert_allclose(table.senses_VxKxD, want, rtol=1e-5, atol=1e-6)
    assert sense_table.nbytes(CONFIG) == 300 * CONFIG.num_senses * CONFIG.n_embd * 4


def test_apply_and_generate_unchanged(params_and_table):
    params, table = params_and_table
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 9)), jnp.int32)
    plain = model.apply(params, ids, CONFIG).logits
    looked_up = model.apply(params, ids, CONFIG, sense_edit=table).logits
    np.testing.assert_allclose(looked_up, plain, rtol=1e-5, atol=1e-6)
    a = generate.generate(params, CONFIG, np.asarray(ids[:, :4]), 5, return_logits=True)
    b = generate.generate(params, CONFIG, np.asarray(ids[:, :4]), 5, return_logits=True,
                          sense_edit=table)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)


def test_then_edits_the_looked_up_senses(params_and_table):
    params, table = params_and_table

    @flax.struct.dataclass
    class Double(SenseEdit):
        def edit(self, ids, senses):
            return 2.0 * senses

    ids = jnp.asarray([[5, 7, 9]], jnp.int32)
    doubled = sense_table.SenseTable(table.senses_VxKxD, then=Double())
    got = model.apply(params, ids, CONFIG, sense_edit=doubled).logits
    want = model.apply(params, ids, CONFIG).logits * 2.0  # logits are linear in the senses
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_then_keeps_a_reweighting_edit(params_and_table):
    """A table wrapping the annealed topic control gives that control's logits, cached too."""
    from backpack_jax import topic
    params, table = params_and_table
    delta_VxK = np.random.default_rng(1).choice([1.0, 1.5, 3.3], (300, CONFIG.num_senses))
    control = topic.TopicControl.from_weights(delta_VxK)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 300, (2, 7)), jnp.int32)
    want = model.apply(params, ids, CONFIG, sense_edit=control).logits
    assert not np.allclose(want, model.apply(params, ids, CONFIG).logits, atol=1e-3)
    wrapped = sense_table.SenseTable(table.senses_VxKxD, then=control)
    got = model.apply(params, ids, CONFIG, sense_edit=wrapped).logits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    a = generate.generate(params, CONFIG, np.asarray(ids[:, :3]), 4, return_logits=True,
                          sense_edit=control)
    b = generate.generate(params, CONFIG, np.asarray(ids[:, :3]), 4, return_logits=True,
                          sense_edit=wrapped)
    np.testing.assert_allclose(b.logits, a.logits, rtol=1e-5, atol=1e-6)
