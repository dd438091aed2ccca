"""A browser demo of a Backpack: read a word's senses, see contextualization and the exact
attribution of a prediction, and steer generation by editing senses.

    python -m backpack_jax.demo --checkpoint DIR [--port 7860] [--host 127.0.0.1]
        [--topic_cache PATH.npy] [--no_sense_table] [--compile_cache DIR] [--sense_edit PATH]

`Demo` holds the model and does the work with the library functions (it is what the tests
compare against them); `build_app` is the Gradio layer over it (`pip install
'backpack-jax[demo]'`). Every text is padded to one of a few fixed lengths, and every control
runs once at start-up, so a click reuses compiled code instead of waiting for XLA; XLA's
persistent cache keeps that code for the next start.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from backpack_jax import (
    attribution,
    batching,
    checkpoint,
    cli,
    generate,
    interventions,
    sense_finetune,
    sense_table,
    senses,
    topic,
)
from backpack_jax.checks import check_sense
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer, single_token, tokenization, word_ids

TOP_WORDS = 8  # words per sense and direction in the sense table
TOP_TERMS = 10  # attribution terms listed
MAX_NEW_TOKENS = 48  # every generation runs with this cache length and stops at the asked count
MAX_TEMPERATURE = 2.0
TOP_K = 50  # sampling keeps the 50 likeliest tokens (as `python -m backpack_jax.generate`)
DIGITS = 4  # significant digits of a contribution shown
PLOT_TOKENS = 64  # the longest text the heatmaps and the attribution grid show
# Texts and prompts are padded to `batching.bucket` widths from this one: a short text costs
# little more at 64 positions, and fewer widths compile at start-up.
SMALLEST_WIDTH = 64
PAPER_SENSE = 10  # the paper's gender debiasing removed sense 10 of a profession word
INTERVENTIONS = ("scale a sense", "topic", "knowledge edit")  # each with its row of controls
LEARNED = "learned edit (--sense_edit)"  # no controls: the file given at start-up
COMPILE_CACHE = "~/.cache/backpack_jax/xla"


def _default_cache(checkpoint_path: str) -> str:
    key = hashlib.sha1(os.path.abspath(checkpoint_path).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~/.cache/backpack_jax/demo"), key,
                        "sense_max_logits.npy")


class Demo:
    """The model and what each control computes, as plain data (no Gradio).

    With `table` (`sense_table.build`), generation reads each token's senses from it instead of
    running the sense network: the decoding `bench` reports as "cached + sense table".
    """

    def __init__(self, params: Params, config: BackpackConfig, topic_cache: str,
                 table: sense_table.SenseTable | None = None,
                 learned: sense_finetune.SenseDelta | None = None):
        self.params, self.config, self.table, self.learned = params, config, table, learned
        self.tokenizer = get_tokenizer()
        self.topic_cache = topic_cache
        self._max_logits_VxK: np.ndarray | None = None
        self._topic_scores: dict[str, np.ndarray] = {}
        n = config.n_positions
        self.text_lengths = batching.buckets(min(n, PLOT_TOKENS), SMALLEST_WIDTH)
        self.prompt_lengths = batching.buckets(n - MAX_NEW_TOKENS, SMALLEST_WIDTH)
        self.default_sense = min(PAPER_SENSE, config.num_senses - 1)
        self.plots = tempfile.mkdtemp(prefix="backpack_demo_")

    @classmethod
    def load(cls, checkpoint_path: str, topic_cache: str | None = None,
             with_table: bool = True, sense_edit: str | None = None) -> Demo:
        """The demo of a checkpoint; `with_table` builds the sense table (`sense_table.nbytes`
        of memory) for faster generation; `sense_edit` is a learned edit's file
        (`sense_finetune.save_delta`), offered among the interventions."""
        params, config = checkpoint.load(checkpoint_path)
        learned = None if sense_edit is None else sense_finetune.load_delta(sense_edit, config)
        table = sense_table.build(params, config) if with_table else None
        return cls(params, config, topic_cache or _default_cache(checkpoint_path), table,
                   learned)

    @property
    def interventions(self) -> list[str]:
        """The kinds of intervention offered: the learned edit too when there is one."""
        return [*INTERVENTIONS, *([LEARNED] if self.learned is not None else [])]

    # ------------------------------------------------------------------------------ inputs

    def _text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError("the text is empty")
        if len(ids) > self.config.n_positions:
            raise ValueError(f"the text is {len(ids)} tokens; this model reads at most "
                             f"n_positions={self.config.n_positions}")
        if len(ids) > PLOT_TOKENS:
            raise ValueError(f"the text is {len(ids)} tokens; the plots show at most "
                             f"{PLOT_TOKENS}")
        return ids

    def _padded(self, ids: list[int]) -> list[int]:
        """`ids` followed by end-of-text up to the next fixed length: the model is causal, so
        positions < len(ids) see exactly what they would without the padding."""
        width = batching.bucket(len(ids), self.text_lengths[-1], SMALLEST_WIDTH)
        return ids + [self.tokenizer.eot_id] * (width - len(ids))

    def labels(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def several_tokens(self, word: str, use: str) -> str:
        """For a word of several tokens, how it was split and what the control does with the
        tokens (`use`), so that no part of a word is used unsaid; '' for one token."""
        ids = word_ids(word, self.tokenizer)
        return f"{tokenization(ids, self.tokenizer)}: {use}" if len(ids) > 1 else ""

    # ------------------------------------------------------------------------------ senses

    def sense_rows(self, word: str, subword: str = "first", top: int = TOP_WORDS
                   ) -> list[list[str]]:
        """One row per sense: its index, the words it promotes and those it suppresses."""
        ws = senses.word_senses(self.params, self.config, word, self.tokenizer, subword=subword)
        p = senses.project_senses(self.params, ws.senses_KxD, top=top,
                                  vocab_limit=self.tokenizer.n_vocab)
        return senses.sense_rows(p, self.tokenizer)

    # ------------------------------------------------------------------- contextualization

    def heatmaps(self, text: str, chosen: Sequence[int]) -> str:
        """A PNG of alpha for the chosen senses (`senses.plot_contextualization`)."""
        chosen = [check_sense(self.config, int(k)) for k in chosen]
        if not chosen:
            raise ValueError("choose at least one sense")
        ids = self._text_ids(text)
        S = len(ids)
        alpha_KxSxS = senses.contextualization(self.params, self.config, self._padded(ids))[
            0, :, :S, :S]
        path = os.path.join(self.plots, "alpha.png")
        senses.plot_contextualization(alpha_KxSxS, self.labels(ids), chosen, path)
        return path

    def attribute(self, text: str, position: int, target: str = ""
                  ) -> attribution.Attribution:
        """The terms of the logit of `target` (one token; default the model's top token) at
        `position` (negative counts from the end)."""
        ids = self._text_ids(text)
        i = attribution.check_position(position, len(ids))  # Within the text, not the padding.
        target_id = (single_token(target, self.tokenizer, "the target") if target.strip()
                     else None)
        return attribution.attribute(self.params, self.config, self._padded(ids), i, target_id)

    def attribution_plot(self, a: attribution.Attribution) -> str:
        path = os.path.join(self.plots, "attribution.png")
        attribution.plot_attribution(a, self.labels(a.token_ids), path)
        return path

    def term_rows(self, a: attribution.Attribution) -> list[list[Any]]:
        """`attribution.top_terms` with the words: [word, position, sense, contribution], the
        contribution to `DIGITS` significant digits (a float32 sum has no more to show)."""
        return [[self.tokenizer.decode([a.token_ids[j]]), j, k, float(f"{v:.{DIGITS}g}")]
                for j, k, v in attribution.top_terms(a, TOP_TERMS)]

    # ------------------------------------------------------------------------------- steer

    def scale_edit(self, word: str, sense: int, factor: float
                   ) -> interventions.SenseIntervention:
        """Sense `sense` of every token of `word` multiplied by `factor`."""
        ids = word_ids(word, self.tokenizer)
        return interventions.scale_senses(self.config,
                                          {t: {int(sense): float(factor)} for t in ids})

    def topic_edit(self, name: str, strength: int, progress: bool = True) -> topic.TopicControl:
        """The paper's topic control. The topic-independent part (`topic.sense_max_logits`, the
        slow one) is read from or written to `topic_cache`; each topic's scores stay in memory.
        Like the authors' code, <|endoftext|> and the padding rows score 0."""
        if name not in topic.TOPICS:
            raise ValueError(f"unknown topic {name!r}; choose one of {sorted(topic.TOPICS)}")
        if name not in self._topic_scores:
            if self._max_logits_VxK is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.topic_cache)), exist_ok=True)
                self._max_logits_VxK = topic.cached_max_logits(
                    self.params, self.config, self.topic_cache, progress=progress)
            bag, _ = topic.bag_token_ids(topic.TOPICS[name], self.tokenizer)
            self._topic_scores[name] = topic.topic_scores(
                self.params, self.config, [bag], max_logits_VxK=self._max_logits_VxK,
                zero_from=self.tokenizer.eot_id, progress=progress)[0]
        return topic.TopicControl.from_weights(
            topic.sense_weights(self._topic_scores[name], int(strength)))

    def knowledge(self, word: str, remove: str, add: str) -> interventions.SenseIntervention:
        return interventions.knowledge_edit(
            self.params, self.config, word_ids(word, self.tokenizer),
            single_token(remove, self.tokenizer, "the word to remove"),
            single_token(add, self.tokenizer, "the word to add"))

    def prompt_ids(self, prompt: str, max_new_tokens: int) -> list[int]:
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"new tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.prompt_lengths[-1]:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; this model takes at most "
                f"{self.prompt_lengths[-1]}, whatever the number of new tokens ({max_new_tokens} "
                f"asked): n_positions={self.config.n_positions} keeps room for the demo's "
                f"{MAX_NEW_TOKENS}-token generation cache")
        return ids

    def prompt_width(self, n: int) -> int:
        """The fixed width a prompt of `n` tokens is padded to."""
        return batching.bucket(n, self.prompt_lengths[-1], SMALLEST_WIDTH)

    def stream(self, ids: list[int], max_new_tokens: int, sense_edit: Any = None,
               temperature: float = 0.0, seed: int = 0) -> Iterator[int]:
        """The tokens of `generate.stream`, stopping at end-of-text: greedy at temperature 0,
        else sampled (top-k `TOP_K`) from `seed`. The prompt is left-padded to a fixed width
        and masked there, as in a batch of prompts of other lengths, so its shapes were
        compiled at start-up."""
        eot = self.tokenizer.eot_id
        width = self.prompt_width(len(ids))
        if self.table is not None:
            sense_edit = self.table.replace(then=sense_edit)
        sampled = dict(temperature=temperature, top_k=TOP_K, rng=jax.random.PRNGKey(seed)
                       ) if temperature > 0 else {}
        steps = generate.stream(self.params, self.config, [ids], MAX_NEW_TOKENS, eos_id=eot,
                                sense_edit=sense_edit, pad_to=width, **sampled)
        for _, step in zip(range(max_new_tokens), steps, strict=False):
            token = int(step.tokens[0])
            if token == eot:
                return
            yield token

    def side_by_side(self, prompt: str, max_new_tokens: int, sense_edit: Any,
                     temperature: float = 0.0, seed: int = 0) -> Iterator[tuple[str, str]]:
        """The texts so far of the unmodified and the edited model, after every token. Sampling
        uses the same seed in both, so they differ by the intervention alone."""
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in 0..{MAX_TEMPERATURE} (0 is greedy), got "
                             f"{temperature}")
        ids = self.prompt_ids(prompt, max_new_tokens)
        panes = [self.stream(ids, max_new_tokens, edit, temperature, seed)
                 for edit in (None, sense_edit)]
        texts = [generate.TextStream(self.tokenizer) for _ in panes]
        shown, live = [prompt, prompt], [True, True]
        while any(live):
            for p, pane in enumerate(panes):
                token = next(pane, None) if live[p] else None
                if token is not None:
                    shown[p] += texts[p].push(token)
                elif live[p]:
                    shown[p] += texts[p].flush()
                    live[p] = False
            yield shown[0], shown[1]

    def warm_up(self) -> None:
        """Compiles every shape a control produces: a one-token word's sense table (a word of
        U tokens compiles once per U), each padded text length for the heatmaps and
        attribution, and each prompt width for the three kinds of generation, greedy and
        sampled."""
        self.sense_rows("a")
        a = self.tokenizer.encode(" a")[0]
        for width in self.text_lengths:
            senses.contextualization(self.params, self.config, [a] * width)
            self.attribute(" a" * width, -1)
        edits = [None, self.scale_edit("a", 0, 1.0), self.knowledge("a", "b", "c"),
                 topic.TopicControl.from_weights(
                     np.ones((self.config.vocab_size, self.config.num_senses), np.float32)),
                 *([self.learned] if self.learned is not None else [])]
        for width in self.prompt_lengths:
            for edit in edits:
                for temperature in (0.0, 1.0):
                    list(self.stream([a] * width, 2, edit, temperature))


# -------------------------------------------------------------------------------- the app

def _import_gradio() -> Any:
    return cli.require("gradio", "the demo", extra="demo")


def bad_input(control: str, e: ValueError) -> str:
    """The status line of a control given bad input, logged as one line on stderr: the
    user's mistake, not the server's, so no traceback."""
    print(f"{control}: bad input: {e}", file=sys.stderr, flush=True)
    return f"**Error:** {e}"


def shown_interventions(kind: str) -> list[bool]:
    """Which rows of controls to show, in the order of `INTERVENTIONS`: the chosen one's."""
    return [kind == k for k in INTERVENTIONS]


def build_app(demo: Demo) -> Any:
    """The Gradio page: three tabs over `demo`. Each control ends with a status line: a note
    (how a word of several tokens was used), or the message of a ValueError (bad input), which
    stays until the next click and clears the control's outputs so that no stale result stands
    beside it; the server keeps serving."""
    gr = _import_gradio()
    K = demo.config.num_senses

    def shown(*cleared):
        def wrap(fn):
            def wrapped(*args):
                try:
                    return fn(*args)
                except ValueError as e:
                    return *cleared, bad_input(fn.__name__, e)
            wrapped.__name__ = fn.__name__
            return wrapped
        return wrap

    @shown(None)
    def sense_table(word, subword):
        use = ("the senses of its first token" if subword == "first"
               else "the mean of its tokens' senses")
        return demo.sense_rows(word, subword), demo.several_tokens(word, use)

    @shown(None)
    def heatmaps(text, chosen):
        return demo.heatmaps(text, [int(k) for k in chosen]), ""

    @shown("", None, None)
    def attribute(text, position, target):
        a = demo.attribute(text, int(position), target)
        title = (f"logit of {demo.tokenizer.decode([a.target])!r} after position {a.position} "
                 f"= {a.logit:.4f}, the sum of {a.contributions_SxK.size} terms")
        return title, demo.attribution_plot(a), demo.term_rows(a), ""

    def intervention_controls(kind):
        return [gr.update(visible=v) for v in shown_interventions(kind)]

    def steer(prompt, max_new_tokens, kind, word, sense, factor, topic_name, strength, edit_word,
              remove, add, temperature, seed,
              progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio's API)
        try:
            note = ""
            if kind == "scale a sense":
                edit = demo.scale_edit(word, int(sense), float(factor))
                note = demo.several_tokens(word, f"sense {int(sense)} of each token scaled")
            elif kind == "topic":
                edit = demo.topic_edit(topic_name, int(strength))
            elif kind == "knowledge edit":
                edit = demo.knowledge(edit_word, remove, add)
                note = demo.several_tokens(edit_word, "each token edited")
            elif kind == LEARNED and demo.learned is not None:
                edit = demo.learned
            else:
                raise ValueError(f"unknown intervention {kind!r}")
            for panes in demo.side_by_side(prompt, int(max_new_tokens), edit,
                                           float(temperature), int(seed)):
                yield *panes, note
        except ValueError as e:
            yield "", "", bad_input("steer", e)

    with gr.Blocks(title="Backpack demo") as app:
        gr.Markdown(f"# Backpack language model\n{K} senses per word, "
                    f"{demo.config.n_positions} positions.")
        with gr.Tab("Senses of a word"):
            with gr.Row():
                word = gr.Textbox(label="word", value="nurse", elem_id="word")
                subword = gr.Radio(list(senses.SUBWORD_CHOICES), value="first",
                                   label="a word of several tokens: its first token or the mean")
            senses_status = gr.Markdown(elem_id="senses_status")
            table = gr.Dataframe(headers=["sense", "promotes", "suppresses"], elem_id="senses",
                                 label="what each sense promotes and suppresses (E @ sense)")
            gr.Button("Look up", elem_id="lookup").click(
                sense_table, [word, subword], [table, senses_status], api_name="senses")
            word.submit(sense_table, [word, subword], [table, senses_status])
        with gr.Tab("Contextualization"):
            text = gr.Textbox(label="text", value="The nurse said that", elem_id="text")
            chosen = gr.CheckboxGroup(list(range(K)), value=list(range(min(K, 4))),
                                      label="senses", type="value")
            alpha = gr.Image(label="alpha: rows predict, columns are the weighted words",
                             type="filepath", elem_id="alpha")
            alpha_status = gr.Markdown(elem_id="alpha_status")
            gr.Button("Show weights", elem_id="show_alpha").click(
                heatmaps, [text, chosen], [alpha, alpha_status], api_name="heatmaps")
            with gr.Row():
                position = gr.Number(value=-1, precision=0,
                                     label="predicting position (negative: from the end)")
                target = gr.Textbox(label="next word (default: the model's top token)")
            attribution_status = gr.Markdown(elem_id="attribution_status")
            headline = gr.Markdown()
            grid = gr.Image(label="word x sense terms of that logit", type="filepath")
            terms = gr.Dataframe(headers=["word", "position", "sense", "contribution"],
                                 label=f"the {TOP_TERMS} largest terms")
            gr.Button("Attribute", elem_id="attribute").click(
                attribute, [text, position, target], [headline, grid, terms, attribution_status],
                api_name="attribute")
        with gr.Tab("Steer"):
            with gr.Row():
                prompt = gr.Textbox(label="prompt", value="The nurse said that", elem_id="prompt")
                max_new = gr.Slider(1, MAX_NEW_TOKENS, value=20, step=1, label="new tokens")
            kind = gr.Radio(demo.interventions, value=INTERVENTIONS[0], label="intervention")
            visible = dict(zip(INTERVENTIONS, shown_interventions(kind.value), strict=True))
            with gr.Row(visible=visible["scale a sense"]) as scale_row:
                s_word = gr.Textbox(value="nurse", label="scale: word")
                s_sense = gr.Number(value=demo.default_sense, precision=0, label="sense")
                s_factor = gr.Number(value=0.0, label="factor (0 removes the sense)")
            with gr.Row(visible=visible["topic"]) as topic_row:
                t_name = gr.Dropdown(sorted(topic.TOPICS), value="sports", label="topic")
                t_strength = gr.Slider(1, 3, value=2, step=1, label="strength")
            with gr.Row(visible=visible["knowledge edit"]) as knowledge_row:
                k_word = gr.Textbox(value="MacBook", label="knowledge edit: word")
                k_remove = gr.Textbox(value="Apple", label="from")
                k_add = gr.Textbox(value="HP", label="to")
            with gr.Row():
                temperature = gr.Slider(0, MAX_TEMPERATURE, value=0, step=0.05,
                                        label=f"temperature (0: greedy; else top-{TOP_K} "
                                              "sampling)")
                seed = gr.Number(value=0, precision=0,
                                 label="seed (the same in both panes)")
            kind.change(intervention_controls, kind, [scale_row, topic_row, knowledge_row])
            go = gr.Button("Generate", elem_id="generate")
            steer_status = gr.Markdown(elem_id="steer_status")
            with gr.Row():
                plain = gr.Textbox(label="unmodified", lines=6, elem_id="plain")
                edited = gr.Textbox(label="with the intervention", lines=6, elem_id="edited")
            go.click(steer, [prompt, max_new, kind, s_word, s_sense, s_factor, t_name,
                             t_strength, k_word, k_remove, k_add, temperature, seed],
                     [plain, edited, steer_status], api_name="steer")
    return app


def main(argv: Sequence[str] | None = None) -> None:
    p = cli.parser("backpack_jax.demo", "See and steer a Backpack in the browser.", json=False)
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on")
    p.add_argument("--port", type=int, default=7860, help="the port to serve on")
    p.add_argument("--topic_cache", metavar="PATH.npy",
                   help="where the topic control's sense max logits are kept (default: "
                        "~/.cache/backpack_jax/demo/<hash of the checkpoint path>/)")
    p.add_argument("--no_sense_table", action="store_true",
                   help="generate with the sense network instead of a table of every token's "
                        "senses (saves vocab x senses x n_embd floats of memory, decodes slower)")
    p.add_argument("--compile_cache", metavar="DIR", default=COMPILE_CACHE,
                   help="keep XLA's compiled code here so that later starts skip most of the "
                        "compiling ('' turns it off)")
    p.add_argument("--sense_edit", metavar="PATH",
                   help="a learned sense edit (sense_delta.safetensors from "
                        "backpack_jax.evals.canonical) to steer with")
    cli.run(p, argv, _serve)


def _serve(args: argparse.Namespace) -> None:
    _import_gradio()
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    demo = Demo.load(args.checkpoint, args.topic_cache, with_table=not args.no_sense_table,
                     sense_edit=args.sense_edit)
    print("compiling every control's shapes ...", flush=True)
    demo.warm_up()
    app = build_app(demo).queue()
    app.launch(server_name=args.host, server_port=args.port, quiet=True,
               prevent_thread_lock=True)
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C or SIGTERM stops)", flush=True)
    # Both signals close the server the same way, even where the shell ignores SIGINT.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    app.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
