"""Attribution: the per-(position, sense) terms add up to the model's logit, and each term is
what removing that (position, sense) from alpha takes away."""

import json

import numpy as np
import pytest

from backpack_jax import attribution, checkpoint, interventions, model, sense_table, senses, topic
from backpack_jax.config import get_model_config

CONFIG = get_model_config("tiny")


@pytest.fixture(scope="module")
def params(random_params):
    # Scaled weights: logits of a few units, so the terms differ in sign and size.
    return random_params(CONFIG, 3, scale=4.0)


IDS = [464, 15849, 531, 326, 673, 373, 845]


@pytest.mark.parametrize("position,target", [(-1, None), (3, 673), (0, 50)])
def test_terms_sum_to_the_logit_of_model_apply(params, position, target):
    a = attribution.attribute(params, CONFIG, IDS, position, target)
    logits_SxV = np.asarray(model.apply(params, np.asarray([IDS]), CONFIG).logits[0], np.float64)
    i = position % len(IDS)
    want_target = int(np.argmax(logits_SxV[i])) if target is None else target
    assert a.position == i and a.target == want_target and a.token_ids == IDS[:i + 1]
    assert a.contributions_SxK.shape == (i + 1, CONFIG.num_senses)
    assert a.logit == pytest.approx(logits_SxV[i, want_target], rel=1e-6, abs=1e-6)
    scale = np.abs(a.contributions_SxK).sum()
    assert abs(a.contributions_SxK.sum() - logits_SxV[i, want_target]) <= 1e-5 * scale
    if i > 0:  # real spread: terms of both signs, not one repeated value
        assert a.contributions_SxK.max() > 0 > a.contributions_SxK.min()


def test_each_term_is_what_its_alpha_entry_contributes(params):
    """Zeroing alpha[l, i, j] (without renormalising) lowers the logit by exactly term [j, l]."""
    a = attribution.attribute(params, CONFIG, IDS, 5, 673)
    alpha = senses.contextualization(params, CONFIG, IDS)
    base = float(senses.run_with_contextualization(params, CONFIG, IDS, alpha)[0, 5, 673])
    for j, k in [(0, 0), (2, 3), (5, 1), (4, 2)]:
        cut = alpha.copy()
        cut[0, k, 5, j] = 0.0
        changed = float(senses.run_with_contextualization(params, CONFIG, IDS, cut)[0, 5, 673])
        assert base - changed == pytest.approx(a.contributions_SxK[j, k], rel=1e-3, abs=1e-5)


def test_under_a_sense_edit_the_terms_follow_the_edited_senses(params):
    edit = interventions.scale_senses(CONFIG, {IDS[1]: {2: 0.0}})
    a = attribution.attribute(params, CONFIG, IDS, -1, 673, sense_edit=edit)
    assert a.contributions_SxK[1, 2] == 0.0
    logit = float(model.apply(params, np.asarray([IDS]), CONFIG, sense_edit=edit).logits[0, -1,
                                                                                        673])
    assert a.contributions_SxK.sum() == pytest.approx(logit, rel=1e-5, abs=1e-5)
    control = topic.TopicControl.from_weights(np.ones((CONFIG.vocab_size, CONFIG.num_senses)))
    with pytest.raises(ValueError, match="reweights alpha"):
        attribution.attribute(params, CONFIG, IDS, -1, sense_edit=control)


def test_a_sense_table_is_accepted_and_one_wrapping_a_reweighting_edit_is_not(params):
    """A plain table rewrites senses with the model's own: the terms are those of no edit."""
    table = sense_table.build(params, CONFIG)
    plain = attribution.attribute(params, CONFIG, IDS, -1, 673)
    looked_up = attribution.attribute(params, CONFIG, IDS, -1, 673, sense_edit=table)
    assert looked_up.logit == pytest.approx(plain.logit, rel=1e-5, abs=1e-5)
    np.testing.assert_allclose(looked_up.contributions_SxK, plain.contributions_SxK,
                               rtol=1e-5, atol=1e-6)
    control = topic.TopicControl.from_weights(np.ones((CONFIG.vocab_size, CONFIG.num_senses)))
    with pytest.raises(ValueError, match=r"reweights alpha \(SenseTable\)"):
        attribution.attribute(params, CONFIG, IDS, -1, sense_edit=table.replace(then=control))
    with pytest.raises(TypeError, match="SenseEdit"):
        attribution.attribute(params, CONFIG, IDS, -1, sense_edit="not an edit")


@pytest.mark.parametrize("kwargs,message", [
    ({"token_ids": [], "position": 0}, "empty"),
    ({"token_ids": IDS, "position": 7}, "outside the text's 7 tokens"),
    ({"token_ids": IDS, "position": -8}, "outside the text's 7 tokens"),
    ({"token_ids": IDS, "position": 0, "target": CONFIG.vocab_size},
     r"token id 50264 is outside \[0, vocab_size=50264\)"),
    ({"token_ids": [1, CONFIG.vocab_size], "position": 0}, "outside"),
])
def test_errors(params, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attribution.attribute(params, CONFIG, **kwargs)


def test_command(params, tmp_path, capsys):
    checkpoint.save(tmp_path / "ckpt", params, CONFIG)
    out = tmp_path / "a.json"
    result = attribution.main(["--checkpoint", str(tmp_path / "ckpt"), "--text",
                               "The nurse said that", "--target", " she", "--top", "3",
                               "--plot", str(tmp_path / "grid.png"), "--json", str(out)])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    a = attribution.attribute(params, CONFIG, written["token_ids"], -1, written["target"])
    np.testing.assert_allclose(written["contributions"], a.contributions_SxK, rtol=1e-6)
    assert written["logit"] == pytest.approx(a.logit) and len(written["top"]) == 3
    assert [(t["position"], t["sense"]) for t in written["top"]] == [
        (j, k) for j, k, _ in attribution.top_terms(a, 3)]
    assert "' nurse' @ 1" in printed or "' said' @ 2" in printed or "'The' @ 0" in printed
    assert (tmp_path / "grid.png").stat().st_size > 0 and result["target"] == written["target"]
    with pytest.raises(SystemExit) as e:
        attribution.main(["--checkpoint", str(tmp_path / "ckpt"), "--text", "The nurse",
                          "--target", " nurse practitioner"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: ' nurse practitioner' is 2 tokens (' nurse', "
                                       "' practitioner'); --target must be one token\n")
