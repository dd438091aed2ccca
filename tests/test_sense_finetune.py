"""Sense finetuning: the alpha-mass selection against numpy, the gradient reaching only the chosen
senses, the losses and scores of the released code against numpy, a canonical fact learned
within the league, the saved edit, the ensemble formula, attribution under the edit, the command
and its errors."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import attribution, checkpoint, demo, generate, model, sense_finetune as sf
from backpack_jax.config import get_model_config
from backpack_jax.edits import SenseEdit
from backpack_jax.evals import canonical
from backpack_jax.tokenizer import get_tokenizer

CONFIG = get_model_config("tiny")
DATA = "tests/fixtures/canonical/"


@pytest.fixture(scope="module")
def params(random_params):
    return random_params(CONFIG, 3, scale=4.0)  # logits of a few units: a real spread


@pytest.fixture(scope="module")
def data():
    tok = get_tokenizer()
    return {name: sf.read_examples(DATA + f"{name}.jsonl", tok, CONFIG) for name in
            ("country_train", "country_eval", "gender_train", "gender_eval", "verb_train",
             "verb_eval", "background")}


def _alpha(params, ids):
    out = model.apply(params, np.asarray([ids]), CONFIG, return_contextualization=True)
    return np.asarray(out.contextualization[0], np.float64)  # [K, S, S]


def _mass(params, text):
    """Alpha mass per (token, sense), by explicit loops over source and query positions."""
    alpha_KxSxS = _alpha(params, list(text.ids))
    mass = {}
    for j, token in enumerate(text.ids):
        for k in range(CONFIG.num_senses):
            got = sum(alpha_KxSxS[k, i, j] for i in range(text.start, text.stop))
            mass[(token, k)] = mass.get((token, k), 0.0) + got
    return mass


@pytest.mark.parametrize("name,loss", [("country_train", "good"),
                                       ("verb_train", "good-v-bad"),
                                       ("gender_train", "balance")])
def test_selection_equals_numpy(params, data, name, loss):
    lam, k = 0.7, 6
    background = data["background"]
    bg = {}
    for ex in background:
        for key, v in _mass(params, ex.texts[0]).items():
            bg[key] = bg.get(key, 0.0) + v / len(background)
    want = {}
    for ex in data[name]:
        masses = [_mass(params, t) for t in ex.texts]
        sign = -1.0 if loss == "good-v-bad" else 1.0
        mass = dict(masses[0])
        for key, v in (masses[1].items() if len(masses) == 2 else ()):
            mass[key] = mass.get(key, 0.0) + sign * v
        # Only pairs of positive mass are candidates (the fixtures have more than k).
        scores = {key: m - lam * bg.get(key, 0.0) for key, m in mass.items() if m > 0}
        assert len(scores) > k
        for key in sorted(scores, key=lambda key: -scores[key])[:k]:
            want[key] = max(want.get(key, -np.inf), scores[key], 0.01)
    got = sf.select_senses(params, CONFIG, data[name], background, loss=loss, per_example=k,
                           lam=lam, progress=False)
    assert len(got.pairs) == len(want) and set(got.pairs) == set(want)
    np.testing.assert_allclose(got.scores, [want[p] for p in got.pairs], rtol=1e-5, atol=1e-6)
    assert got.scores == sorted(got.scores, reverse=True)
    assert min(want.values()) < max(want.values())  # scores of real spread


@flax.struct.dataclass
class _AddToSenses(SenseEdit):
    """Adds a free [B, S, K, D] tensor to the senses: its gradient is the loss's gradient with
    respect to every sense vector at every position."""

    extra_BxSxKxD: jax.Array

    def edit(self, input_ids_BxS, senses_BxSxKxD):
        return senses_BxSxKxD + self.extra_BxSxKxD


def test_gradient_reaches_only_the_chosen_senses(params, data):
    text = data["country_train"][0].texts[0]
    pairs = [(text.ids[1], 2), (text.ids[3], 0), (text.ids[3], 3)]
    batch = tuple(map(jnp.asarray, sf._padded([text], CONFIG)))
    ids = batch[0]

    def loss_of(edit):
        return sf.training_loss(lambda x: sf.edited_logits(params, CONFIG, x, edit), (batch,),
                                "good")

    delta = sf.sense_delta(CONFIG, pairs)
    grad_RxD = jax.grad(lambda d: loss_of(delta.replace(delta_RxD=d)))(delta.delta_RxD)
    zeros = jnp.zeros((1, ids.shape[1], CONFIG.num_senses, CONFIG.n_embd))
    g_SxKxD = np.asarray(jax.grad(lambda e: loss_of(_AddToSenses(e)))(zeros)[0])
    for r, (token, k) in enumerate(pairs):
        at = [s for s in range(len(text.ids)) if text.ids[s] == token]
        np.testing.assert_allclose(grad_RxD[r], g_SxKxD[at, k].sum(0), rtol=1e-5, atol=1e-7)
        assert np.abs(grad_RxD[r]).max() > 1e-4
    # Other senses have gradient too, but no parameter: training leaves them exactly as they were.
    assert np.abs(g_SxKxD[1, 0]).max() > 1e-4
    stats, states = sf.finetune(params, CONFIG, data["country_train"][:1],
                                sf.Settings(epochs=2, lr=1e-2, grad_acc_steps=1),
                                selection=sf.Selection(pairs, [1.0] * 3), progress=False)
    trained = delta.replace(delta_RxD=states[-1])
    senses = model.sense_vectors(params, CONFIG, list(text.ids))[None]
    after = np.asarray(trained.edit(jnp.asarray([text.ids]), senses)[0])
    before = np.asarray(senses[0])
    changed = np.abs(after - before).max(-1) > 0  # [S, K]
    want = np.zeros_like(changed)
    for token, k in pairs:
        want[np.asarray(text.ids) == token, k] = True
    np.testing.assert_array_equal(changed, want)
    np.testing.assert_array_equal(after[~want], before[~want])


def _nll(params, ids):
    """-log p(next token) by numpy from model.apply's logits."""
    logits = np.asarray(model.apply(params, np.asarray([ids]), CONFIG).logits[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return np.array([-logp[s, ids[s + 1]] for s in range(len(ids) - 1)])


@pytest.mark.parametrize("name,loss", [("country_eval", "good"), ("country_eval", "bad"),
                                       ("verb_eval", "good-v-bad"),
                                       ("gender_eval", "balance")])
def test_losses_and_scores_equal_numpy(params, data, name, loss):
    examples = data[name]
    per_text = [[_nll(params, list(t.ids))[t.start:t.stop] for t in ex.texts]
                for ex in examples]
    if loss in ("good", "bad"):
        train = np.mean([n[0].mean() for n in per_text]) * (1 if loss == "good" else -1)
        s = np.array([n[0].sum() for n in per_text]) * (1 if loss == "good" else -1)
    else:
        d = np.array([n[0].mean() - n[1].mean() for n in per_text])
        train = np.mean(np.abs(d) if loss == "balance" else d)
        s = np.array([n[0].sum() - n[1].sum() for n in per_text])
        s = np.abs(s) if loss == "balance" else s
    batches = tuple(tuple(map(jnp.asarray, sf._padded([ex.texts[i] for ex in examples], CONFIG)))
                    for i in range(len(examples[0].texts)))
    got = sf.training_loss(lambda x: sf.edited_logits(params, CONFIG, x, None), batches, loss)
    assert float(got) == pytest.approx(train, rel=1e-5, abs=1e-6)
    nll_fn = sf.scorer(params, CONFIG)
    assert sf.intervention_score(nll_fn, examples, CONFIG, loss, None, 2) == pytest.approx(
        s.mean(), rel=1e-5, abs=1e-4)  # abs: the pair scores are differences of sums ~50
    threshold = float(np.sort(s)[:2].mean())  # between the two lowest: one example passes
    assert sf.intervention_score(nll_fn, examples, CONFIG, loss, threshold, 2) == (
        pytest.approx((s > threshold).mean()))
    texts = [list(ex.texts[0].ids) for ex in data["background"]]
    general = np.concatenate([_nll(params, t) for t in texts]).mean()
    assert sf.text_loss(nll_fn, data["background"], CONFIG, 2) == pytest.approx(general,
                                                                                 rel=1e-5)


def test_kl_term_equals_numpy(params, data):
    text = data["background"][1].texts[0]
    batch = tuple(map(jnp.asarray, sf._padded([text], CONFIG)))
    edit = sf.sense_delta(CONFIG, [(text.ids[2], 1)], np.full((1, CONFIG.n_embd), 0.3))
    got = sf.kl_to_original(lambda x: sf.edited_logits(params, CONFIG, x, edit),
                            lambda x: sf.edited_logits(params, CONFIG, x, None), batch)
    ids = np.asarray([text.ids])

    def logp(e):
        x = np.asarray(model.apply(params, ids, CONFIG, sense_edit=e).logits[0], np.float64)
        x -= x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = logp(None), logp(edit)
    want = (np.exp(p) * (p - q)).sum()
    assert want > 1e-3 and float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("method", ["senses", pytest.param("full", marks=pytest.mark.slow)])
def test_one_step_is_adams_first_step(params, data, method):
    """One example, one epoch: the update is Adam's first, -lr g / (|g| + eps), with g the
    gradient of the suffix's mean loss written here from model.apply's logits."""
    text = data["country_train"][0].texts[0]
    ids, positions = np.asarray([text.ids]), np.arange(text.start, text.stop)
    pairs = [(text.ids[3], 0), (text.ids[5], 2)]
    delta = sf.sense_delta(CONFIG, pairs)

    def loss(p, edit):
        logp = jax.nn.log_softmax(model.apply(p, ids, CONFIG, sense_edit=edit).logits[0])
        return -logp[positions, ids[0, positions + 1]].mean()

    if method == "senses":
        g = jax.grad(lambda d: loss(params, delta.replace(delta_RxD=d)))(delta.delta_RxD)
        before, selection = delta.delta_RxD, sf.Selection(pairs, [1.0, 1.0])
    else:
        g = jax.grad(lambda p: loss(p, None))(params)
        before, selection = params, None
    lr = 1e-2
    _, states = sf.finetune(params, CONFIG, data["country_train"][:1],
                            sf.Settings(epochs=1, lr=lr, grad_acc_steps=1), selection=selection,
                            progress=False)
    moved = 0
    for got, b, grad in zip(*(map(np.asarray, jax.tree.leaves(t))
                              for t in (states[-1], before, g)), strict=True):
        # Where |g| is near Adam's eps, float noise in g decides the step: only bounded there.
        sure = np.abs(grad) > 1e-5
        np.testing.assert_allclose(got[sure], (b - lr * grad / (np.abs(grad) + 1e-8))[sure],
                                   rtol=0, atol=2e-4 * lr)
        assert np.abs(got - b).max(initial=0) <= lr * (1 + 1e-5)
        moved += int(sure.sum())
    assert moved > 100


def test_finetuning_learns_a_canonical_fact_within_the_league(params, data):
    selection = sf.select_senses(params, CONFIG, data["country_train"], data["background"],
                                 loss="good", per_example=8, lam=1000.0, progress=False)

    def evaluate(nll_fn):
        return {"intervention": sf.intervention_score(nll_fn, data["country_eval"], CONFIG,
                                                      "good", None),
                "general": sf.text_loss(nll_fn, data["background"], CONFIG)}

    stats, states = sf.finetune(params, CONFIG, data["country_train"],
                                sf.Settings(epochs=4, lr=0.2, grad_acc_steps=1, kl_weight=0.1),
                                selection=selection, background=data["background"],
                                evaluate=evaluate, progress=False)
    assert [s["epoch"] for s in stats] == [0, 1, 2, 3, 4] and states[0] is None
    initial = stats[0]
    assert stats[-1]["intervention"] < initial["intervention"] - 0.5
    pick = canonical.leagues(stats)["0.0001"]
    for row in pick.values():
        assert row["general"] < initial["general"] * (1 + 1e-4)
    assert pick["best"]["intervention"] < initial["intervention"] - 0.5


def test_saved_edit_reproduces_the_logits(params, tmp_path):
    rng = np.random.default_rng(0)
    edit = sf.sense_delta(CONFIG, [(464, 1), (3139, 0), (464, 3)],
                          rng.normal(size=(3, CONFIG.n_embd)))
    sf.save_delta(tmp_path / "d.safetensors", edit, CONFIG)
    loaded = sf.load_delta(tmp_path / "d.safetensors", CONFIG)
    ids = np.asarray([[464, 3139, 286, 464, 318]])
    want = np.asarray(model.apply(params, ids, CONFIG, sense_edit=edit).logits)
    got = np.asarray(model.apply(params, ids, CONFIG, sense_edit=loaded).logits)
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(model.apply(params, ids, CONFIG).logits)
    assert np.abs(got - plain).max() > 1e-2
    with pytest.raises(ValueError, match="sense index 3 is out of range"):
        sf.load_delta(tmp_path / "d.safetensors", CONFIG.replace(num_senses=2, n_embd=64))
    with pytest.raises(ValueError, match="expected"):
        sf.load_delta(tmp_path / "d.safetensors", CONFIG.replace(n_embd=32))


def test_attribution_under_the_edit(params):
    ids = [464, 3139, 286, 464, 318]
    edit = sf.sense_delta(CONFIG, [(464, 1)], np.full((1, CONFIG.n_embd), 0.5))
    a = attribution.attribute(params, CONFIG, ids, -1, 50, sense_edit=edit)
    logits = np.asarray(model.apply(params, np.asarray([ids]), CONFIG, sense_edit=edit).logits)
    assert a.logit == pytest.approx(float(logits[0, -1, 50]), rel=1e-5, abs=1e-5)
    assert a.contributions_SxK.sum() == pytest.approx(a.logit, rel=1e-4, abs=1e-4)


def test_the_demo_steers_with_a_saved_edit(params, tmp_path):
    edit = sf.sense_delta(CONFIG, [(464, 1), (318, 0)], np.full((2, CONFIG.n_embd), 0.5))
    sf.save_delta(tmp_path / "edit.safetensors", edit, CONFIG)
    checkpoint.save(tmp_path / "ckpt", params, CONFIG)
    d = demo.Demo.load(str(tmp_path / "ckpt"), str(tmp_path / "cache.npy"), with_table=False,
                       sense_edit=str(tmp_path / "edit.safetensors"))
    assert d.interventions[-1] == demo.LEARNED
    ids = [464, 3139, 286, 464, 318]
    want = generate.generate(params, CONFIG, [ids], 6, sense_edit=edit).new_tokens[0].tolist()
    assert list(d.stream(ids, 6, d.learned)) == want
    plain = generate.generate(params, CONFIG, [ids], 6).new_tokens[0].tolist()
    assert plain != want  # the edit changes what is generated


@pytest.mark.slow  # transformers and a GPT-2 of 50257 tokens
def test_ensemble_equals_the_formula(params, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    for p in other.parameters():  # a real spread of next-token distributions
        p.data.normal_(0, 0.5)
    other.save_pretrained(tmp_path / "other")
    other = canonical.load_other(str(tmp_path / "other"))
    edit = sf.sense_delta(CONFIG, [(464, 1), (286, 2)], np.full((2, CONFIG.n_embd), 0.4))
    ids = np.asarray([[464, 3139, 286, 464, 318, 11]])
    w = 0.7
    got = canonical.ensemble_scorer(other, params, CONFIG, edit, w)(ids)

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    with torch.no_grad():
        o = other(torch.as_tensor(ids)).logits.double().numpy()[0]
    e, u = (np.asarray(model.apply(params, ids, CONFIG, sense_edit=x).logits[0], np.float64)
            for x in (edit, None))
    combined = logsoftmax(logsoftmax(o) + w * (logsoftmax(e) - logsoftmax(u))[:, :50257])
    want = [-combined[s, ids[0, s + 1]] for s in range(ids.shape[1] - 1)]
    np.testing.assert_allclose(got[0, :-1], want, rtol=1e-4, atol=1e-4)
    alone = canonical.ensemble_scorer(other, params, CONFIG, edit, 0.0)(ids)
    assert np.abs(alone[0, :-1] - got[0, :-1]).max() > 1e-2

    # The weight: the first of 1.0, 0.9, ... whose general loss stays within the league.
    tok = get_tokenizer()
    background = sf.read_examples(DATA + "background.jsonl", tok, CONFIG)
    examples = sf.read_examples(DATA + "country_eval.jsonl", tok, CONFIG)
    loss = {}

    def general(nll_fn):
        return sf.text_loss(nll_fn, background, CONFIG)

    def evaluate(nll_fn):
        return {"intervention": sf.intervention_score(nll_fn, examples, CONFIG, "good", None),
                "general": general(nll_fn)}

    strong = sf.sense_delta(CONFIG, [(464, 1), (286, 2)], np.full((2, CONFIG.n_embd), -3.0))
    for w in range(11):
        loss[w] = general(canonical.ensemble_scorer(other, params, CONFIG, strong, w / 10))
    assert loss[10] > loss[0]
    league = (loss[10] / loss[0] - 1) / 2  # w = 1.0 is outside
    result = canonical.ensemble(other, params, CONFIG, strong, evaluate, general, league)
    want = next((w for w in range(10, 0, -1) if loss[w] < loss[0] * (1 + league)), 0)
    assert 0 < want < 10 and result["weight"] == pytest.approx(want / 10)
    assert result["edited"]["general"] == pytest.approx(loss[want], rel=1e-6)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_bad_input_is_one_clear_error(params, data, tmp_path):
    tok = get_tokenizer()
    ok = '{"prefix": "The capital of Peru is", "suffix": " Lima"}'
    cases = [
        ([ok, '{"prefix": "A", "suffix": " B"'], r"bad\.jsonl:2: not valid JSON"),
        ([ok, '{"prefix": "The capital of Chile is", "suffix": ""}'],
         r"bad\.jsonl:2: suffix '' tokenizes to nothing"),
        ([ok, '{"prompt": "x"}'], r"bad\.jsonl:2: needs 'prefix' and 'suffix'; has \['prompt'\]"),
        (['{"prompt": "x"}'], r"bad\.jsonl:1: needs 'prefix' and 'suffix1' and 'suffix2' or "),
        (['{"prefix": "", "suffix": " Lima"}'], r"bad\.jsonl:1: the prefix tokenizes to nothing"),
        ([], r"bad\.jsonl has no examples"),
    ]
    for lines, message in cases:
        with pytest.raises(ValueError, match=message):
            sf.read_examples(_write(tmp_path / "bad.jsonl", lines), tok, CONFIG)
    with pytest.raises(ValueError, match="the selection is empty"):
        sf.select_senses(params, CONFIG, data["country_train"], data["background"],
                         loss="good", per_example=0, lam=1.0)
    with pytest.raises(ValueError, match="needs two suffixes"):
        sf.select_senses(params, CONFIG, data["country_train"], data["background"],
                         loss="balance", per_example=3, lam=1.0)
    with pytest.raises(ValueError, match="the selection is empty"):
        sf.finetune(params, CONFIG, data["country_train"], sf.Settings(),
                    selection=sf.Selection([], []))
    with pytest.raises(ValueError, match="unique"):
        sf.sense_delta(CONFIG, [(5, 1), (5, 1)])


@pytest.mark.slow  # a whole run of the command
def test_command(params, tmp_path, capsys):
    checkpoint.save(tmp_path / "ckpt", params, CONFIG)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--train", DATA + "country_train.jsonl",
            "--eval", DATA + "country_eval.jsonl", "--background", DATA + "background.jsonl",
            "--out", str(out), "--epochs", "2", "--lr", "3e-2", "--grad_acc_steps", "1",
            "--senses_per_example", "4", "--lambda", "1000", "--threshold", "5.0"]
    result = canonical.main([*args, "--json", str(tmp_path / "r.json"), "--hard_negative",
                             DATA + "country_eval.jsonl", "--targeted", DATA + "background.jsonl"])
    printed = capsys.readouterr().out
    assert "selected senses" in printed and "' Peru'" in printed and "league 0.0001" in printed
    assert json.loads((out / "results.json").read_text())["leagues"] == json.loads(
        (tmp_path / "r.json").read_text())["leagues"] == result["leagues"]
    edit = sf.load_delta(out / "sense_delta.safetensors", CONFIG)
    assert edit.pairs == [(r["token"], r["sense"]) for r in result["selection"]]
    assert all(0.0 <= s["intervention"] <= 1.0 for s in result["epochs"])  # failure rates
    tok = get_tokenizer()
    hard = [ex.texts[0] for ex in sf.read_examples(DATA + "country_eval.jsonl", tok, CONFIG)]
    want = np.mean([_nll(params, list(t.ids))[t.start:t.stop].sum() for t in hard])
    initial = result["epochs"][0]
    assert initial["hard_negative"] == pytest.approx(want, rel=1e-5)
    assert initial["targeted"] == pytest.approx(initial["general"], rel=1e-6)  # same texts here
    with pytest.raises(SystemExit) as exit_info:
        canonical.main([*args[:-2], "--loss", "balance"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: loss 'balance' needs two suffixes")


def test_command_bad_file_is_one_line(params, tmp_path, capsys):
    checkpoint.save(tmp_path / "ckpt", params, CONFIG)
    bad = _write(tmp_path / "train.jsonl", ['{"prefix": "The capital of Peru is", "suffix": "."}',
                                            '{"prefix": "The capital of Chile is", "suffix": 3}'])
    with pytest.raises(SystemExit) as exit_info:
        canonical.main(["--checkpoint", str(tmp_path / "ckpt"), "--train", bad, "--eval", bad,
                        "--background", bad, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err == [f"error: {bad}:2: 'suffix' must be a string"]
