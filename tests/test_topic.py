"""The paper's topic control: scores, quantile groups and annealed weights against numpy
computations written here, cached generation against the full pass under annealing, the
non-annealed variant, errors, and the benchmark row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import generate, interventions, model, topic
from backpack_jax.config import get_model_config
from backpack_jax.tokenizer import get_tokenizer
from bench import report, topic as bench_topic

SMALL = get_model_config("tiny").replace(vocab_size=512, bos_token_id=0, eos_token_id=0)
PROMPTS = [[5, 17, 300, 42, 9, 101, 7], [250, 3], [77, 410, 12, 64]]
N_NEW = 8


@pytest.fixture(scope="module")
def params(random_params):
    # Real spread: embeddings and sense vectors well above the init's 0.02.
    return random_params(SMALL, 2, scale=4.0)


def embedding(params):
    return np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"], np.float64)


def all_senses(params):
    """[V, K, D] sense vectors of the whole (small) vocabulary, in float64."""
    return np.asarray(model.sense_vectors(params, SMALL, range(SMALL.vocab_size)), np.float64)


@pytest.fixture(scope="module")
def control(params):
    """Random initial weights, and an annealing scale large enough for w to spread in (0, 1)."""
    delta = np.random.default_rng(0).uniform(1.0, 3.3, (SMALL.vocab_size, SMALL.num_senses))
    return topic.TopicControl(delta_VxK=jnp.asarray(delta, jnp.float32),
                              annealing_scale=jnp.float32(15.0))


# ------------------------------------------------------------------------------------ scores

def test_scores_are_the_bag_logit_over_the_largest_logit(params, monkeypatch):
    bags = [[3, 77, 250], [300], [3, 3, 511]]  # a repeated id counts once
    logits_VxKxV = np.einsum("xkd,ud->xku", all_senses(params), embedding(params))
    want_max = logits_VxKxV.max(-1)
    want = np.stack([logits_VxKxV[..., sorted(set(b))].sum(-1) / want_max for b in bags])
    assert want.std() > 0.1 and (want > 0).mean() > 0.2 and (want < 0).mean() > 0.2

    monkeypatch.setattr(topic, "SCORE_ROWS", 4 * 100)  # chunks of 100 tokens; the last shifted
    max_VxK = topic.sense_max_logits(params, SMALL, progress=False)
    np.testing.assert_allclose(max_VxK, want_max, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(topic.sense_max_logits(params, SMALL, start=250, stop=260,
                                                      progress=False), want_max[250:260],
                               rtol=1e-4, atol=1e-4)
    scores = topic.topic_scores(params, SMALL, bags, progress=False)
    np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-4)
    # With the denominators given, the same scores; `zero_from` zeroes the last tokens.
    again = topic.topic_scores(params, SMALL, bags, max_logits_VxK=max_VxK, zero_from=500,
                               progress=False)
    np.testing.assert_allclose(again[:, :500], scores[:, :500], rtol=1e-5, atol=1e-6)
    assert (again[:, 500:] == 0).all() and (scores[:, 500:] != 0).all()


def quantile(values, q):
    """The linear-interpolation quantile of sorted values, written out."""
    s = np.sort(values.ravel())
    h = (len(s) - 1) * q
    lo = int(np.floor(h))
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


@pytest.mark.parametrize("strength", [1, 2, 3])
def test_quantile_groups_get_the_strengths_weights(strength):
    scores = np.random.default_rng(strength).standard_normal((SMALL.vocab_size, 4))
    delta = topic.sense_weights(scores, strength)
    d0, d1, d2, d3 = {1: (1.5, 1.5, 1.3, 1.0), 2: (2.2, 2.2, 1.5, 1.0),
                      3: (3.3, 3.3, 3.0, 1.0)}[strength]
    q95, q80, q60 = (quantile(scores, q) for q in (0.95, 0.80, 0.60))
    want = np.where(scores > q95, d0, np.where(scores > q80, d1, np.where(scores > q60, d2, d3)))
    np.testing.assert_array_equal(delta, want.astype(np.float32))
    n = scores.size
    assert abs((scores > q95).sum() - 0.05 * n) <= 1 and abs((scores > q60).sum() - 0.4 * n) <= 1
    assert (topic.sense_weights(scores, 0) == 1).all()
    np.testing.assert_array_equal(topic.sense_weights(scores, (4, 3, 2, 0.5)),
                                  np.where(scores > q95, 4, np.where(
                                      scores > q80, 3, np.where(scores > q60, 2, 0.5))))


def test_bags_are_single_tokens_with_a_leading_space():
    tok = get_tokenizer()
    ids, skipped = topic.bag_token_ids(topic.TOPICS["diaries_daily_life"], tok)
    assert skipped == {"diaries": "' diaries' is 2 tokens (' di', 'aries'); a word of a topic's "
                                  "bag must be one token"}
    assert ids == sorted([tok.encode(" daily")[0], tok.encode(" life")[0]])
    for words in topic.TOPICS.values():
        assert topic.bag_token_ids(words, tok)[0]
    with pytest.raises(ValueError, match="bag is empty"):
        topic.bag_token_ids(["diaries", "Backpack"], tok)


# --------------------------------------------------------------------------------- annealing

def annealed_logits(params, control, ids_BxS, alpha_BxKxSxS, senses_BxKxSxD):
    """The paper's output with annealed weights, from alpha and the senses apply returns:
    a[l,i,j] = sum_{m<=i} relu(C(x_j)_l . E[x_m]), w = sigmoid(6 - f a) (1 + j/100),
    delta' = w delta + 1 - w, o_i = sum_j sum_l alpha delta' C(x_j)_l, logits E o."""
    e_VxD = embedding(params)
    delta_VxK = np.asarray(control.delta_VxK, np.float64)
    f = float(control.annealing_scale)
    B, K, S, _ = senses_BxKxSxD.shape
    a = np.zeros((B, K, S, S))  # [b, l, i, j]
    for b in range(B):
        for i in range(S):
            for j in range(S):
                for m in range(i + 1):
                    a[b, :, i, j] += np.maximum(senses_BxKxSxD[b, :, j] @ e_VxD[ids_BxS[b, m]],
                                                0)
    w = 1 / (1 + np.exp(-(6 - f * a))) * (1 + np.arange(S) / 100)
    delta = np.stack([delta_VxK[ids_BxS[b]].T for b in range(B)])[:, :, None, :]  # [B, K, 1, S]
    weights = w * delta + 1 - w
    o = np.einsum("bkij,bkjd->bid", alpha_BxKxSxS * weights, senses_BxKxSxD)
    return o @ e_VxD.T, w


def test_annealed_apply_follows_the_formula(params, control):
    ids = np.array([[5, 17, 300, 17, 9, 101, 7, 42, 250, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    out = model.apply(params, ids, SMALL, sense_edit=control, return_contextualization=True,
                      return_senses=True)
    plain = model.apply(params, ids, SMALL, return_contextualization=True, return_senses=True)
    # The edit leaves the senses and the model's alpha alone: it reweights alpha inside.
    np.testing.assert_array_equal(out.senses, plain.senses)
    np.testing.assert_array_equal(out.contextualization, plain.contextualization)
    want, w = annealed_logits(params, control, ids, np.asarray(out.contextualization, np.float64),
                              np.asarray(out.senses, np.float64))
    assert w.min() < 0.3 and w.max() > 0.9  # the annealing is not saturated either way
    np.testing.assert_allclose(out.logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(np.asarray(out.logits) - np.asarray(plain.logits)).max() > 1e-2


def test_fixed_weights_are_a_sense_intervention(params, control):
    ids = np.array([[5, 17, 300, 17, 9, 101]])
    fixed = control.fixed(SMALL)
    assert isinstance(fixed, interventions.SenseIntervention)
    out = model.apply(params, ids, SMALL, sense_edit=fixed, return_contextualization=True,
                      return_senses=True)
    plain = model.apply(params, ids, SMALL, return_contextualization=True, return_senses=True)
    delta_SxK = np.asarray(control.delta_VxK)[ids[0]]
    np.testing.assert_allclose(out.senses[0], plain.senses[0] * delta_SxK.T[..., None],
                               rtol=1e-6, atol=1e-6)
    alpha = np.asarray(plain.contextualization[0], np.float64)
    o = np.einsum("kij,kjd->id", alpha * delta_SxK.T[:, None, :],
                  np.asarray(plain.senses[0], np.float64))
    np.testing.assert_allclose(out.logits[0], o @ embedding(params).T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        control.fixed(SMALL.replace(num_senses=8))


def full_pass_logits(params, out, edit):
    """Each row's logits from one model.apply over its prompt and new tokens (unpadded)."""
    return [np.asarray(model.apply(params, np.array([seq[:-1]]), SMALL, sense_edit=edit)
                       .logits[0, n - 1:]) for seq, n in zip(out.sequences(), out.prompt_lengths,
                                                            strict=True)]


def test_cached_generation_equals_the_full_pass_under_annealing(params, control):
    """Left-padded prompts of different lengths: each step's annealing, updated in the cache,
    must give the logits of a full pass over the prefix that counts j from the row's start."""
    out = generate.generate(params, SMALL, PROMPTS, N_NEW, return_logits=True,
                            sense_edit=control)
    assert out.tokens[1, :5].tolist() == [SMALL.eos_token_id] * 5  # left padding
    for b, full in enumerate(full_pass_logits(params, out, control)):
        np.testing.assert_allclose(out.logits[b], full, rtol=1e-4,
                                   atol=1e-4 * np.abs(full).max())
    plain = generate.generate(params, SMALL, PROMPTS, N_NEW, return_logits=True)
    assert np.abs(out.logits[:, 0] - plain.logits[:, 0]).max() > 1e-2
    fixed = generate.generate(params, SMALL, PROMPTS, N_NEW, return_logits=True,
                              sense_edit=control.fixed(SMALL))
    assert np.abs(out.logits[:, 0] - fixed.logits[:, 0]).max() > 1e-2  # the annealing acts


def test_streaming_carries_the_annealing_state_like_the_device_loop(params, control):
    options = dict(temperature=1.0, rng=jax.random.PRNGKey(4), return_logits=True,
                   sense_edit=control)
    steps = list(generate.stream(params, SMALL, PROMPTS, N_NEW, **options))
    out = generate.generate(params, SMALL, PROMPTS, N_NEW, **options)
    np.testing.assert_array_equal(np.stack([s.tokens for s in steps], 1), out.new_tokens)
    np.testing.assert_allclose(np.stack([s.logits for s in steps], 1), out.logits, rtol=1e-5,
                               atol=1e-5)


def test_one_call_topic_control(params):
    control = topic.topic_control(params, SMALL, [3, 77, 250], 3, progress=False)
    scores = topic.topic_scores(params, SMALL, [[3, 77, 250]], progress=False)[0]
    np.testing.assert_array_equal(control.delta_VxK, topic.sense_weights(scores, 3))
    assert float(control.annealing_scale) == pytest.approx(3.3 / 7.5)


@pytest.mark.parametrize("call, message", [
    (lambda p: topic.sense_max_logits(p, SMALL, start=10, stop=10), "is empty or outside"),
    (lambda p: topic.sense_max_logits(p, SMALL, stop=513), "is empty or outside"),
    (lambda p: topic.topic_scores(p, SMALL, [[]]), "at least one token"),
    (lambda p: topic.topic_scores(p, SMALL, [[512]]), "token id 512 is outside"),
    (lambda p: topic.topic_scores(p, SMALL, [[1]], max_logits_VxK=np.ones((3, 4))),
     "expected (512, 4)"),
    (lambda p: topic.sense_weights(np.ones((4, 4)), 4), "strength 4 is not one of"),
    (lambda p: topic.sense_weights(np.ones((4, 4)), (2, 1)), "four group weights"),
])
def test_errors(params, call, message):
    with pytest.raises(ValueError) as error:
        call(params)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------- benchmark

def test_bench_row_for_the_scoring():
    config = get_model_config("tiny")
    params = model.init(config, jax.random.PRNGKey(0))
    gemms = iter([50.0, 120.0])
    result = bench_topic.run(config, params, 64, repeats=1, gemm_probe=lambda: next(gemms))
    assert result["gemm_gflops"] == 120.0 and result["tokens"] == 64
    assert result["vocabulary_s"] == pytest.approx(config.vocab_size / result["tokens_per_s"])
    d, k, scale = config.n_embd, config.num_senses, config.sense_intermediate_scale
    sense_network = 2 * d * 4 * d + d * scale * d + scale * d * k * d
    per_token = 2 * (k * config.vocab_size * d + sense_network)
    assert bench_topic.flops_per_token(config) == per_token
    machine = {"cpu": "test", "cores": 2, "platform": "cpu", "device": "cpu",
               "gemm_gflops": 100.0, "torch_gemm_gflops": 90.0, "read_gbps": 10.0,
               "read_burst_gbps": 12.0}
    table = report.markdown({"machine": machine, "forward": {"config": "tiny", "runs": [],
                                                               "topic_scores": result}})
    bound = 120.0 * 1e9 / per_token  # the best GEMM rate measured around the turns
    row = next(line for line in table.splitlines() if line.startswith("| topic scores"))
    assert row.startswith("| topic scores V=50264 K=4 fp32 (sense max logits) |")
    assert f"| {bound:,.1f} (at 120 GFLOP/s) |" in row
    share = result["tokens_per_s"] / bound
    assert f"| {100 * share:.0f}% (vocabulary" in row
    assert row.endswith("| met |" if share >= 1 / 1.5 else "| **missed** |")
    assert "topic scores first call" in table
