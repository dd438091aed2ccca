"""The gender bias experiment: the bias ratio, the sense-removed and fitted settings and the
Figure 3 curve against an independent computation (each prompt run on its own through
model.apply, the sense edit done on alpha instead, a plain numpy softmax), the inputs' errors,
and the command."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import checkpoint, interventions, model
from backpack_jax.config import get_model_config
from backpack_jax.evals import gender
from backpack_jax.tokenizer import get_tokenizer, single_token

CONFIG = get_model_config("tiny")  # 4 senses
SENSE = 1
TEMPLATES = ("My PROFESSION said", "The PROFESSION was with the car. When",
             "I really liked my PROFESSION. What I liked most was that,")
WORDS = ("nurse", "mechanic")


@pytest.fixture(scope="module")
def params(random_params):
    # Real spread: the embeddings and the sense network's output far above the init's 0.02.
    return random_params(CONFIG, 3, scale=8.0)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def _probs(params, config, ids, token=None, sense=None, scale=1.0):
    """Next-token probabilities after `ids`, run alone; sense `sense` of `token` scaled by
    `scale` through alpha (o = sum alpha C, so scaling alpha[sense, :, j] at the token's
    positions j is scaling that sense vector), then a float64 softmax."""
    ids_1xS = jnp.asarray([ids], jnp.int32)
    alpha = np.array(model.apply(params, ids_1xS, config,
                                 return_contextualization=True).contextualization)
    if token is not None:
        alpha[0, sense][:, np.asarray(ids) == token] *= scale
    logits = np.asarray(model.apply(params, ids_1xS, config,
                                    contextualization=jnp.asarray(alpha)).logits[0, -1],
                        np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _bias(p, he, she):
    return max(p[he] / p[she], p[she] / p[he])


def _batch(tok, config=CONFIG, words=WORDS, templates=TEMPLATES):
    jobs = gender.split_professions(words, tok)
    prompts = gender.builtin_prompts(templates, "test")
    return jobs, gender.encode_prompts(prompts, jobs, tok, config)


def test_bias_ratio_matches_each_prompt_run_alone(params, tok):
    jobs, batch = _batch(tok)
    he, she = gender.one_token_ids(gender.PRONOUNS, tok, "pronouns")
    assert len(set(batch.lengths_B.tolist())) == len(TEMPLATES)  # really right-padded
    removed = interventions.scale_senses(CONFIG,
                                         {t: {SENSE: 0.0} for t in jobs.token_ids_J.tolist()})
    got = {name: gender.bias_ratio(params, CONFIG, batch.ids_BxS, batch.lengths_B, [he, she],
                                   edit) for name, edit in (("unmodified", None),
                                                            ("removed", removed))}
    want = {"unmodified": [], "removed": []}
    for word, token in zip(WORDS, jobs.token_ids_J.tolist(), strict=True):
        for template in TEMPLATES:
            ids = tok.encode(template.replace("PROFESSION", word))
            want["unmodified"].append(_bias(_probs(params, CONFIG, ids), he, she))
            want["removed"].append(_bias(_probs(params, CONFIG, ids, token, SENSE, 0.0), he, she))
    for name in got:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4)
    assert np.std(want["unmodified"]) > 0.02 and max(want["unmodified"]) > 1.1
    assert np.abs(np.subtract(want["removed"], want["unmodified"])).min() > 1e-3
    # Batches of 4 rows (the last one padded) give the same numbers.
    np.testing.assert_allclose(gender.bias_ratio(params, CONFIG, batch.ids_BxS, batch.lengths_B,
                                                 [he, she], removed, batch_size=4),
                               got["removed"], rtol=1e-5)


def test_fitted_scale_lowers_the_objective_with_its_penalty(params, tok):
    jobs, batch = _batch(tok, templates=TEMPLATES[:2])
    pronouns = gender.one_token_ids(gender.PRONOUNS, tok, "pronouns")
    penalty = 0.005
    fit = gender.fit_scales(params, CONFIG, batch, jobs, SENSE, pronouns, penalty=penalty,
                            progress=False)
    assert (np.abs(fit.scales_J - 1.0) > 0.05).all()
    assert (fit.objective_J < fit.objective_at_one_J - 1e-3).all()
    he, she = pronouns
    for j, (word, token) in enumerate(zip(WORDS, jobs.token_ids_J.tolist(), strict=True)):
        def objective(scale, word=word, token=token):
            ratios = [_bias(_probs(params, CONFIG, tok.encode(t.replace("PROFESSION", word)),
                                   token, SENSE, scale), he, she) for t in TEMPLATES[:2]]
            return np.mean(ratios) + penalty * abs(1.0 - scale)

        s = fit.scales_J[j]
        np.testing.assert_allclose(fit.objective_J[j], objective(s), rtol=1e-4)
        np.testing.assert_allclose(fit.objective_at_one_J[j], objective(1.0), rtol=1e-4)
        assert objective(s) <= min(objective(s - 0.1), objective(s + 0.1)) + 1e-6
    # A heavy penalty keeps every scale at 1.
    stiff = gender.fit_scales(params, CONFIG, batch, jobs, SENSE, pronouns, penalty=100.0,
                              progress=False)
    np.testing.assert_allclose(stiff.scales_J, 1.0, atol=1e-3)


def test_curve_matches_independent_softmax(params, tok):
    ids = tok.encode(gender.CURVE_PROMPT)
    nurse = single_token("nurse", tok)
    pronouns = gender.one_token_ids(gender.PRONOUNS, tok, "pronouns")
    weights = [1.0, 0.7, 0.0]
    got = gender.sense_weight_curve(params, CONFIG, ids, nurse, SENSE, pronouns, weights)
    want = [_probs(params, CONFIG, ids, nurse, SENSE, w)[pronouns] for w in weights]
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert np.abs(np.log(got[-1] / got[0])).min() > 25 * 2e-4  # the weight matters


def test_default_sense_10_on_sixteen_senses(tok):
    config = CONFIG.replace(num_senses=16)
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x,
                          model.init(config, jax.random.PRNGKey(1)))
    he, she = gender.one_token_ids(gender.PRONOUNS, tok, "pronouns")
    result = gender.evaluate(params, config, tok, professions=["nurse", "carpenter"],
                             prompts=gender.builtin_prompts(TEMPLATES[:2], "test"),
                             fit_prompts=gender.builtin_prompts(TEMPLATES[2:], "test"),
                             penalty=0.005, curve_points=3, progress=False)
    assert result.sense == 10 and result.professions.words == ["nurse"]
    assert result.professions.skipped == {
        "carpenter": "' carpenter' is 2 tokens (' car', 'penter'); a profession must be one token"}
    nurse = single_token("nurse", tok)
    for setting, scale in (("unmodified", 1.0), ("removed", 0.0),
                           ("fitted", result.fit.scales_J[0])):
        want = [_bias(_probs(params, config, tok.encode(t.replace("PROFESSION", "nurse")), nurse,
                             10, scale), he, she) for t in TEMPLATES[:2]]
        np.testing.assert_allclose(result.ratios[setting][0], want, rtol=2e-4)
    curve = [_probs(params, config, tok.encode(gender.CURVE_PROMPT), nurse, 10, w)[[he, she]]
             for w in (1.0, 0.5, 0.0)]
    np.testing.assert_allclose(result.curve_weights_Y, [1.0, 0.5, 0.0])
    np.testing.assert_allclose(result.curve_probs_Yx2, curve, rtol=2e-4)
    unmodified, removed = result.mean("unmodified"), result.mean("removed")
    row = result.table().rows[result.label("removed")]
    np.testing.assert_allclose(row, [removed, 100 * (1 - (removed - 1) / (unmodified - 1))])
    # The paper's columns, as a backpack-gpt2-shaped model would show them.
    paper = result.table(paper=True).rows
    assert paper[result.label("fitted")][2:] == [2.16, 65.0]
    assert paper["Transformer (paper)"] == [None, None, 7.02, None]
    curve_rows = result.curve_table("nurse", paper=True).rows
    assert curve_rows["weight 1.00"][2:] == [0.115, 0.247]
    assert curve_rows["weight 0.50"][2:] == [None, None]


def test_reduction_is_of_the_excess_over_one():
    assert gender.reduction(2.88, 4.34) == pytest.approx(43.7, abs=0.05)  # the paper's -44%
    assert gender.reduction(2.16, 4.34) == pytest.approx(65.3, abs=0.05)  # and -65%


def test_input_errors(params, tok, tmp_path):
    with pytest.raises(ValueError, match="num_senses=4"):
        gender.evaluate(params, CONFIG, tok, professions=["nurse"], sense=4)
    bad = tmp_path / "prompts.txt"
    bad.write_text("My PROFESSION said\n\nMy nurse said\n")
    with pytest.raises(ValueError, match=rf"{bad}:3: the prompt has no PROFESSION"):
        gender.read_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"{empty}: no prompts"):
        gender.read_prompts(empty)
    start = tmp_path / "start.txt"
    start.write_text("PROFESSION said that\n")
    with pytest.raises(ValueError, match=rf"{start}:1: .*does not contain the token ' nurse'"):
        gender.encode_prompts(gender.read_prompts(start),
                              gender.split_professions(["nurse"], tok), tok, CONFIG)
    with pytest.raises(ValueError, match=r"test prompt 1: .*also contains the professions "
                                         r"\['mechanic'\]"):
        gender.encode_prompts(gender.builtin_prompts(["The PROFESSION met a mechanic"], "test"),
                              gender.split_professions(["nurse", "mechanic"], tok), tok, CONFIG)
    with pytest.raises(ValueError, match="none of the professions"):
        gender.split_professions(["carpenter", "librarian"], tok)
    with pytest.raises(ValueError, match=r"' hairdresser' is 4 tokens \(.*\); --pronouns must be "
                                         r"one token"):
        gender.one_token_ids(["he", "hairdresser"], tok, "--pronouns")
    with pytest.raises(ValueError, match="'nurse' is listed twice"):
        gender.read_words("nurse,mechanic,nurse", "--professions")
    with pytest.raises(FileNotFoundError, match="no such file"):
        gender.read_words(str(tmp_path / "missing.txt"), "--professions")
    words = tmp_path / "jobs.txt"
    words.write_text("nurse\n\n mechanic \n")
    assert gender.read_words(str(words), "--professions") == ["nurse", "mechanic"]
    with pytest.raises(ValueError, match="outside"):
        gender.bias_ratio(params, CONFIG, [[1, 2]], [2], [339, CONFIG.vocab_size])


@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("gender") / "ckpt"
    checkpoint.save(path, params, CONFIG)
    return path


def test_command_writes_the_json(ckpt, tmp_path, tok, params, capsys):
    out = tmp_path / "out.json"
    fit = tmp_path / "fit.txt"
    fit.write_text(TEMPLATES[0] + "\n")
    gender.main(["--checkpoint", str(ckpt), "--sense", str(SENSE), "--professions",
                 "nurse,carpenter,mechanic", "--fit_prompts", str(fit), "--curve_points", "3",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert ("skipped ' carpenter' is 2 tokens (' car', 'penter'); a profession must be one "
            "token") in printed
    assert "paper" not in printed  # a tiny model is not backpack-gpt2
    data = json.loads(out.read_text())
    assert data["professions"] == ["nurse", "mechanic"] and "carpenter" in data["skipped"]
    jobs = gender.split_professions(["nurse", "mechanic"], tok)
    batch = gender.encode_prompts(gender.builtin_prompts(gender.EVAL_PROMPTS, "evaluation"),
                                  jobs, tok, CONFIG)
    pronouns = gender.one_token_ids(gender.PRONOUNS, tok, "pronouns")
    want = gender.bias_ratio(params, CONFIG, batch.ids_BxS, batch.lengths_B, pronouns)
    rows = data["table"]["rows"]
    assert rows["Backpack unmodified"]["mean bias"] == pytest.approx(want.mean(), rel=1e-6)
    assert np.shape(data["ratios"]["fitted"]) == (2, len(gender.EVAL_PROMPTS))
    assert data["curve"]["weights"] == [1.0, 0.5, 0.0] and len(data["curve"]["p(she)"]) == 3


def test_command_error_is_one_line(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        gender.main(["--checkpoint", str(ckpt), "--professions", "nurse", "--sense", "10"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "sense index 10 is out of range" in err


def test_default_sense_is_the_papers_or_the_last(ckpt, capsys, monkeypatch):
    assert gender.default_sense(CONFIG.replace(num_senses=16)) == 10
    assert gender.default_sense(CONFIG) == CONFIG.num_senses - 1
    # A fit that flips the sense is warned about (the fit itself is unbounded, as the paper's).
    fit_scales = gender.fit_scales

    def flipping(*args, **kwargs):
        fit = fit_scales(*args, **kwargs)
        return dataclasses.replace(fit, scales_J=-np.abs(fit.scales_J) - 1.0)

    monkeypatch.setattr(gender, "fit_scales", flipping)
    result = gender.main(["--checkpoint", str(ckpt), "--professions", "nurse",
                          "--curve_points", "2"])
    assert result["sense"] == CONFIG.num_senses - 1
    assert "warning: 1 fitted scale(s) are negative, which flips the sense (nurse -" in (
        capsys.readouterr().out)


@pytest.mark.slow
def test_command_in_a_subprocess(ckpt, tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "fig3.png"
    run = subprocess.run([sys.executable, "-m", "backpack_jax.evals.gender", "--checkpoint",
                          str(ckpt), "--sense", str(SENSE), "--professions", "nurse,mechanic",
                          "--json", str(out), "--plot", str(png)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "mean bias" in run.stdout and png.stat().st_size > 1000
    data = json.loads(out.read_text())
    assert len(data["curve"]["weights"]) == gender.CURVE_POINTS
    assert set(data["table"]["rows"]) == {"Backpack unmodified", "sense 1 removed (scale 0)",
                                          "sense 1 scaled by a fitted factor"}
