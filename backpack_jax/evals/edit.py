"""Knowledge editing (paper §6.3, Table 6): make a word evoke another word in place of a third.

    python -m backpack_jax.evals.edit --checkpoint DIR --word MacBook --remove Apple --add HP \
        --prompt "The MacBook is made by"

`interventions.knowledge_edit` moves every sense of the word's tokens off E[remove] and onto E[add].
The command checks the edit where it acts, at every position whose context holds the word (the
logit of the removed word must fall and that of the added word rise there), then prints greedy
and sampled continuations of the prompt before and after.

- `edit_check(...)`: the two logits at those positions, before and after.
- `continuations(...)`: greedy and sampled texts, before and after, from the same random keys.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from backpack_jax import checkpoint, cli, generate, interventions, model
from backpack_jax.config import BackpackConfig
from backpack_jax.model import Params
from backpack_jax.tokenizer import get_tokenizer, single_token, word_ids


@dataclasses.dataclass(frozen=True)
class EditCheck:
    """Logits of the removed and the added word at the positions P whose context holds the word
    (a position's prediction sees the tokens up to and including it)."""

    positions_S: np.ndarray
    remove_before_S: np.ndarray
    remove_after_S: np.ndarray
    add_before_S: np.ndarray
    add_after_S: np.ndarray

    @property
    def holds(self) -> bool:
        """The removed word's logit fell and the added word's rose at every such position."""
        return bool((self.remove_after_S < self.remove_before_S).all()
                    and (self.add_after_S > self.add_before_S).all())

    def table(self, remove: str, add: str) -> cli.Table:
        t = cli.Table(f"logits where the edited word is in context ({len(self.positions_S)} "
                         "positions)", ["before (mean)", "after (mean)", "change (min)",
                                        "change (max)"])
        for name, before, after in ((f"{remove!r} (removed)", self.remove_before_S,
                                     self.remove_after_S),
                                    (f"{add!r} (added)", self.add_before_S, self.add_after_S)):
            change = after - before
            t.add(name, [before.mean(), after.mean(), change.min(), change.max()])
        t.notes.append("edit holds: the removed logit fell and the added logit rose at every "
                       "position" if self.holds else
                       "edit does NOT hold at every position: see the change columns")
        return t


def edit_check(params: Params, config: BackpackConfig, token_ids: Sequence[int],
               word_ids: Sequence[int], edit: interventions.SenseIntervention, remove_id: int,
               add_id: int) -> EditCheck:
    """Runs `token_ids` with and without `edit` and reads both logits where the word is in
    context."""
    ids_1xS = np.asarray(token_ids, np.int32)[None]
    hit_S = np.isin(ids_1xS[0], np.asarray(word_ids))
    if not hit_S.any():
        raise ValueError("the text does not contain the edited word's tokens "
                         f"{list(word_ids)}, so the edit cannot act on it")
    positions_S = np.arange(hit_S.argmax(), ids_1xS.shape[1])
    before_SxV, after_SxV = (
        np.asarray(model.apply(params, ids_1xS, config, sense_edit=e).logits[0])[positions_S]
        for e in (None, edit))
    return EditCheck(positions_S, before_SxV[:, remove_id], after_SxV[:, remove_id],
                     before_SxV[:, add_id], after_SxV[:, add_id])


def continuations(params: Params, config: BackpackConfig, prompt_ids: Sequence[int],
                  edit: interventions.SenseIntervention, *, max_new_tokens: int, samples: int,
                  temperature: float, seed: int) -> dict[str, dict[str, list[list[int]]]]:
    """New tokens of the greedy continuation and of `samples` sampled ones, before and after the
    edit; sample i uses the same random key both times, so the two differ by the edit alone."""
    out: dict[str, dict[str, list[list[int]]]] = {}
    for name, e in (("before", None), ("after", edit)):
        greedy = generate.generate(params, config, [prompt_ids], max_new_tokens, sense_edit=e)
        sampled = [generate.generate(params, config, [prompt_ids], max_new_tokens,
                                     temperature=temperature, sense_edit=e,
                                     rng=jax.random.fold_in(jax.random.PRNGKey(seed), i))
                   for i in range(samples)]
        out[name] = {"greedy": greedy.new_tokens.tolist(),
                     "sampled": [g.new_tokens[0].tolist() for g in sampled]}
    return out


def _body(args: argparse.Namespace) -> dict[str, Any]:
    if args.max_new_tokens < 1 or args.samples < 0:
        raise ValueError("--max_new_tokens must be >= 1 and --samples >= 0")
    params, config = checkpoint.load(args.checkpoint)
    tokenizer = get_tokenizer()
    ids_U = word_ids(args.word, tokenizer)
    remove_id = single_token(args.remove, tokenizer, "--remove")
    add_id = single_token(args.add, tokenizer, "--add")
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt is empty")
    edit = interventions.knowledge_edit(params, config, ids_U, remove_id, add_id)
    check = edit_check(params, config, prompt_ids, ids_U, edit, remove_id, add_id)
    table = check.table(args.remove, args.add)
    print(f"word {args.word!r} = tokens {[tokenizer.decode([i]) for i in ids_U]}; "
          f"{args.remove!r} -> {args.add!r}\n")
    print(table.format())
    texts = continuations(params, config, prompt_ids, edit, max_new_tokens=args.max_new_tokens,
                          samples=args.samples, temperature=args.temperature, seed=args.seed)
    decoded = {when: {how: [tokenizer.decode([t for t in row if t < tokenizer.n_vocab])
                            for row in rows] for how, rows in kinds.items()}
               for when, kinds in texts.items()}
    for how in ("greedy", "sampled"):
        for i in range(len(decoded["before"][how])):
            label = how if how == "greedy" else f"sample {i} (T={args.temperature})"
            print(f"\n{label}:")
            for when in ("before", "after"):  # as Python literals: whitespace stays visible
                print(f"  {when:6}| {args.prompt!r} + {decoded[when][how][i]!r}")
    return {"word": args.word, "word_ids": ids_U, "remove": args.remove, "add": args.add,
            "prompt": args.prompt, "check": {"table": table.to_json(), "holds": check.holds,
                                             "positions": check.positions_S.tolist()},
            "continuations": decoded}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.evals.edit",
                   "The paper's knowledge edit: make --word evoke --add where it evoked --remove; "
                   "check the logits and compare continuations.")
    p.add_argument("--word", default="MacBook", help="the word to edit (tokenized as ' word')")
    p.add_argument("--remove", default="Apple", help="the one-token word it should stop evoking")
    p.add_argument("--add", default="HP", help="the one-token word it should evoke instead")
    p.add_argument("--prompt", default="The MacBook is made by",
                   help="text containing the word, continued before and after the edit")
    p.add_argument("--max_new_tokens", type=int, default=20)
    p.add_argument("--samples", type=int, default=2, help="sampled continuations of each kind")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return cli.run(p, argv, _body)


if __name__ == "__main__":
    main()
