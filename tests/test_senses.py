"""Sense reading, projection and contextualization, checked against direct computations from
the parameters; plus the CLI and its errors."""

import json

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
def tiny(random_params):
    """The `tiny` preset with the GPT-2 vocabulary, saved like a converted model."""
    config = get_model_config("tiny")
    return random_params(config, 0), config


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(path, *tiny)
    return str(path)


def embedding(params):
    return np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"])


def test_sense_rows_are_the_rows_of_the_printed_table(params):
    class Tokenizer:  # token t reads "w<t>"; 0 decodes to a space, shown as its repr
        n_vocab = SMALL.vocab_size

        def decode(self, ids):
            return " " if ids[0] == 0 else f"w{ids[0]}"

    projection = senses.project_senses(params, model.sense_vectors(params, SMALL, [17])[0],
                                       top=3)
    rows = senses.sense_rows(projection, Tokenizer(), [2, 0])
    want = [", ".join("' '" if t == 0 else f"w{t}" for t in ids)
            for ids in (projection.promoted_ids_KxW[2], projection.suppressed_ids_KxW[2])]
    assert rows[0] == ["2", *want] and [r[0] for r in rows] == ["2", "0"]
    table = senses.format_sense_table(projection, Tokenizer(), [2, 0]).splitlines()
    assert len(table) == 4 and table[1] == "-" * len(table[0])
    assert [[c.strip() for c in line.split(" | ")] for line in table[2:]] == rows


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
    each = model.sense_vectors(params, config, ids)
    first = senses.word_senses(params, config, "Backpack", tokenizer, subword="first")
    mean = senses.word_senses(params, config, "Backpack", tokenizer, subword="mean")
    np.testing.assert_allclose(first.senses_KxD, each[0], rtol=1e-6)
    np.testing.assert_allclose(mean.senses_KxD, np.mean(np.asarray(each), 0), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="subword must be one of"):
        senses.word_senses(params, config, "Backpack", tokenizer, subword="last")


def test_projection_ranks_the_vocabulary_by_embedding_dot_sense(params):
    senses_KxD = model.sense_vectors(params, SMALL, [17])[0]
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
    expected = (np.asarray(model.sense_vectors(params, SMALL, IDS[0])).sum(1)
                @ embedding(params).T)
    np.testing.assert_allclose(senses.run_with_contextualization(params, SMALL, IDS, own)[0],
                               expected, rtol=1e-4, atol=1e-4)


def test_cli_prints_one_row_per_sense(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "senses.json"
    senses.main(["--checkpoint", tiny_checkpoint, "--word", "nurse", "--top", "3",
                 "--json", str(path)])
    out = capsys.readouterr().out.splitlines()
    tokenizer = get_tokenizer()
    assert out[0] == f"'nurse' = tokens [' nurse'] {tokenizer.encode(' nurse')}"
    rows = [line for line in out[3:-1] if "|" in line]
    assert [r.split("|")[0].strip() for r in rows] == ["0", "1", "2", "3"]
    assert all(len(r.split("|")[1].split(",")) == 3 for r in rows)
    # --json holds the token ids of the words printed.
    written = json.loads(path.read_text())
    assert written["checkpoint"] == tiny_checkpoint and out[-1] == f"wrote {path}"
    for row, (k, ids) in zip(rows, written["word"]["rows"].items(), strict=True):
        assert row.split("|")[0].strip() == k
        assert row.split("|")[1].strip() == ", ".join(
            senses.show_token(tokenizer, t) for t in ids["promotes"])


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
