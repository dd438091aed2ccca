"""`python -m backpack_jax.evals.paper` on a tiny model taken by Hub id from huggingface_hub's cache
(offline, in a subprocess), with small datasets in their distributed forms: the sections that can
run, the lines of those that cannot, numbers equal to the individual commands', and a rerun that
reuses the finished sections."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from backpack_jax.evals import gender, similarity
from tests.hub_cache import cache_repo, offline_env

TINY = pathlib.Path(__file__).parent / "fixtures" / "converted_caeb19e"
COMMIT = "e" * 40
pytestmark = pytest.mark.slow


def _run(out: pathlib.Path, data: pathlib.Path, home: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backpack_jax.evals.paper", "--checkpoint", "org/tiny", "--out",
         str(out), "--data", str(data), "--quick", "--tasks", ""],
        env=offline_env(home), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    hf_dir = tmp / "hf"
    from backpack_jax import checkpoint, hf

    params, config = checkpoint.load(TINY)
    hf.write_hf(params, config, hf_dir)
    cache_repo(tmp / "home", "org/tiny", {COMMIT: hf_dir}, {"main": COMMIT})
    data = tmp / "data"
    data.mkdir()
    (data / "simlex999.txt").write_text(  # gensim's three-column copy, comments and all
        "# SimLex-999\nold\tnew\t1.58\nsmart\tintelligent\t9.2\nhard\tdifficult\t8.77\n"
        "happy\tcheerful\t9.55\nhard\teasy\t0.95\nfast\trapid\t8.75\ncat\tdog\t3.5\n")
    (data / "RG65.csv").write_text("cord;smile;0.02\ngem;jewel;3.94\nboy;lad;3.82\n"
                                   "car;journey;1.55\nforest;graveyard;1.0\nnoon;string;0.04\n")
    (data / "notes.txt").write_text("not a dataset\n")
    out = tmp / "out"
    first = _run(out, data, tmp / "home")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _run(out, data, tmp / "home")
    assert again.returncode == 0, again.stderr[-3000:]
    return out, data, first, again, json.loads((out / "report.json").read_text())


def test_the_report_has_every_section_it_can_run(report):
    out, _, first, _, data = report
    text = (out / "report.md").read_text()
    assert text.startswith("# org/tiny beside the paper\n")
    assert "does not have backpack-gpt2's shape" in text
    sections = data["sections"]
    assert [n for n, s in sections.items() if s["status"] == "done"] == [
        "similarity", "gender", "edit", "topic"]
    assert (sections["harness"]["status"], sections["harness"]["reason"]) == (
        "skipped", "no lm-eval tasks asked for (--tasks '')")
    assert sections["perplexity"]["status"] == "skipped"
    assert "Skipped: no prepared dataset named" in text
    assert "Note: semantic success is n/a" in text  # no classifier offline
    assert sections["gender"]["subset"] == "10 of the paper's one-token professions"
    for name in ("similarity", "gender", "topic"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert "![" in text and f"figures/{name}.png" in text
    # Each comparison row: ours minus the paper's.
    for row in sections["gender"]["comparison"]:
        assert row["difference"] == pytest.approx(row["ours"] - row["paper"])


def test_numbers_equal_the_individual_commands(report, tmp_path):
    _, _, _, _, data = report
    for name, module in (("gender", gender), ("similarity", similarity)):
        section = data["sections"][name]
        argv = section["command"][1:]
        argv[argv.index("--checkpoint") + 1] = str(TINY)  # the same weights, by path
        argv[argv.index("--plot") + 1] = str(tmp_path / f"{name}.png")
        direct = module.main([*argv, "--json", str(tmp_path / f"{name}.json")])
        assert json.loads(json.dumps(direct["table"])) == section["result"]["table"], name
    assert data["sections"]["gender"]["result"]["ratios"] == json.loads(
        (tmp_path / "gender.json").read_text())["ratios"]


def test_a_rerun_reuses_the_finished_sections(report):
    out, _, first, again, data = report
    for name in ("similarity", "gender", "edit", "topic"):
        assert f"{name}: reusing {out / 'sections' / name}.json" in again.stderr
        assert f"{name}: reusing" not in first.stderr
    assert json.loads((out / "report.json").read_text()) == data


def test_found_datasets_by_file_name(report):
    _, data_dir, _, _, data = report
    command = data["sections"]["similarity"]["command"]
    files = command[command.index("--data") + 1:command.index("--plot")]
    assert files == [str(data_dir / "RG65.csv"), str(data_dir / "simlex999.txt")]
