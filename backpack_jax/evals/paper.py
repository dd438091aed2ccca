"""Rerun the paper on a checkpoint, into one report beside the paper's numbers.

    python -m backpack_jax.evals.paper --checkpoint stanfordnlp/backpack-gpt2 --out DIR \
        [--data DIR] [--classifier ID|DIR|MODULE:CALLABLE] [--heldout NAME] [--quick]

Each section is one of the experiment commands, run with its own code (its `main`, in this
process; perplexity through `python -m train.eval`, a layer above this package) and its `--json`,
so its numbers are that command's: the report prints the command line that reproduces each
section alone. A section whose inputs are missing is one line in the report and the others still
run. Finished sections are kept in `DIR/sections/` and reused by a rerun with the same arguments,
so an interrupted run resumes at the first unfinished section.

`--quick` runs subsets sized for a laptop CPU (stated in the report with the standard error they
leave); without it each section follows the protocol of the paper (shared/BACKPACK.md §6).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import math
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backpack_jax import atomic, cli
from backpack_jax.evals import gender as gender_eval, similarity

PROG = "python -m backpack_jax.evals.paper"
SECTIONS = ("similarity", "gender", "edit", "topic", "harness", "perplexity")
CLASSIFIER = "cardiffnlp/tweet-topic-21-multi"  # the paper's topic classifier
TASKS = "lambada_openai,wikitext"
# --quick: the subsets (the full protocol in brackets).
QUICK_PROFESSIONS = 10  # one-token professions of the paper's list [all 30]
QUICK_TOPIC_SAMPLES = 8  # per topic and strength [500]
QUICK_TOPIC_TOKENS = 32  # per sample [100]
QUICK_HARNESS_LIMIT = 100  # documents per task [all]
QUICK_HELDOUT_BATCHES = 8  # [the whole split]
# The paper's numbers (backpack-gpt2; Table 2 and §6).
PAPER_LM = {"OpenWebText perplexity": 20.1, "LAMBADA perplexity": 26.5,
            "LAMBADA accuracy": 0.375, "Wikitext perplexity": 40.9}
PAPER_SIMILARITY_ROWS = {"Backpack Sim_12": "Sim_12", "Backpack Sim_14": "Sim_14",
                         "Backpack Sim_min": "Sim_min"}


@dataclasses.dataclass(frozen=True)
class Section:
    """One experiment: the command that computes it, or why it cannot run here."""

    name: str
    title: str
    command: tuple[str, ...] = ()  # the program and its arguments, without --json
    skipped: str | None = None
    subset: str | None = None  # what --quick left out
    note: str | None = None  # what else the reader should know


# -------------------------------------------------------------------------------------- plan

def _similarity_files(data: str | None) -> list[pathlib.Path]:
    if data is None:
        return []
    found = []
    for path in sorted(pathlib.Path(data).iterdir()):
        if path.is_file():
            with contextlib.suppress(ValueError):
                similarity.detect_format(path)
                found.append(path)
    return found


def _classifier(spec: str | None) -> tuple[str | None, str | None]:
    """(the classifier to use, or None with the reason)."""
    if spec is not None:
        return spec, None
    try:
        import huggingface_hub

        huggingface_hub.hf_hub_download(CLASSIFIER, "config.json")
    except Exception as e:  # Offline, not cached, no network: the section notes it.
        return None, f"{CLASSIFIER} is not reachable ({type(e).__name__}); pass --classifier"
    return CLASSIFIER, None


def plan(args: argparse.Namespace) -> list[Section]:
    """The sections this run's inputs allow, in the report's order."""
    out = pathlib.Path(args.out)
    quick = args.quick
    ck = ["--checkpoint", args.checkpoint]
    sections = []

    files = _similarity_files(args.data)
    if files:
        sections.append(Section("similarity", "Lexical similarity (Table 4)", (
            "backpack_jax.evals.similarity", *ck, "--data", *map(str, files),
            "--plot", str(out / "figures" / "similarity.png"))))
    else:
        why = ("no --data directory given" if args.data is None else
               f"no dataset file under {args.data} (SimLex-999.txt, SimVerb-3500.txt, RG65.csv, "
               "combined.csv, simlex999.txt, wordsim353.tsv, ...)")
        sections.append(Section("similarity", "Lexical similarity (Table 4)", skipped=why))

    professions = []
    if quick:
        tokenizer = _tokenizer()
        professions = gender_eval.split_professions(gender_eval.PROFESSIONS,
                                                    tokenizer).words[:QUICK_PROFESSIONS]
    sections.append(Section("gender", "Gender bias (Table 5, Figure 3)", (
        "backpack_jax.evals.gender", *ck, "--plot", str(out / "figures" / "gender.png"),
        *(["--professions", ",".join(professions)] if quick else [])),
        subset=f"{len(professions)} of the paper's one-token professions" if quick else None))

    sections.append(Section("edit", "Knowledge editing (Table 6)", (
        "backpack_jax.evals.edit", *ck)))

    classifier, why = _classifier(args.classifier)
    samples = QUICK_TOPIC_SAMPLES if quick else 500
    tokens = QUICK_TOPIC_TOKENS if quick else 100
    sections.append(Section("topic", "Topic control (Table 12)", (
        "backpack_jax.evals.topic", *ck, "--samples", str(samples), "--max_new_tokens",
        str(tokens), "--score_cache", str(out / "topic_max_logits.npy"),
        "--plot", str(out / "figures" / "topic.png"),
        *(["--classifier", classifier] if classifier else [])),
        subset=f"{samples} samples of {tokens} tokens per topic and strength" if quick else None,
        note=None if classifier else f"semantic success is n/a: {why}"))

    if args.tasks:
        sections.append(Section("harness", "Language modelling: lm-evaluation-harness (Table 2)", (
            "backpack_jax.evals.harness", "--model", "backpack-jax", "--model_args",
            f"checkpoint={args.checkpoint}", "--tasks", args.tasks,
            "--output_path", str(out / "sections" / "harness"),
            *(["--limit", str(QUICK_HARNESS_LIMIT)] if quick else [])),
            subset=f"the first {QUICK_HARNESS_LIMIT} documents of each task" if quick else None))
    else:
        sections.append(Section("harness", "Language modelling: lm-evaluation-harness (Table 2)",
                                skipped="no lm-eval tasks asked for (--tasks '')"))

    if args.heldout:
        sections.append(Section("perplexity", "Held-out perplexity (Table 2)", (
            "train.eval", *ck, "--data", args.heldout,
            *(["--batches", str(QUICK_HELDOUT_BATCHES)] if quick else [])),
            subset=f"the first {QUICK_HELDOUT_BATCHES} batches" if quick else None))
    else:
        sections.append(Section("perplexity", "Held-out perplexity (Table 2)",
                                skipped="no prepared dataset named (--heldout NAME, see "
                                        "`python -m train.data prepare`)"))
    return sections


def _tokenizer() -> Any:
    from backpack_jax.tokenizer import get_tokenizer

    return get_tokenizer()


# --------------------------------------------------------------------------------------- run

class _Tee(io.TextIOBase):
    """Passes writes on to a stream and keeps the last line written (a command's error)."""

    def __init__(self, stream: Any):
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        self.last = lines[-1] if lines else self.last
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _run_in_process(module: str, argv: list[str], log: pathlib.Path) -> None:
    """Runs `module.main(argv)`; its printout goes to `log` (progress bars stay on stderr)."""
    main = importlib.import_module(module).main
    buffer, stderr = io.StringIO(), _Tee(sys.stderr)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(stderr):
            main(argv)
    except SystemExit as e:  # A user error of that command: its one line is on stderr.
        if e.code not in (None, 0):
            raise SectionFailed(stderr.last.removeprefix("error: ")) from None
    finally:
        with atomic.atomic_path(log) as tmp:
            tmp.write_text(buffer.getvalue())


class SectionFailed(RuntimeError):
    """A section's command stopped on a user error (its one line is the message)."""


def run_section(section: Section, out: pathlib.Path) -> dict[str, Any]:
    """The section's record: reused from `out/sections/NAME.json` when its command is the same,
    else computed now."""
    record_path = out / "sections" / f"{section.name}.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("command") == list(section.command) and record.get("status") == "done":
            print(f"{section.name}: reusing {record_path}", file=sys.stderr)
            return record
    result_path = out / "sections" / f"{section.name}.result.json"
    module, *argv = section.command
    print(f"{section.name}: python -m {shlex.join(section.command)}", file=sys.stderr)
    start = time.perf_counter()
    try:
        if module == "train.eval":  # above this package: a command, not an import
            done = subprocess.run([sys.executable, "-m", module, *argv, "--json",
                                   str(result_path)], capture_output=True, text=True)
            (out / "sections" / f"{section.name}.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                raise SectionFailed((done.stderr.strip().splitlines() or ["failed"])[-1])
        elif module.endswith(".harness"):
            _run_in_process(module, argv, out / "sections" / f"{section.name}.log")
            files = sorted(pathlib.Path(argv[argv.index("--output_path") + 1]).rglob(
                "results*.json"), key=lambda p: p.stat().st_mtime)
            if not files:
                raise SectionFailed("lm-eval wrote no results")
            atomic.write_json(result_path, json.loads(files[-1].read_text()))
        else:
            _run_in_process(module, [*argv, "--json", str(result_path)],
                            out / "sections" / f"{section.name}.log")
        record = {"status": "done", "command": list(section.command),
                  "seconds": round(time.perf_counter() - start, 1),
                  "result": json.loads(result_path.read_text())}
    except SectionFailed as e:
        record = {"status": "failed", "command": list(section.command), "reason": str(e)}
    atomic.write_json(record_path, record)
    return record


# ----------------------------------------------------------------------------- comparisons

Row = tuple[str, float | None, float | None, float | None]  # metric, paper, ours, standard error


def _spearman_se(rho: float, n: int) -> float:
    """Bonett and Wright's standard error of Spearman's rho from n pairs."""
    return math.sqrt((1 + rho * rho / 2) / (n - 3)) if n > 3 else float("nan")


def _compare_similarity(result: dict[str, Any]) -> list[Row]:
    rows = result["table"]["rows"]
    pairs = {d["name"]: d["pairs"] for d in result["datasets"]}
    columns = {similarity.COLUMNS[d["format"]]: d["name"] for d in result["datasets"]}

    def ours(method: str, representation: str, name: str) -> float | None:
        return rows.get(f"{method} ({representation})", {}).get(name)

    # The paper reports whichever subword representation did better overall: so do we.
    def overall(representation: str) -> float:
        got = [ours(m, representation, c) for m in PAPER_SIMILARITY_ROWS.values()
               for c in columns.values()]
        return float(np.mean([g for g in got if g is not None] or [-np.inf]))

    best = max(similarity.REPRESENTATIONS, key=overall)
    out = []
    for paper_name, method in PAPER_SIMILARITY_ROWS.items():
        for column, name in columns.items():
            paper = similarity.PAPER[paper_name][list(similarity.COLUMNS.values()).index(column)]
            rho = ours(method, best, name)
            out.append((f"{method} ({best}), {name}", paper, rho,
                        None if rho is None else _spearman_se(rho, pairs[name])))
    return out


def _compare_gender(result: dict[str, Any]) -> list[Row]:
    out = []
    for setting, (paper_bias, paper_cut) in gender_eval.PAPER_ROWS.items():
        ratios = np.asarray(result["ratios"][setting], np.float64)
        se = float(ratios.std(ddof=1) / math.sqrt(ratios.size)) if ratios.size > 1 else None
        out.append((f"{setting}: mean bias", paper_bias, float(ratios.mean()), se))
        if paper_cut is not None:
            base = float(np.mean(result["ratios"]["unmodified"]))
            out.append((f"{setting}: reduction %", paper_cut,
                        gender_eval.reduction(float(ratios.mean()), base), None))
    return out


def _compare_edit(result: dict[str, Any]) -> list[Row]:
    return [("the edited word evokes the added word (1 = yes)", 1.0,
             float(bool(result["check"]["holds"])), None)]


def _compare_topic(result: dict[str, Any]) -> list[Row]:
    from backpack_jax.evals import topic as topic_eval

    settings = result["settings"]
    n = settings["samples"] * len(settings["topics"])
    out = []
    for s in settings["strengths"]:
        name = topic_eval.ROW_NAMES[s]
        row = result["table"]["rows"][name]
        paper_sem, paper_tiv, _ = topic_eval.PAPER[s]
        sem = row["semantic success"]
        out.append((f"{name}: semantic success", paper_sem, sem,
                    None if sem is None else math.sqrt(sem * (1 - sem) / n)))
        tiv, tokens = row["toks-in-vocab"], n * settings["max_new_tokens"]
        out.append((f"{name}: toks-in-vocab", paper_tiv, tiv, math.sqrt(tiv * (1 - tiv) / tokens)))
    return out


def _metric(results: dict[str, Any], task: str, prefix: str) -> float | None:
    for key, value in results.get(task, {}).items():
        if key.split(",")[0] == prefix and not key.endswith("_stderr,none"):
            return float(value)
    return None


def _stderr(results: dict[str, Any], task: str, prefix: str) -> float | None:
    value = results.get(task, {}).get(f"{prefix}_stderr,none")
    return float(value) if isinstance(value, (int, float)) else None


def _compare_harness(result: dict[str, Any]) -> list[Row]:
    results = result.get("results", {})
    return [(name, PAPER_LM[name], _metric(results, task, key), _stderr(results, task, key))
            for name, task, key in (("LAMBADA perplexity", "lambada_openai", "perplexity"),
                                    ("LAMBADA accuracy", "lambada_openai", "acc"),
                                    ("Wikitext perplexity", "wikitext", "word_perplexity"))
            if task in results]


def _compare_perplexity(result: dict[str, Any]) -> list[Row]:
    return [(f"{result['data']} perplexity", PAPER_LM["OpenWebText perplexity"],
             result["perplexity"], None)]


COMPARE: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "similarity": _compare_similarity, "gender": _compare_gender, "edit": _compare_edit,
    "topic": _compare_topic, "harness": _compare_harness, "perplexity": _compare_perplexity}
FIGURES = {"similarity": "similarity.png", "gender": "gender.png", "topic": "topic.png"}


# ----------------------------------------------------------------------------------- report

def _cell(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _markdown_table(table: dict[str, Any]) -> list[str]:
    """A Table's JSON (`cli.Table.to_json`) as Markdown."""
    lines = [f"*{table['title']}*", "", "| | " + " | ".join(table["columns"]) + " |",
             "|---|" + "---|" * len(table["columns"])]
    lines += [f"| {name} | " + " | ".join(_cell(row.get(c)) for c in table["columns"]) + " |"
              for name, row in table["rows"].items()]
    return lines + [""] + [f"{note}  " for note in table.get("notes", [])] + [""]


def report(args: argparse.Namespace, sections: Sequence[Section],
           records: dict[str, dict[str, Any]], shape_note: str | None) -> tuple[str, dict]:
    """report.md and report.json from the sections' records."""
    md = [f"# {args.checkpoint} beside the paper", "",
          f"`{PROG} {shlex.join(sys.argv[1:] if args.argv is None else args.argv)}`", ""]
    if shape_note:
        md += [f"**{shape_note}**", ""]
    md += ["Each section's numbers are its command's (the command line under its title reruns "
           "it alone, with `--json`). Differences are ours minus the paper's. ± s.e. is the "
           "standard error the subset's size leaves: of a mean over prompts (bias), Bonett and "
           "Wright's for Spearman's rho, binomial for rates (taking a sample's tokens as "
           "independent, so it errs low), lm-eval's own for its tasks.", ""]
    data: dict[str, Any] = {"checkpoint": args.checkpoint, "quick": args.quick, "sections": {}}
    for section in sections:
        md += [f"## {section.title}", ""]
        entry: dict[str, Any] = {"title": section.title}
        data["sections"][section.name] = entry
        if section.skipped:
            md += [f"Skipped: {section.skipped}.", ""]
            entry.update(status="skipped", reason=section.skipped)
            continue
        record = records[section.name]
        md += [f"`python -m {shlex.join(section.command)}`"
               + (f" ({record['seconds']:.0f} s)" if "seconds" in record else ""), ""]
        entry.update(status=record["status"], command=record["command"],
                     seconds=record.get("seconds"))
        if section.subset:
            md += [f"Subset (`--quick`): {section.subset}.", ""]
            entry["subset"] = section.subset
        if section.note:
            md += [f"Note: {section.note}.", ""]
            entry["note"] = section.note
        if record["status"] != "done":
            md += [f"Failed: {record['reason']}", ""]
            entry["reason"] = record["reason"]
            continue
        rows = COMPARE[section.name](record["result"])
        entry["comparison"] = [{"metric": m, "paper": p, "ours": o, "stderr": se,
                                "difference": None if o is None or p is None else o - p}
                               for m, p, o, se in rows]
        entry["result"] = record["result"]
        md += ["| metric | paper | ours | ± s.e. | difference |", "|---|---|---|---|---|"]
        md += [f"| {m} | {_cell(p)} | {_cell(o)} | {_cell(se)} | "
               f"{_cell(None if o is None or p is None else o - p)} |" for m, p, o, se in rows]
        md.append("")
        for value in record["result"].values():
            if isinstance(value, dict) and {"title", "columns", "rows"} <= value.keys():
                md += _markdown_table(value)
        if section.name in FIGURES and (pathlib.Path(args.out) / "figures" /
                                        FIGURES[section.name]).is_file():
            md += [f"![{section.title}](figures/{FIGURES[section.name]})", ""]
    return "\n".join(md) + "\n", data


def _shape_note(checkpoint: str) -> str | None:
    from backpack_jax import checkpoint as checkpoint_lib

    _, config = checkpoint_lib.load(checkpoint)
    if cli.is_backpack_gpt2(config):
        return None
    return ("This checkpoint does not have backpack-gpt2's shape: the paper's numbers are shown "
            "for orientation only.")


def _body(args: argparse.Namespace) -> dict[str, Any]:
    out = pathlib.Path(args.out)
    (out / "sections").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    shape_note = _shape_note(args.checkpoint)  # also a clear error for a bad checkpoint
    sections = plan(args)
    records = {}
    for section in sections:
        if section.skipped:
            print(f"{section.name}: skipped: {section.skipped}", file=sys.stderr)
            continue
        records[section.name] = run_section(section, out)
    text, data = report(args, sections, records, shape_note)
    with atomic.atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    atomic.write_json(out / "report.json", data)
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return data


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = cli.parser("backpack_jax.evals.paper", "Rerun the paper's experiments on a checkpoint "
                   "and write a report beside the paper's numbers.", json=False)
    p.add_argument("--out", required=True, help="directory for report.md, report.json, the "
                                                "figures and the finished sections")
    p.add_argument("--data", help="directory holding the similarity datasets (by file name)")
    p.add_argument("--classifier", help="topic classifier: a Hub id, a local Hugging Face "
                                        f"directory or MODULE:CALLABLE (default: {CLASSIFIER} "
                                        "when it can be had)")
    p.add_argument("--tasks", default=TASKS, help="lm-eval tasks ('' to skip)")
    p.add_argument("--heldout", metavar="NAME",
                   help="a dataset prepared by `python -m train.data prepare`, for perplexity")
    p.add_argument("--quick", action="store_true", help="subsets sized for a laptop CPU")
    p.set_defaults(argv=None if argv is None else list(argv))
    return cli.run(p, argv, _body)


if __name__ == "__main__":
    main()
