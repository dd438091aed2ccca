"""Topic control (paper §6.1, Table 12): sample with each topic's senses upweighted, and measure
how often the text is on topic.

    python -m backpack_jax.evals.topic --checkpoint DIR [--topics all|sports,music]
        [--strengths 0,1,2,3] [--samples 500] [--max_new_tokens 100] [--batch 50] [--seed 0]
        [--classifier module:callable | HF_DIR] [--samples_out samples.jsonl]
        [--score_cache max_logits.npy] [--no_anneal] [--json PATH] [--plot PNG]

The protocol of the paper: for each of the 17 topics (Table 10) and each strength (Table 11),
`--samples` texts of `--max_new_tokens` tokens, ancestral sampling (temperature 1, no top-k or
top-p, not stopping at <|endoftext|>) from "<|endoftext|>", under `topic.TopicControl` (annealed
weights; `--no_anneal` keeps them fixed). Strength 0 is the unchanged model, the same for every
topic: its samples are drawn once and scored for each topic. Metrics per topic and strength:

- toks-in-vocab: the share of generated tokens that are the topic's bag-of-words tokens;
- semantic success: the share of samples a topic classifier gives > 0.5 for the target topic
  (the paper used cardiffnlp/tweet-topic-21-multi; name it with --classifier);
- the samples go to --samples_out (JSONL: topic, strength, text, token_ids) for MAUVE.

The table averages over the topics; the JSON has every topic. Scoring the V*K sense vectors is
the cost before any sampling (3.1e13 multiply-adds for backpack-gpt2): `--score_cache` keeps its
topic-independent part, `topic.sense_max_logits`, in a .npy file for the next run
(`topic.cached_max_logits`).

- `load_classifier(spec)`, `topic_probabilities(classifier, texts, topics)`.
- `sample(...)`, `toks_in_vocab(...)`, `semantic_success(...)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from backpack_jax import atomic, checkpoint, cli, generate, hub, topic
from backpack_jax.config import BackpackConfig
from backpack_jax.edits import SenseEdit
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer

# Table 12, backpack-gpt2: (semantic success, toks-in-vocab, MAUVE) by strength.
PAPER = {0: (0.074, 0.000, 0.92), 1: (0.121, 0.002, 0.91), 2: (0.243, 0.015, 0.90),
         3: (0.353, 0.035, 0.83)}
ROW_NAMES = {0: "unchanged", 1: "+1", 2: "+2", 3: "+3"}
SUCCESS_THRESHOLD = 0.5

Classifier = Callable[[list[str]], Any]


# ------------------------------------------------------------------------------- classifier

def _label_key(label: str) -> str:
    """"arts_&_culture" (tweet-topic-21-multi) and "arts_culture" (Table 10) are one topic."""
    return label.strip().lower().replace("&", "").replace(" ", "_").replace("__", "_")


def load_classifier(spec: str) -> Classifier:
    """A topic classifier: "module:callable" (any callable texts -> per-text {label: prob} dicts
    or an [N, 17] array in `topic.TOPICS` order), or a Hugging Face sequence-classification model
    (a local directory, or a Hub id such as cardiffnlp/tweet-topic-21-multi, `@rev` allowed),
    run through transformers' pipeline with a sigmoid per label. A local directory wins over a
    Hub id spelled the same way; a Hub id resolves through transformers (its cache, HF_HOME,
    HF_HUB_OFFLINE) and runs no code from the repository."""
    repo = None if os.path.isdir(spec) else hub.parse(spec)
    if os.path.isdir(spec) or repo is not None:
        transformers = cli.require("transformers", "a Hugging Face topic classifier")
        model_id, revision = (spec, None) if repo is None else repo
        try:
            pipe = transformers.pipeline("text-classification", model=model_id,
                                         tokenizer=model_id, revision=revision, top_k=None,
                                         function_to_apply="sigmoid", device="cpu",
                                         trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"--classifier {spec} is not a Hugging Face sequence-classification "
                             f"model that could be loaded: {str(e).splitlines()[0]}") from None

        def classify(texts: list[str]) -> list[dict[str, float]]:
            out = pipe(texts, truncation=True, batch_size=32)
            return [{d["label"]: d["score"] for d in labels} for labels in out]
        return classify
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--classifier {spec!r} is neither module:callable nor a directory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--classifier {spec!r}: cannot import {module_name!r}: {e}") from None
    classify = getattr(module, attribute, None)
    if not callable(classify):
        raise ValueError(f"--classifier {spec!r}: {module_name} has no callable {attribute!r}")
    return classify


def topic_probabilities(classifier: Classifier, texts: list[str], topics: Sequence[str]
                        ) -> np.ndarray:
    """[B, Z]: the classifier's probability of each of the Z `topics` for each of the B texts."""
    out = classifier(texts)
    if isinstance(out, np.ndarray) or (len(out) and not isinstance(out[0], dict)):
        all_BxZ = np.asarray(out, np.float64)  # every topic of the paper
        if all_BxZ.shape != (len(texts), len(topic.TOPICS)):
            raise ValueError(f"the classifier returned an array of shape {all_BxZ.shape}; "
                             f"expected {(len(texts), len(topic.TOPICS))} (texts x the paper's "
                             "17 topics in order)")
        order = list(topic.TOPICS)
        return all_BxZ[:, [order.index(t) for t in topics]]
    if len(out) != len(texts):
        raise ValueError(f"the classifier returned {len(out)} results for {len(texts)} texts")
    probs_BxZ = np.empty((len(texts), len(topics)))
    for n, labels in enumerate(out):
        by_key = {_label_key(label): p for label, p in labels.items()}
        for t, name in enumerate(topics):
            if name not in by_key:
                raise ValueError(f"the classifier gave no probability for topic {name!r}; its "
                                 f"labels are {sorted(labels)}")
            probs_BxZ[n, t] = by_key[name]
    return probs_BxZ


# ---------------------------------------------------------------------------------- metrics

def toks_in_vocab(tokens_BxN: np.ndarray, bag_ids: Sequence[int]) -> float:
    """The share of the generated tokens that are bag-of-words tokens."""
    return float(np.isin(tokens_BxN, np.asarray(bag_ids)).mean())


def semantic_success(probs_B: np.ndarray) -> float:
    """The share of samples the classifier puts above 0.5 for the target topic."""
    return float((np.asarray(probs_B) > SUCCESS_THRESHOLD).mean())


def sample(params: Params, config: BackpackConfig, edit: SenseEdit | None, samples: int, *,
           max_new_tokens: int, batch: int, rng: jax.Array, start_id: int,
           desc: str = "sampling") -> np.ndarray:
    """[samples, max_new_tokens] new tokens of ancestral samples (temperature 1, no filtering,
    no stop) from [start_id], `batch` at a time (every batch full, so it compiles once)."""
    batch, rows = min(batch, samples), []
    for k in tqdm(range(-(-samples // batch)), desc=desc, unit="batch"):
        out = generate.generate(params, config, [[start_id]] * batch, max_new_tokens,
                                temperature=1.0, rng=jax.random.fold_in(rng, k), sense_edit=edit)
        rows.append(out.new_tokens)
    return np.concatenate(rows)[:samples]


# ------------------------------------------------------------------------------- the command

def _parse_topics(text: str) -> list[str]:
    if text.strip() == "all":
        return list(topic.TOPICS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in topic.TOPICS]
    if unknown or not names:
        raise ValueError(f"unknown topic(s) {unknown or text!r}; the paper's are: "
                         + ", ".join(topic.TOPICS))
    return list(dict.fromkeys(names))


def _parse_strengths(text: str) -> list[int]:
    try:
        strengths = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--strengths must be comma-separated integers, got {text!r}") from None
    if not strengths or any(s not in topic.STRENGTHS for s in strengths):
        raise ValueError(f"--strengths {text!r}: each must be one of the paper's "
                         f"{list(topic.STRENGTHS)}")
    return strengths


def _plot(path: str, strengths: list[int], tiv: list[float], sem: list[float | None]) -> None:
    plt = atomic.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(strengths))
    ax.bar(x - 0.2, tiv, 0.4, label="toks-in-vocab")
    if all(s is not None for s in sem):
        ax.bar(x + 0.2, sem, 0.4, label="semantic success")
    ax.set_xticks(x, [ROW_NAMES[s] for s in strengths])
    ax.set_xlabel("strength")
    ax.set_ylabel("share (mean over topics)")
    ax.set_title("Topic control")
    ax.legend()
    atomic.save_figure(fig, path)


def _body(args: argparse.Namespace) -> dict[str, Any]:
    if args.samples < 1 or args.max_new_tokens < 1 or args.batch < 1:
        raise ValueError("--samples, --max_new_tokens and --batch must be >= 1")
    topics, strengths = _parse_topics(args.topics), _parse_strengths(args.strengths)
    classifier = None if args.classifier is None else load_classifier(args.classifier)
    params, config = checkpoint.load(args.checkpoint)
    tokenizer = get_tokenizer()
    start_id = tokenizer.eot_id
    bags = {}
    for name in topics:
        ids, skipped = topic.bag_token_ids(topic.TOPICS[name], tokenizer)
        bags[name] = {"words": list(topic.TOPICS[name]), "token_ids": ids, "skipped": skipped}
        for message in skipped.values():
            print(f"{name}: skipped {message}")
    scores_ZxVxK = None
    if any(s > 0 for s in strengths):
        max_VxK = topic.cached_max_logits(params, config, args.score_cache)
        # As the authors' code: <|endoftext|> and the padding rows after it score 0.
        scores_ZxVxK = topic.topic_scores(params, config, [bags[t]["token_ids"] for t in topics],
                                          max_logits_VxK=max_VxK, zero_from=start_id)

    key = jax.random.PRNGKey(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, batch=args.batch, start_id=start_id)
    tokens: dict[tuple[str | None, int], np.ndarray] = {}
    for s in strengths:
        if s == 0:  # the unchanged model: one set of samples serves every topic
            tokens[None, 0] = sample(params, config, None, args.samples, rng=key,
                                     desc="unchanged", **options)
            continue
        for t, name in enumerate(topics):
            control = topic.TopicControl.from_weights(topic.sense_weights(scores_ZxVxK[t], s))
            edit = control.fixed(config) if args.no_anneal else control
            rng = jax.random.fold_in(jax.random.fold_in(key, s), t)
            tokens[name, s] = sample(params, config, edit, args.samples, rng=rng,
                                     desc=f"{name} +{s}", **options)
    texts = {k: [tokenizer.decode([i for i in row if i < tokenizer.n_vocab]) for row in rows]
             for k, rows in tokens.items()}
    probs = {}
    if classifier is not None:
        for (name, s), batch_texts in tqdm(texts.items(), desc="classifying", unit="set"):
            probs[name, s] = topic_probabilities(classifier, batch_texts,
                                                 topics if name is None else [name])

    per_topic: dict[str, dict[str, dict[str, float | None]]] = {}
    for t, name in enumerate(topics):
        per_topic[name] = {}
        for s in strengths:
            k = (None, 0) if s == 0 else (name, s)
            column = t if s == 0 else 0
            per_topic[name][str(s)] = {
                "toks_in_vocab": toks_in_vocab(tokens[k], bags[name]["token_ids"]),
                "semantic_success": semantic_success(probs[k][:, column]) if probs else None}
    if args.samples_out:
        with atomic.atomic_path(args.samples_out) as tmp, open(tmp, "w") as f:
            for (name, s), rows in tokens.items():
                for text, row in zip(texts[name, s], rows, strict=True):
                    f.write(json.dumps({"topic": name, "strength": s, "text": text,
                                        "token_ids": row.tolist()}) + "\n")
        print(f"wrote {sum(len(r) for r in tokens.values())} samples to {args.samples_out}")

    paper = cli.is_backpack_gpt2(config)
    columns = ["semantic success", "toks-in-vocab"]
    if paper:
        columns += ["paper semantic", "paper toks-in-vocab", "paper MAUVE"]
    table = cli.Table(f"Topic control ({'fixed' if args.no_anneal else 'annealed'} weights; "
                         f"mean over {len(topics)} topics, {args.samples} samples each)", columns)
    means = {}
    for s in strengths:
        tiv = float(np.mean([per_topic[n][str(s)]["toks_in_vocab"] for n in topics]))
        sem = (float(np.mean([per_topic[n][str(s)]["semantic_success"] for n in topics]))
               if probs else None)
        means[s] = (tiv, sem)
        table.add(ROW_NAMES[s], [sem, tiv, *(PAPER[s] if paper else ())])
    if not probs:
        table.notes.append("semantic success: n/a (name a topic classifier with --classifier)")
    print(table.format())
    if args.plot:
        _plot(args.plot, strengths, [means[s][0] for s in strengths],
              [means[s][1] for s in strengths])
        print(f"wrote {args.plot}")
    return {"table": table.to_json(), "per_topic": per_topic, "bags": bags,
            "settings": {"topics": topics, "strengths": strengths, "samples": args.samples,
                         "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                         "anneal": not args.no_anneal, "classifier": args.classifier,
                         "samples_out": args.samples_out}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.evals.topic",
                   "The paper's topic control (Table 12): sample under each topic's upweighted "
                   "senses; report toks-in-vocab and semantic success.")
    p.add_argument("--topics", default="all", help="'all' or a comma-separated list of: "
                   + ", ".join(topic.TOPICS))
    p.add_argument("--strengths", default="0,1,2,3", help="comma-separated, of 0 (unchanged), "
                   "1, 2, 3 (Table 11)")
    p.add_argument("--samples", type=int, default=500, help="samples per topic and strength")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--batch", type=int, default=50, help="samples generated at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", metavar="ID|DIR|MODULE:CALLABLE",
                   help="topic classifier for semantic success: a callable texts -> [{label: "
                        "prob}] or [N, 17] array, or a Hugging Face model (a local directory or "
                        "a Hub id; the paper: cardiffnlp/tweet-topic-21-multi); without it, n/a")
    p.add_argument("--samples_out", metavar="PATH.jsonl",
                   help="write every sample (topic, strength, text, token_ids), e.g. for MAUVE")
    p.add_argument("--score_cache", metavar="PATH.npy",
                   help="keep the sense max logits (the expensive, topic-independent part of "
                        "the scores) here: read if present and valid, else computed and written")
    p.add_argument("--no_anneal", action="store_true",
                   help="keep the weights fixed instead of annealing them during generation")
    p.add_argument("--plot", metavar="PNG", help="bar chart of both metrics per strength")
    return cli.run(p, argv, _body)


if __name__ == "__main__":
    main()
