"""Interventions checked against direct computations from the parameters, and the sense-edit
protocol: identity defaults, `reweights`, and the type check at the API boundary."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import generate, interventions, model, sense_table, senses, topic
from backpack_jax.config import get_model_config
from backpack_jax.edits import ReweightInputs, SenseEdit

SMALL = get_model_config("tiny").replace(vocab_size=512, bos_token_id=0, eos_token_id=0)
IDS = np.array([[5, 17, 300, 17, 9, 101, 7, 42]])


@pytest.fixture(scope="module")
def params():
    # Scaled weights: logits of a few units, so that edits move them visibly.
    return jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x,
                        model.init(SMALL, jax.random.PRNGKey(1)))


def embedding(params):
    return np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"])


def test_scaling_a_sense_shifts_logits_by_exactly_its_weighted_projection(params):
    """The Backpack's promise: editing sense k of token v adds (f - 1) * alpha * E @ C(v)_k."""
    token, sense, factor = 17, 2, 3.0
    edit = interventions.scale_senses(SMALL, {token: {sense: factor}})
    alpha = senses.contextualization(params, SMALL, IDS)[0, sense]  # [S, S]
    projection_V = embedding(params) @ np.asarray(model.sense_vectors(params, SMALL,
                                                                       [token])[0, sense])
    weight_S = alpha[:, IDS[0] == token].sum(-1)
    expected = model.apply(params, IDS, SMALL).logits[0] + (factor - 1) * np.outer(
        weight_S, projection_V)
    edited = model.apply(params, IDS, SMALL, sense_edit=edit).logits[0]
    np.testing.assert_allclose(edited, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.apply(params, IDS, SMALL,
                                           sense_edit=interventions.no_intervention(SMALL)).logits,
                               model.apply(params, IDS, SMALL).logits, rtol=0, atol=0)


def test_replace_and_compose(params):
    vector = np.linspace(-1.0, 1.0, SMALL.n_embd, dtype=np.float32)
    edit = interventions.compose(
        interventions.replace_senses(SMALL, {17: {1: vector}, 9: {0: vector}}),
        interventions.scale_senses(SMALL, {17: {1: 2.0, 3: 0.0}}),
        interventions.replace_senses(SMALL, {9: {0: -vector}}))
    got = np.asarray(model.apply(params, IDS, SMALL, sense_edit=edit, return_senses=True).senses)
    plain = np.asarray(model.apply(params, IDS, SMALL, return_senses=True).senses)
    for s in (1, 3):  # both occurrences of token 17
        np.testing.assert_array_equal(got[0, 1, s], 2.0 * vector)
        np.testing.assert_array_equal(got[0, 3, s], 0.0)
        np.testing.assert_array_equal(got[0, [0, 2], s], plain[0, [0, 2], s])
    np.testing.assert_array_equal(got[0, 0, 4], -vector)  # the later replacement wins
    others = [0, 2, 5, 6, 7]
    np.testing.assert_array_equal(got[0, :, others], plain[0, :, others])


@pytest.mark.parametrize("build, message", [
    (lambda: interventions.scale_senses(SMALL, {17: {4: 0.0}}), "sense index 4 is out of range"),
    (lambda: interventions.scale_senses(SMALL, {512: {0: 0.0}}), "token id 512 is outside"),
    (lambda: interventions.replace_senses(SMALL, {1: {0: np.zeros(3)}}), "expected (64,)"),
    (lambda: interventions.compose(), "at least one"),
])
def test_bad_interventions_are_clear_errors(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


@flax.struct.dataclass
class Double(SenseEdit):
    """Overrides only `edit`."""

    def edit(self, input_ids_BxS, senses_BxSxKxD):
        return 2.0 * senses_BxSxKxD


def test_an_edit_only_subclass_keeps_alpha(params):
    """Logits are linear in the senses: doubling them doubles the logits exactly when alpha is
    left as the model computes it."""
    double = Double()
    assert not double.reweights
    out = model.apply(params, IDS, SMALL, sense_edit=double, return_contextualization=True)
    plain = model.apply(params, IDS, SMALL, return_contextualization=True)
    np.testing.assert_array_equal(out.contextualization, plain.contextualization)
    np.testing.assert_allclose(out.logits, 2.0 * np.asarray(plain.logits), rtol=1e-5,
                               atol=1e-5)
    alpha = jnp.ones((1, SMALL.num_senses, 2, 2))
    D = SMALL.n_embd
    inputs = ReweightInputs(jnp.zeros((1, 2), jnp.int32), jnp.zeros((SMALL.num_senses, 2, D)),
                            jnp.ones((1, 2, 2), bool), 0, jnp.zeros((SMALL.vocab_size, D)))
    got, state = double.reweight(alpha, inputs, "state")
    assert got is alpha and state == "state"


def test_reweights_says_which_edits_change_alpha(params):
    control = topic.TopicControl.from_weights(np.ones((SMALL.vocab_size, SMALL.num_senses)))
    table_VxKxD = model.sense_vectors(params, SMALL, range(SMALL.vocab_size))
    assert control.reweights
    assert not interventions.no_intervention(SMALL).reweights
    assert not sense_table.SenseTable(table_VxKxD).reweights
    assert not sense_table.SenseTable(table_VxKxD, then=Double()).reweights
    assert sense_table.SenseTable(table_VxKxD, then=control).reweights


def test_an_object_that_is_not_a_sense_edit_is_refused(params):
    class Lookalike:  # has the methods, but is not declared a SenseEdit
        def edit(self, input_ids_BxS, senses_BxSxKxD):
            return senses_BxSxKxD

    with pytest.raises(TypeError, match="SenseEdit.*got Lookalike"):
        model.apply(params, IDS, SMALL, sense_edit=Lookalike())
    with pytest.raises(TypeError, match="SenseEdit.*got Lookalike"):
        generate.generate(params, SMALL, IDS[:, :3], 2, sense_edit=Lookalike())
