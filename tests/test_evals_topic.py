"""The topic-control command: toks-in-vocab and semantic success recounted here from the samples
it writes, with stub classifiers written in this file and a tiny local Hugging Face classifier;
the score cache; and its errors."""

import json
import subprocess
import sys
import textwrap
import zlib

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, generate, model, topic
from backpack_jax.config import get_model_config
from backpack_jax.evals import topic as topic_eval
from backpack_jax.tokenizer import get_tokenizer
from tests.hub_cache import cache_repo, offline_env

# tiny, narrower: the GPT-2 vocabulary, and a quick V*K*V*D scoring.
CONFIG = get_model_config("tiny").replace(n_embd=32, n_head=2, num_senses=2)
TOPICS = ["sports", "news_social_concern"]
# tweet-topic-21-multi's labels: 19, with "&", two of them not among the paper's topics.
HF_LABELS = ["sports", "diaries_&_daily_life", "fitness_&_health", "family",
             "youth_&_student_life", "gaming", "relationships", "news_&_social_concern",
             "learning_&_educational", "celebrity_&_pop_culture", "travel_&_adventure",
             "food_&_dining", "business_&_entrepreneurs", "science_&_technology",
             "fashion_&_style", "music", "other_hobbies", "film_tv_&_video", "arts_&_culture"]
STUB = textwrap.dedent('''
    """Stub topic classifiers for the tests: bag-word hits plus a hash of the text."""
    import zlib

    import numpy as np

    from backpack_jax import topic

    LABELS = {LABELS!r}


    def _key(label):
        return label.replace("_&_", "_")


    def keywords(texts):
        """{{label: prob}}: a third per bag word in the text, plus up to a half from its hash."""
        out = []
        for text in texts:
            words = text.split()
            noise = zlib.crc32(text.encode()) % 100 / 200
            out.append({{label: min(1.0, sum(w in words for w in topic.TOPICS.get(
                _key(label), ())) / 3 + noise) for label in LABELS}})
        return out


    def as_array(texts):
        """[N, 17] in the paper's topic order, from a hash of text and topic."""
        return np.array([[zlib.crc32((text + name).encode()) % 100 / 100
                          for name in topic.TOPICS] for text in texts])


    not_callable = 3
''').format(LABELS=HF_LABELS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small random model with real spread whose samples contain the topics' bag words now and
    then (a random model almost never draws one of 50264 tokens): their embeddings get a push
    along the model's mean output o, so that E[w] . o is often high."""
    params = model.init(CONFIG, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 4.0 if x.ndim == 2 else x, params)
    start = generate.generate(params, CONFIG, [[50256]] * 6, 12, temperature=1.0,
                              rng=jax.random.PRNGKey(1))
    out = model.apply(params, start.tokens, CONFIG, return_contextualization=True,
                      return_senses=True)
    o_D = np.einsum("bkij,bkjd->d", np.asarray(out.contextualization), np.asarray(out.senses))
    tok = get_tokenizer()
    bag = [i for name in TOPICS for i in topic.bag_token_ids(topic.TOPICS[name], tok)[0]]
    wte = np.array(params["backpack"]["gpt2_model"]["wte"]["embedding"])
    wte[bag] += 30.0 * o_D / np.linalg.norm(o_D)
    params["backpack"]["gpt2_model"]["wte"]["embedding"] = wte
    path = tmp_path_factory.mktemp("topic") / "ckpt"
    checkpoint.save(path, params, CONFIG)
    cache = path.parent / "max_logits.npy"
    np.save(cache, topic.sense_max_logits(params, CONFIG, progress=False))
    return str(path), str(cache), params


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stub")
    (directory / "topic_stub.py").write_text(STUB)
    sys.path.insert(0, str(directory))
    import topic_stub

    yield topic_stub
    sys.path.remove(str(directory))
    del sys.modules["topic_stub"]


def run(ckpt, tmp_path, *flags):
    path, cache, _ = ckpt
    samples, out = tmp_path / "samples.jsonl", tmp_path / "topic.json"
    result = topic_eval.main(["--checkpoint", path, "--topics", ",".join(TOPICS),
                              "--samples", "6", "--max_new_tokens", "12", "--batch", "3",
                              "--score_cache", cache, "--samples_out", str(samples),
                              "--json", str(out), *flags])
    assert json.loads(out.read_text())["per_topic"] == result["per_topic"]
    return result, [json.loads(line) for line in samples.read_text().splitlines()]


def recount(records, classify_probs):
    """Per (topic, strength): toks-in-vocab and semantic success from the JSONL records alone;
    strength 0's records (topic null) serve every topic."""
    tok = get_tokenizer()
    counts = {}
    for name in TOPICS:
        bag = set(topic.bag_token_ids(topic.TOPICS[name], tok)[0])
        for s in (0, 1, 3):
            rows = [r for r in records if r["strength"] == s
                    and r["topic"] == (None if s == 0 else name)]
            assert len(rows) == 6
            ids = [i for r in rows for i in r["token_ids"]]
            probs = classify_probs([r["text"] for r in rows], name)
            counts[name, s] = (sum(i in bag for i in ids) / len(ids),
                               sum(p > 0.5 for p in probs) / len(rows))
    return counts


def test_metrics_equal_counts_from_the_written_samples(ckpt, stub, tmp_path, capsys):
    result, records = run(ckpt, tmp_path, "--strengths", "0,1,3", "--classifier",
                          "topic_stub:keywords", "--plot", str(tmp_path / "topic.png"))
    assert len(records) == 6 * (1 + 2 * len(TOPICS))
    tok = get_tokenizer()
    for r in records:
        assert len(r["token_ids"]) == 12
        assert r["text"] == tok.decode([i for i in r["token_ids"] if i < tok.n_vocab])

    def probs(texts, name):
        label = HF_LABELS[[label.replace("_&_", "_") for label in HF_LABELS].index(name)]
        return [d[label] for d in stub.keywords(texts)]

    counts = recount(records, probs)
    values = []
    for (name, s), (tiv, sem) in counts.items():
        got = result["per_topic"][name][str(s)]
        assert got["toks_in_vocab"] == pytest.approx(tiv)
        assert got["semantic_success"] == pytest.approx(sem)
        values += [tiv, sem]
    assert any(0 < v < 1 for v in values[0::2]) and any(0 < v < 1 for v in values[1::2])
    rows = result["table"]["rows"]
    assert list(rows) == ["unchanged", "+1", "+3"]
    assert rows["+3"]["toks-in-vocab"] == pytest.approx(np.mean([counts[n, 3][0]
                                                                for n in TOPICS]))
    assert rows["unchanged"]["semantic success"] == pytest.approx(np.mean(
        [counts[n, 0][1] for n in TOPICS]))
    assert "paper MAUVE" not in result["table"]["columns"]  # not backpack-gpt2's shape
    assert (tmp_path / "topic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "read the sense max logits from" in printed and "| semantic success |" in printed


def test_array_classifier_and_fixed_weights(ckpt, stub, tmp_path):
    annealed = {(r["topic"], tuple(r["token_ids"])) for r in run(
        ckpt, tmp_path, "--strengths", "3")[1]}
    result, records = run(ckpt, tmp_path, "--strengths", "3", "--no_anneal", "--classifier",
                          "topic_stub:as_array")
    assert {(r["topic"], tuple(r["token_ids"])) for r in records} != annealed
    order = list(topic.TOPICS)

    def probs(texts, name):
        return stub.as_array(texts)[:, order.index(name)]

    for name in TOPICS:
        rows = [r for r in records if r["topic"] == name]
        want = np.mean(probs([r["text"] for r in rows], name) > 0.5)
        assert result["per_topic"][name]["3"]["semantic_success"] == pytest.approx(want)
    assert result["settings"]["anneal"] is False


def test_without_a_classifier_semantic_success_is_na(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(topic_eval.cli, "is_backpack_gpt2", lambda config: True)
    result, _ = run(ckpt, tmp_path, "--strengths", "0,2")
    rows = result["table"]["rows"]
    assert rows["unchanged"]["semantic success"] is None
    assert result["per_topic"]["sports"]["2"]["semantic_success"] is None
    printed = capsys.readouterr().out
    assert "semantic success: n/a" in printed
    # The paper's rows beside ours when the model has backpack-gpt2's shape.
    assert (rows["unchanged"]["paper semantic"], rows["unchanged"]["paper toks-in-vocab"],
            rows["unchanged"]["paper MAUVE"]) == (0.074, 0.0, 0.92)
    assert (rows["+2"]["paper semantic"], rows["+2"]["paper MAUVE"]) == (0.243, 0.90)
    assert "| paper MAUVE" in printed


def test_hugging_face_classifier_directory(tmp_path):
    """A tiny random sequence-classification model saved locally, read through the pipeline:
    the probabilities are the sigmoids of its logits for the named topics."""
    torch = pytest.importorskip("torch")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "[PAD]": 1, "music": 2, "sports": 3, "the": 4}
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                               pad_token="[PAD]")
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=8, max_position_embeddings=32, num_labels=len(HF_LABELS),
        id2label=dict(enumerate(HF_LABELS)), problem_type="multi_label_classification",
        initializer_range=1.0)
    torch.manual_seed(0)
    classifier_model = transformers.BertForSequenceClassification(config).eval()
    model_dir = tmp_path / "classifier"
    classifier_model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    texts = ["the music", "sports sports the", "unknown words"]
    probs = topic_eval.topic_probabilities(topic_eval.load_classifier(str(model_dir)), texts,
                                           ["music", "sports", "arts_culture"])
    with torch.no_grad():
        logits = np.stack([classifier_model(**tok(t, return_tensors="pt")).logits[0].numpy()
                           for t in texts])
    columns = [HF_LABELS.index(label) for label in ("music", "sports", "arts_&_culture")]
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits[:, columns])), rtol=1e-5)
    assert (probs > 0.5).any() and (probs < 0.5).any()

    # The same model taken by Hub id (and @revision) from huggingface_hub's cache, offline.
    home = tmp_path / "home"
    cache_repo(home, "org/topics", {"c" * 40: model_dir}, {"main": "c" * 40, "v2": "c" * 40})
    script = ("import json, sys; from backpack_jax.evals import topic as t; "
              "print(json.dumps([t.topic_probabilities(t.load_classifier(spec), "
              f"{texts!r}, ['music', 'sports', 'arts_culture']).tolist() "
              "for spec in ('org/topics', 'org/topics@v2')]))")
    done = subprocess.run([sys.executable, "-c", script], env=offline_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for by_id in json.loads(done.stdout.strip().splitlines()[-1]):
        np.testing.assert_allclose(by_id, probs, rtol=1e-5)


def test_score_cache_is_written_then_checked(ckpt, tmp_path):
    path, cache, params = ckpt
    new = tmp_path / "new.npy"
    max_VxK = topic.cached_max_logits(params, CONFIG, new, progress=False)
    np.testing.assert_array_equal(np.load(new), max_VxK)
    np.testing.assert_array_equal(np.load(cache), max_VxK)
    assert [p.name for p in tmp_path.iterdir()] == ["new.npy"]  # no temporary left behind
    np.save(new, max_VxK[:, :1])
    with pytest.raises(ValueError, match=r"shape \(50264, 1\); this model needs"):
        topic.cached_max_logits(params, CONFIG, new)
    other = max_VxK.copy()
    other[-1] += 1.0
    np.save(new, other)
    with pytest.raises(ValueError, match="computed for other weights: token 50263"):
        topic.cached_max_logits(params, CONFIG, new)
    new.write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        topic.cached_max_logits(params, CONFIG, new)


def test_topic_probabilities_errors(stub):
    with pytest.raises(ValueError, match="shape"):
        topic_eval.topic_probabilities(lambda texts: np.zeros((len(texts), 3)), ["a"], ["music"])
    with pytest.raises(ValueError, match="no probability for topic 'music'"):
        topic_eval.topic_probabilities(lambda texts: [{"sports": 1.0}], ["a"], ["music"])
    got = topic_eval.topic_probabilities(stub.as_array, ["a", "b"], ["music", "family"])
    np.testing.assert_allclose(got, [[zlib.crc32(f"{t}{n}".encode()) % 100 / 100
                                      for n in ("music", "family")] for t in "ab"])


@pytest.mark.parametrize("flags, message", [
    (["--topics", "sports,cooking"], "unknown topic(s) ['cooking']"),
    (["--strengths", "1,4"], "each must be one of the paper's [0, 1, 2, 3]"),
    (["--strengths", "one"], "comma-separated integers"),
    (["--classifier", "nonsense"], "neither module:callable nor a directory"),
    (["--classifier", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--classifier", "topic_stub:not_callable"], "has no callable 'not_callable'"),
    (["--samples", "0"], "must be >= 1"),
])
def test_errors_name_the_problem(ckpt, stub, flags, message, capsys):
    with pytest.raises(SystemExit):
        topic_eval.main(["--checkpoint", ckpt[0], *flags])
    assert message in capsys.readouterr().err
