"""Sense reading, contextualization, interventions and topic control, checked against direct
computations from the parameters; plus the CLI and its errors."""

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, model, senses
from backpack_jax.config import get_model_config
from backpack_jax.tokenizer import get_tokenizer
from convert import from_state_dict
from tests.torch_reference import random_reference

SMALL = get_model_config("tiny").replace(vocab_size=512, bos_token_id=0, eos_token_id=0)
IDS = np.array([[5, 17, 300, 17, 9, 101, 7, 42]])


@pytest.fixture(scope="module")
def params():
    ref = random_reference(SMALL, seed=1)
    return from_state_dict(ref.tensors, SMALL)


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` preset with the GPT-2 vocabulary, saved like a converted model."""
    config = get_model_config("tiny")
    return jax.jit(model.init, static_argnums=0)(config, jax.random.PRNGKey(0)), config


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(path, *tiny)
    return str(path)


def embedding(params):
    return np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"])


def test_word_senses_are_the_models_senses_of_its_token(tiny):
    params, config = tiny
    tokenizer = get_tokenizer()
    word = senses.word_senses(params, config, "nurse", tokenizer)
    assert word.token_ids == tokenizer.encode(" nurse") and len(word.token_ids) == 1
    in_context = model.apply(params, np.array([tokenizer.encode("The nurse")]), config,
                             return_senses=True).senses  # [B, K, S, D]
    np.testing.assert_allclose(word.senses_KxD, in_context[0, :, 1], rtol=1e-6, atol=1e-6)


def test_multi_token_word_needs_an_explicit_subword_rule(tiny):
    params, config = tiny
    tokenizer = get_tokenizer()
    with pytest.raises(ValueError) as error:
        senses.word_senses(params, config, "Backpack", tokenizer)
    assert "[' Back', 'pack']" in str(error.value) and "subword='first'" in str(error.value)
    ids = tokenizer.encode(" Backpack")
    each = senses.sense_vectors(params, config, ids)
    first = senses.word_senses(params, config, "Backpack", tokenizer, subword="first")
    mean = senses.word_senses(params, config, "Backpack", tokenizer, subword="mean")
    np.testing.assert_allclose(first.senses_KxD, each[0], rtol=1e-6)
    np.testing.assert_allclose(mean.senses_KxD, np.mean(np.asarray(each), 0), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="subword must be one of"):
        senses.word_senses(params, config, "Backpack", tokenizer, subword="last")


def test_projection_ranks_the_vocabulary_by_embedding_dot_sense(params):
    senses_KxD = senses.sense_vectors(params, SMALL, [17])[0]
    projection = senses.project_senses(params, senses_KxD, top=6, vocab_limit=500)
    logits_KxV = np.asarray(senses_KxD, np.float64) @ embedding(params)[:500].T
    order = np.argsort(-logits_KxV, axis=1)
    np.testing.assert_array_equal(projection.promoted_ids_KxW, order[:, :6])
    np.testing.assert_array_equal(projection.suppressed_ids_KxW, order[:, ::-1][:, :6])
    np.testing.assert_allclose(projection.promoted_logits_KxW,
                               np.take_along_axis(logits_KxV, order[:, :6], 1), rtol=1e-5)
    with pytest.raises(ValueError, match="top must be in"):
        senses.project_senses(params, senses_KxD, top=0)


def test_contextualization_is_causal_and_drives_the_logits(params):
    alpha = senses.contextualization(params, SMALL, IDS)
    S = IDS.shape[1]
    assert alpha.shape == (1, SMALL.num_senses, S, S)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    assert np.abs(alpha * (1 - np.tril(np.ones((S, S))))).max() < 1e-6
    logits = model.apply(params, IDS, SMALL).logits
    np.testing.assert_allclose(senses.run_with_contextualization(params, SMALL, IDS, alpha),
                               logits, rtol=1e-5, atol=1e-5)
    # With all weight on the token itself, position i predicts E @ sum_k C(x_i)_k.
    own = np.broadcast_to(np.eye(S), alpha.shape)
    expected = (np.asarray(senses.sense_vectors(params, SMALL, IDS[0])).sum(1)
                @ embedding(params).T)
    np.testing.assert_allclose(senses.run_with_contextualization(params, SMALL, IDS, own)[0],
                               expected, rtol=1e-4, atol=1e-4)


def test_scaling_a_sense_shifts_logits_by_exactly_its_weighted_projection(params):
    """The Backpack's promise: editing sense k of token v adds (f - 1) * alpha * E @ C(v)_k."""
    token, sense, factor = 17, 2, 3.0
    edit = senses.scale_senses(SMALL, {token: {sense: factor}})
    alpha = senses.contextualization(params, SMALL, IDS)[0, sense]  # [S, S]
    projection_V = embedding(params) @ np.asarray(senses.sense_vectors(params, SMALL,
                                                                       [token])[0, sense])
    weight_S = alpha[:, IDS[0] == token].sum(-1)
    expected = model.apply(params, IDS, SMALL).logits[0] + (factor - 1) * np.outer(
        weight_S, projection_V)
    edited = model.apply(params, IDS, SMALL, sense_edit=edit).logits[0]
    np.testing.assert_allclose(edited, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.apply(params, IDS, SMALL,
                                           sense_edit=senses.no_intervention(SMALL)).logits,
                               model.apply(params, IDS, SMALL).logits, rtol=0, atol=0)


def test_replace_and_compose(params):
    vector = np.linspace(-1.0, 1.0, SMALL.n_embd, dtype=np.float32)
    edit = senses.compose(senses.replace_senses(SMALL, {17: {1: vector}, 9: {0: vector}}),
                          senses.scale_senses(SMALL, {17: {1: 2.0, 3: 0.0}}),
                          senses.replace_senses(SMALL, {9: {0: -vector}}))
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
    (lambda: senses.scale_senses(SMALL, {17: {4: 0.0}}), "sense index 4 is out of range"),
    (lambda: senses.scale_senses(SMALL, {512: {0: 0.0}}), "token id 512 is outside"),
    (lambda: senses.replace_senses(SMALL, {1: {0: np.zeros(3)}}), "expected (64,)"),
    (lambda: senses.compose(), "at least one"),
])
def test_bad_interventions_are_clear_errors(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_softmax_topic_scores_are_chunk_independent_and_match_a_direct_computation(params):
    topic = [3, 77, 250, 300]
    scores = senses.softmax_topic_scores(params, SMALL, topic, chunk_size=100, progress=False)
    np.testing.assert_allclose(
        senses.softmax_topic_scores(params, SMALL, topic, chunk_size=512, progress=False),
        scores, rtol=1e-5, atol=1e-5)
    for v, k in [(0, 0), (300, 2), (511, 3)]:
        logits = embedding(params).astype(np.float64) @ np.asarray(
            senses.sense_vectors(params, SMALL, [v])[0, k])
        log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert abs(scores[v, k] - np.log(np.exp(log_probs[topic]).sum())) < 1e-4


def test_softmax_topic_control_raises_probability_of_topic_words(params):
    rng = np.random.default_rng(0)
    topic = rng.choice(SMALL.vocab_size, 20, replace=False)
    control = senses.softmax_topic_intervention(params, SMALL, topic, num_pairs=150,
                                                factor=3.0, progress=False)
    scale = np.asarray(control.intervention.scale_VxK)
    assert (scale == 3.0).sum() == 150 and np.isin(scale, [1.0, 3.0]).all()
    assert (np.diff(control.scores_R) <= 0).all()
    contexts = rng.integers(0, SMALL.vocab_size, (16, 24))

    def topic_mass(edit):
        probs = jax.nn.softmax(model.apply(params, contexts, SMALL, sense_edit=edit).logits)
        return float(np.asarray(probs)[..., topic].sum(-1).mean())

    base, steered = topic_mass(None), topic_mass(control.intervention)
    assert steered > 1.2 * base, (base, steered)


def test_cli_prints_one_row_per_sense(tiny_checkpoint, capsys):
    senses.main(["--checkpoint", tiny_checkpoint, "--word", "nurse", "--top", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"'nurse' = tokens [' nurse'] {get_tokenizer().encode(' nurse')}"
    rows = [line for line in out[3:] if "|" in line]
    assert [r.split("|")[0].strip() for r in rows] == ["0", "1", "2", "3"]
    assert all(len(r.split("|")[1].split(",")) == 3 for r in rows)


def test_cli_plots_chosen_senses(tiny_checkpoint, tmp_path, capsys):
    plot = tmp_path / "alpha.png"
    senses.main(["--checkpoint", tiny_checkpoint, "--text", "The nurse said that",
                 "--plot", str(plot), "--senses", "0,3"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "senses [0, 3]" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--word", "Backpack"], "[' Back', 'pack']"),
    (["--word", "nurse", "--senses", "0,4"], "sense index 4 is out of range"),
    (["--text", "hello"], "--text needs --plot"),
    ([], "give --word"),
])
def test_cli_errors_name_the_problem(tiny_checkpoint, capsys, args, message):
    with pytest.raises(SystemExit):
        senses.main(["--checkpoint", tiny_checkpoint, *args])
    assert message in capsys.readouterr().err


def test_cli_unknown_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        senses.main(["--checkpoint", str(tmp_path / "nope"), "--word", "nurse"])
    assert "does not exist" in capsys.readouterr().err
