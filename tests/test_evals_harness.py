"""The lm-evaluation-harness model `backpack-jax`: log-likelihoods, rolling log-likelihoods and
generation against direct computations from `model.apply` (numpy log-softmax) and
`generate.generate`, and offline local tasks run through lm-eval itself, whose accuracy and
perplexities must equal the ones computed here."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import checkpoint, model
from backpack_jax.config import get_model_config
from backpack_jax.evals import harness
from backpack_jax.tokenizer import get_tokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "harness"
CONFIG = get_model_config("tiny")  # n_positions 128
L = CONFIG.n_positions
TOK = get_tokenizer()
EOT = TOK.eot_id


@pytest.fixture(scope="module")
def params(random_params):
    # Real spread: embeddings and the sense network's output well above the init's 0.02.
    return random_params(CONFIG, 5, scale=4.0)


@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("harness") / "ckpt"
    checkpoint.save(path, params, CONFIG)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    # 3 rows per batch: several batches, the last one shifted back over the one before.
    return harness.BackpackHarnessLM.create_from_arg_string(f"checkpoint={ckpt},batch_size=3")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No downloads, and the datasets cache in a temporary directory."""
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.chdir(tmp_path)  # The task YAMLs must find their data from any directory.


# ---------------------------------------------------------------------- direct computations

def _logprobs(params, ids):
    """log-softmax [S, V] of the model's logits for `ids`, in float64. The model is causal, so
    the ids are padded to n_positions on the right (one shape compiles) and the padding's
    logits dropped."""
    padded = np.full((1, L), EOT, np.int32)
    padded[0, :len(ids)] = ids
    logits = np.asarray(model.apply(params, jnp.asarray(padded), CONFIG).logits[0, :len(ids)],
                        np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _scored(params, ids, n):
    """(sum of log p of the last n tokens of ids, whether each was the argmax)."""
    logp = _logprobs(params, ids[:-1])[len(ids) - 1 - n:]
    targets = np.asarray(ids[len(ids) - n:])
    return logp[np.arange(n), targets].sum(), bool((logp.argmax(axis=-1) == targets).all())


def _loglikelihood(params, context, continuation):
    """The harness convention, directly: whitespace ending the context belongs to the
    continuation, whose tokens are the whole text's after the context's; <|endoftext|> stands
    for an empty context; the last n_positions + 1 tokens are kept."""
    n = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - n], context[len(context) - n:] + continuation
    context_ids = TOK.encode(context) if context else [EOT]
    continuation_ids = (TOK.encode(context + continuation)[len(context_ids):] if context
                        else TOK.encode(continuation))
    ids = (context_ids + continuation_ids)[-(L + 1):]
    return _scored(params, ids, len(continuation_ids))


def _greedy_text(params, context, n):
    """n greedy tokens after `context` from model.apply, as text that re-encodes to them."""
    ids = TOK.encode(context)
    for _ in range(n):
        ids.append(int(_logprobs(params, ids)[-1].argmax()))
    new = ids[len(ids) - n:]
    if max(new) >= TOK.n_vocab:
        return None
    text = TOK.decode(new)
    return text if TOK.encode(context + text)[len(ids) - n:] == new else None


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# ----------------------------------------------------------------------------------- tests

def test_loglikelihood_equals_model_apply(params, lm):
    long_context = " ".join(["The harness keeps the end of a long context."] * 20)
    assert len(TOK.encode(long_context)) > L
    greedy = [(c, t) for c in ("The", "In 1990, the city of", "def main():", "Hello")
              if (t := _greedy_text(params, c, 3)) is not None]
    assert greedy, "no greedy continuation round-trips through the tokenizer"
    pairs = [("The capital of France is", " Paris"), ("", "Hello world"),
             ("Water freezes at ", "zero degrees"),  # the space moves to the continuation
             ("A", " b c d e f g h i j k l m n o p"), (long_context, " and the continuation"),
             *greedy]
    got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    want = [_loglikelihood(params, c, t) for c, t in pairs]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[1] for g in got] == [False] * 5 + [True] * len(greedy)
    assert len({round(g[0], 3) for g in got}) == len(got)


def test_rolling_windows_are_lm_evals():
    for n in (1, 5, 7, 8, 9, 16, 19, 30):
        ids = list(range(100, 100 + n))
        want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, EOT, 8, 1)]
        # lm-eval's (context, predicted) pairs are our (sequence, how many scored at its end).
        assert harness.rolling_windows(ids, 8, EOT) == [(list(c) + list(p), len(p))
                                                         for c, p in want], n
    assert harness.rolling_windows([], 8, EOT) == []


def test_loglikelihood_rolling_equals_model_apply(params, lm):
    texts = ["", "A short document.", "The quick brown fox jumps over the lazy dog.",
             " ".join(["Python's standard library is very extensive."] * 40)]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]),
                                   disable_tqdm=True)
    for text, value in zip(texts, got, strict=True):
        ids = TOK.encode(text)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, EOT, L, 1)]
        want = sum(_scored(params, list(c) + list(p), len(p))[0] for c, p in windows)
        assert value == pytest.approx(want, rel=1e-5)
    assert got[0] == 0 and len(TOK.encode(texts[3])) > 2 * L
    # A text is scored from <|endoftext|>, as loglikelihood("", text) is.
    assert got[2] == pytest.approx(_loglikelihood(params, "", texts[2])[0], rel=1e-5)


def test_generate_until_equals_greedy_decoding(params, lm):
    # One left-padded batch of 3 (the fixture's batch size); the last prompt is too long.
    prompts = ["Once upon a time", "The", " ".join(["a long prompt"] * 60)]
    max_new = 12

    def greedy(prompt):  # model.apply token by token; a context too long loses its start.
        ids = TOK.encode(prompt)[-(L - max_new):]
        new = []
        while len(new) < max_new and EOT not in new:
            new.append(int(_logprobs(params, ids + new)[-1].argmax()))
        return TOK.decode([t for t in new if t < TOK.n_vocab and t != EOT])

    full = [greedy(p) for p in prompts]
    assert len(TOK.encode(prompts[-1])) > L and len(set(full)) == len(full)
    got = lm.generate_until(_requests("generate_until", [(p, {"max_gen_toks": max_new})
                                                          for p in prompts]), disable_tqdm=True)
    assert got == full
    # A stop string from the middle of the first text cuts it there (and any other holding it).
    stop = full[0][len(full[0]) // 2:len(full[0]) // 2 + 2]
    kwargs = {"until": [stop, "never occurs"], "max_gen_toks": max_new}
    got = lm.generate_until(_requests("generate_until", [(p, kwargs) for p in prompts]),
                            disable_tqdm=True)
    assert got == [text.split(stop)[0] for text in full] and len(got[0]) < len(full[0])
    # Sampling follows the request's arguments and the model's seed: repeatable, not greedy.
    kwargs = {"do_sample": True, "temperature": 1.0, "max_gen_toks": max_new}
    sampled = [lm.generate_until(_requests("generate_until", [(p, kwargs) for p in prompts]),
                                 disable_tqdm=True) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != full


def test_model_args(ckpt):
    cls = harness.BackpackHarnessLM
    lm = cls.create_from_arg_string(f"checkpoint={ckpt},batch_size=5,max_length=64",
                                    {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length) == (5, 64)  # model_args win over the CLI's flags
    assert cls.create_from_arg_string(f"checkpoint={ckpt}", {"batch_size": "auto",
                                                            "max_batch_size": 7}).batch_size == 7
    with pytest.raises(ValueError, match="needs model_args checkpoint=DIR"):
        cls.create_from_arg_string("")
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        cls.create_from_arg_string(f"checkpoint={ckpt},pretrained=gpt2")
    with pytest.raises(ValueError, match="max_length=129 must be in"):
        cls.create_from_arg_string(f"checkpoint={ckpt},max_length=129")
    with pytest.raises(ValueError, match="more than max_length=64"):
        lm.loglikelihood(_requests("loglikelihood", [("a", " b" * 70)]))
    with pytest.raises(ValueError, match=r"generation arguments \['num_beams'\]"):
        lm.generate_until(_requests("generate_until", [("a", {"num_beams": 2})]))
    with pytest.raises(ValueError, match="max_gen_toks=64 must be in"):
        lm.generate_until(_requests("generate_until", [("a", {"max_gen_toks": 64})]))


def _choice_accuracy(params):
    """Accuracy of the fixture's multiple-choice task from direct log-likelihoods, and those."""
    docs = [json.loads(line) for line in (TASKS / "choice.jsonl").read_text().splitlines()]
    lls = [[_loglikelihood(params, d["question"], " " + c)[0] for c in d["choices"]]
           for d in docs]
    return np.mean([np.argmax(ll) == d["label"] for ll, d in zip(lls, docs, strict=True)]), lls


def _word_and_byte_perplexity(params):
    docs = [json.loads(line)["text"] for line in
            (TASKS / "documents.jsonl").read_text().splitlines()]
    ll = 0.0
    for text in docs:
        windows = [make_disjoint_window(w)
                   for w in get_rolling_token_windows(TOK.encode(text), EOT, L, 1)]
        ll += sum(_scored(params, list(c) + list(p), len(p))[0] for c, p in windows)
    words = sum(len(re.split(r"\s+", t)) for t in docs)
    return math.exp(-ll / words), math.exp(-ll / sum(len(t.encode()) for t in docs))


def test_local_tasks_through_lm_eval(params, ckpt, offline):
    results = lm_eval.simple_evaluate(
        model=harness.MODEL_NAME, model_args=f"checkpoint={ckpt},batch_size=3",
        tasks=["backpack_choice", "backpack_rolling"], log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    acc, lls = _choice_accuracy(params)
    assert 0 < acc < 1
    assert results["results"]["backpack_choice"]["acc,none"] == pytest.approx(acc)
    samples = sorted(results["samples"]["backpack_choice"], key=lambda s: s["doc_id"])
    for sample, want in zip(samples, lls, strict=True):
        np.testing.assert_allclose([r[0] for r in sample["filtered_resps"]], want, rtol=1e-5)
    word_ppl, byte_ppl = _word_and_byte_perplexity(params)
    rolling = results["results"]["backpack_rolling"]
    assert rolling["word_perplexity,none"] == pytest.approx(word_ppl, rel=1e-4)
    assert rolling["byte_perplexity,none"] == pytest.approx(byte_ppl, rel=1e-5)


def _env(tmp_path):
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets"))


@pytest.mark.slow
def test_missing_lm_eval_is_one_line(tmp_path):
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; "
            "runpy.run_module('backpack_jax.evals.harness', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: the lm-evaluation-harness model") and line.endswith(
        "pip install 'backpack-jax[eval]'"), line


@pytest.mark.slow
def test_command_line_wrapper(params, ckpt, tmp_path):
    command = [sys.executable, "-m", "backpack_jax.evals.harness", "--model", "backpack-jax",
               "--tasks", "backpack_choice", "--include_path", str(TASKS), "--batch_size", "4"]
    proc = subprocess.run(command + ["--model_args", f"checkpoint={ckpt}", "--output_path",
                                     str(tmp_path / "out")],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backpack_choice" in proc.stdout
    (path,) = (tmp_path / "out").rglob("results_*.json")
    acc, _ = _choice_accuracy(params)
    assert json.loads(path.read_text())["results"]["backpack_choice"]["acc,none"] == (
        pytest.approx(acc))
    proc = subprocess.run(command + ["--model_args", f"checkpoint={tmp_path / 'nothing'}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint path {tmp_path / 'nothing'} does not exist (nor is it a Hub id "
        "such as stanfordnlp/backpack-gpt2)")
