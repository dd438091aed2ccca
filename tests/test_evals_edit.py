"""The knowledge edit: the moved sense vectors, their effect on the logits against a direct numpy
computation from alpha and the senses, generation under the edit, and the command."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import checkpoint, generate, interventions, model
from backpack_jax.config import get_model_config
from backpack_jax.evals import edit as edit_eval
from backpack_jax.tokenizer import get_tokenizer, word_ids

CONFIG = get_model_config("tiny")


@pytest.fixture(scope="module")
def params(random_params):
    # Real spread: the embeddings and sense network's output well above the init's 0.02.
    return random_params(CONFIG, 3, scale=4.0)


def _pick(params, word_ids):
    """A removed token that every sense of the word promotes, and an added token meeting the
    conditions under which the edit's sign is certain (e_r . e_a below both squared norms)."""
    e_VxD = np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"], np.float64)
    c_WxKxD = np.asarray(model.sense_vectors(params, CONFIG, word_ids), np.float64)
    dots_VxWK = e_VxD[:50257] @ c_WxKxD.reshape(-1, CONFIG.n_embd).T
    remove = int(np.argmax(dots_VxWK.min(axis=1)))
    assert dots_VxWK[remove].min() > 0
    e_r = e_VxD[remove]
    for add in np.argsort(-np.linalg.norm(e_VxD[:50257], axis=1)):
        e_a = e_VxD[add]
        if add != remove and e_r @ e_a < min(e_r @ e_r, e_a @ e_a):
            return remove, int(add)
    raise AssertionError("no added token")


def test_moved_senses_follow_the_formula(params):
    word, remove, add = [11], 50, 60
    edited = interventions.knowledge_edit(params, CONFIG, word, remove, add)
    e_VxD = np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"], np.float64)
    e_r, e_a = e_VxD[remove], e_VxD[add]
    c_KxD = np.asarray(model.sense_vectors(params, CONFIG, word)[0], np.float64)
    want_KxD = np.stack([c + (c @ e_r) / (e_r @ e_r) * (e_a * (e_r @ e_r) / (e_a @ e_a) - e_r)
                         for c in c_KxD])
    got = edited.edit(jnp.asarray([[11, 12]]), model.sense_vectors(params, CONFIG, [11, 12])[None])
    np.testing.assert_allclose(np.asarray(got[0, 0]), want_KxD, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[0, 1]),  # other tokens untouched
                               np.asarray(model.sense_vectors(params, CONFIG, [12])[0]),
                               rtol=1e-5, atol=1e-7)
    # The component along e_r is rescaled onto e_a: c'.e_a - c.e_a = (c.e_r)(1 - e_r.e_a/|e_r|^2).
    np.testing.assert_allclose(want_KxD @ e_a - c_KxD @ e_a,
                               (c_KxD @ e_r) * (1 - (e_r @ e_a) / (e_r @ e_r)), rtol=1e-9)


def test_logit_changes_equal_alpha_weighted_sense_changes(params):
    tok = get_tokenizer()
    ids_U = word_ids("MacBook", tok)
    remove, add = _pick(params, ids_U)
    text = tok.encode("I bought a MacBook and then the MacBook broke")
    edit = interventions.knowledge_edit(params, CONFIG, ids_U, remove, add)
    check = edit_eval.edit_check(params, CONFIG, text, ids_U, edit, remove, add)

    # Independently: alpha does not depend on the senses, so the change of the logits at i is
    # sum_j sum_l alpha[l, i, j] (C'_jl - C_jl) . e over the word's positions j.
    out = model.apply(params, jnp.asarray([text]), CONFIG, return_contextualization=True)
    alpha_KxSxS = np.asarray(out.contextualization[0], np.float64)
    e_VxD = np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"], np.float64)
    e_r, e_a = e_VxD[remove], e_VxD[add]
    c_SxKxD = np.asarray(model.sense_vectors(params, CONFIG, text), np.float64)
    in_word_S = np.isin(text, ids_U)
    delta_SxKxD = np.where(in_word_S[:, None, None], (c_SxKxD @ e_r / (e_r @ e_r))[..., None]
                           * (e_a * (e_r @ e_r) / (e_a @ e_a) - e_r), 0.0)
    change_SxD = np.einsum("kij,jkd->id", alpha_KxSxS, delta_SxKxD)
    first = int(np.argmax(in_word_S))
    np.testing.assert_array_equal(check.positions_S, np.arange(first, len(text)))
    np.testing.assert_allclose(check.remove_after_S - check.remove_before_S,
                               (change_SxD @ e_r)[first:], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(check.add_after_S - check.add_before_S,
                               (change_SxD @ e_a)[first:], rtol=1e-3, atol=1e-4)
    assert check.holds
    assert (check.remove_after_S - check.remove_before_S).max() < -1e-3


def test_generation_under_the_edit_matches_apply(params):
    tok = get_tokenizer()
    ids_U = word_ids("MacBook", tok)
    remove, add = _pick(params, ids_U)
    edit = interventions.knowledge_edit(params, CONFIG, ids_U, remove, add)
    prompt = tok.encode("The MacBook is")
    gen = generate.generate(params, CONFIG, [prompt], 6, sense_edit=edit, return_logits=True)
    full = model.apply(params, jnp.asarray(gen.tokens[:, :-1]), CONFIG, sense_edit=edit).logits
    np.testing.assert_allclose(gen.logits[0], np.asarray(full[0, len(prompt) - 1:]),
                               rtol=1e-4, atol=1e-4)
    plain = generate.generate(params, CONFIG, [prompt], 6, return_logits=True)
    assert not np.allclose(plain.logits[0, 0], gen.logits[0, 0])


def test_errors(params):
    with pytest.raises(ValueError, match="same token"):
        interventions.knowledge_edit(params, CONFIG, [5], 7, 7)
    with pytest.raises(ValueError, match="outside"):
        interventions.knowledge_edit(params, CONFIG, [5], CONFIG.vocab_size, 7)
    edit = interventions.knowledge_edit(params, CONFIG, [5], 6, 7)
    with pytest.raises(ValueError, match="does not contain"):
        edit_eval.edit_check(params, CONFIG, [1, 2, 3], [5], edit, 6, 7)


def test_command(params, tmp_path, capsys):
    checkpoint.save(tmp_path / "ckpt", params, CONFIG)
    out = tmp_path / "edit.json"
    result = edit_eval.main(["--checkpoint", str(tmp_path / "ckpt"), "--max_new_tokens", "4",
                             "--samples", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "(removed)" in printed and "greedy:" in printed and "sample 0" in printed
    assert json.loads(out.read_text())["continuations"] == result["continuations"]
    assert len(result["continuations"]["after"]["sampled"]) == 1
    # Continuations print as literals, so a run of newlines or spaces stays visible.
    greedy = result["continuations"]["before"]["greedy"][0]
    assert f"  before| 'The MacBook is made by' + {greedy!r}" in printed.splitlines()
    with pytest.raises(SystemExit):
        edit_eval.main(["--checkpoint", str(tmp_path / "ckpt"), "--remove", "MacBookPro"])
    assert capsys.readouterr().err == ("error: ' MacBookPro' is 2 tokens (' MacBook', 'Pro'); "
                                       "--remove must be one token\n")
