"""Lexical similarity: the four dataset formats and their errors, every method's cosines and
Spearman rho against numpy/scipy computed from `model.apply`'s senses, and the command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import spearmanr

from backpack_jax import checkpoint, cli, model
from backpack_jax.config import get_model_config
from backpack_jax.evals import similarity
from backpack_jax.tokenizer import get_tokenizer

CONFIG = get_model_config("tiny")
K = CONFIG.num_senses
# Several multi-token words (" photosynthesis", " Maradona", ...), so "first" and "mean" differ.
WORDS = ("photosynthesis dishwasher Maradona hippopotamus devour rooster tiger cat journey voyage "
         "coast shore gem jewel boy lad car automobile forest graveyard take remove run sprint "
         "love hate king queen money bank computer keyboard football soccer Jerusalem midday "
         "noon cord smile asylum").split()
PAIRS = 16


def _pairs(seed):
    """PAIRS distinct unordered word pairs with random scores (a pair repeated, or reversed,
    would tie in float64 but maybe not in float32)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    while len(pairs) < PAIRS:
        a, b = rng.choice(WORDS, 2, replace=False)
        pairs.setdefault(frozenset((a, b)), (str(a), str(b), round(float(rng.uniform(0, 10)), 2)))
    return list(pairs.values())


def _write(directory, fmt, pairs, name=None):
    """A file in the format's distributed layout, with a blank line after the second pair."""
    header, line, default = {
        "simlex": ("word1\tword2\tPOS\tSimLex999\tconc(w1)\tconc(w2)\tconcQ\tAssoc(USF)"
                   "\tSimAssoc333\tSD(SimLex)", "{}\t{}\tN\t{}\t4.1\t4.5\t4\t0.2\t0\t0.4",
                   "SimLex-999.txt"),
        "simverb": (None, "{}\t{}\tV\t{}\tNONE", "SimVerb-3500.txt"),
        "rg65": (None, "{};{};{}", "RG65.csv"),
        "ws353": ("Word 1,Word 2,Human (mean)", "{},{},{}", "WS353.csv"),
    }[fmt]
    lines = ([] if header is None else [header]) + [line.format(*p) for p in pairs]
    lines.insert(len(lines) - len(pairs) + 2, "")
    path = directory / (name or default)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def params(random_params):
    # Real spread: embeddings and the sense network's weights well above the init's 0.02.
    return random_params(CONFIG, 5, scale=4.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    return {f: _write(directory, f, _pairs(i)) for i, f in enumerate(similarity.FORMATS)}


@pytest.fixture(scope="module")
def result(params, files):
    datasets = similarity.read_datasets(list(files.values()))
    return datasets, similarity.evaluate(params, CONFIG, get_tokenizer(), datasets,
                                         batch_size=7, progress=False)


# ---------------------------------------------------------------------------------- readers

def test_readers_parse_the_four_formats(files):
    for i, fmt in enumerate(similarity.FORMATS):
        d = similarity.read_dataset(files[fmt])
        want = _pairs(i)
        assert d.format == fmt and d.name == similarity.COLUMNS[fmt]
        assert list(zip(d.words1_L, d.words2_L, d.scores_L.tolist(), strict=True)) == want
        header = fmt in ("simlex", "ws353")
        # The blank line after the second pair is skipped, but counted in the line numbers.
        first = 2 if header else 1
        assert d.lines_L == [first, first + 1, *range(first + 3, first + 3 + PAIRS - 2)]


def test_format_from_name_or_given(tmp_path, files):
    assert similarity.detect_format("x/simlex-999.TXT") == "simlex"
    assert similarity.detect_format("wordsim353_combined.csv") == "ws353"
    assert similarity.detect_format("wordsim353/combined.csv") == "ws353"
    combined = tmp_path / "pairs.csv"
    combined.write_text(files["ws353"].read_text())
    with pytest.raises(ValueError, match=r"pairs.csv: cannot tell .*--format"):
        similarity.read_datasets([combined])
    one = similarity.read_datasets([combined], ["ws353"])
    assert one[0].name == "WS353" and len(one[0].scores_L) == PAIRS
    both = similarity.read_datasets([combined, files["ws353"]], ["ws353"])
    assert [d.name for d in both] == ["WS353 (pairs.csv)", "WS353 (WS353.csv)"]
    with pytest.raises(ValueError, match="one --format for all files or one per file"):
        similarity.read_datasets([combined, files["ws353"], files["rg65"]], ["ws353", "rg65"])
    with pytest.raises(ValueError, match="given twice"):
        similarity.read_datasets([files["rg65"], files["rg65"]])


@pytest.mark.parametrize("name, fmt", [("simlex999.txt", "simlex"),
                                       ("wordsim353.tsv", "ws353")])
def test_three_column_copies_with_comments(tmp_path, name, fmt):
    """The form gensim ships: `#` comment lines, then word1<TAB>word2<TAB>score."""
    pairs = _pairs(7)
    lines = ["# a copy of the dataset", "#word1\tword2\tscore"]
    lines += [f"{a}\t{b}\t{score}" for a, b, score in pairs[:3]] + ["", "# mid-file comment"]
    lines += [f"{a}\t{b}\t{score}" for a, b, score in pairs[3:]]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    d = similarity.read_dataset(path)
    assert d.format == fmt and d.name == similarity.COLUMNS[fmt]
    assert list(zip(d.words1_L, d.words2_L, d.scores_L.tolist(), strict=True)) == pairs
    assert d.lines_L == [3, 4, 5, *range(8, 8 + PAIRS - 3)]
    path.write_text("# comment\nold\tnew\thigh\n")
    with pytest.raises(ValueError, match=r":2: the score 'high' is not a number"):
        similarity.read_dataset(path)


@pytest.mark.parametrize("fmt, text, match", [
    ("simlex", "word1\tword2\tPOS\tscore\nold\tnew\tA\t1.5\n", r":1: expected a simlex header"),
    ("simlex", "word1\tword2\tPOS\tSimLex999\nold\tnew\tA\t1.5\n\nold\tnew\n",
     r":4: malformed simlex line, expected at least 4 '\\t'-separated fields, got 2"),
    ("simverb", "take\tremove\tV\t6.81\tNONE\nrun\tsprint\tV\thigh\tNONE\n",
     r":2: the score 'high' is not a number"),
    ("simverb", "take\tremove\tV\tnan\tNONE\n", r":1: the score 'nan' is not a number"),
    ("rg65", "cord;smile;0.02\ngem\tjewel\t3.94\n", r":2: malformed rg65 line"),
    ("rg65", "cord; ;0.02\n", r":1: malformed rg65 line, a word is empty"),
    ("rg65", "", r"RG65.csv: no word pairs"),
    ("ws353", "Word 1,Word 2,Human (mean)\n\n", r"WS353.csv: no word pairs"),
    ("ws353", "love,sex,6.77\n", r":1: expected a ws353 header"),
])
def test_reader_errors_name_the_file_and_line(tmp_path, fmt, text, match):
    path = tmp_path / {"simlex": "SimLex-999.txt", "simverb": "SimVerb-3500.txt",
                       "rg65": "RG65.csv", "ws353": "WS353.csv"}[fmt]
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        similarity.read_dataset(path)
    assert str(path) in str(e.value)


def test_unknown_format(files):
    with pytest.raises(ValueError, match=r"RG65.csv: unknown dataset format 'men'"):
        similarity.read_dataset(files["rg65"], "men")


def test_word_that_tokenizes_to_nothing_names_its_line(params, tmp_path):
    class Stub:  # a tokenizer that has no tokens for one word
        def encode(self, text):
            return [] if text.strip() == "lad" else get_tokenizer().encode(text)

    path = _write(tmp_path, "rg65", [("cat", "tiger", 1.0), ("gem", "jewel", 2.0),
                                     ("boy", "lad", 3.0)])
    with pytest.raises(ValueError, match=r"RG65.csv:4: the word 'lad' tokenizes to nothing"):
        similarity.evaluate(params, CONFIG, Stub(), [similarity.read_dataset(path)])


def test_token_ids_outside_the_vocabulary_are_refused(params):
    with pytest.raises(ValueError, match="outside"):
        similarity.word_vectors(params, CONFIG, [[3], [CONFIG.vocab_size]], progress=False)


# ---------------------------------------------------------------------------------- methods

def _independent(params, words):
    """Per word, from model.apply: the senses [K, D] and the embedding [D] of its first token
    and averaged over its tokens, in float64."""
    tok = get_tokenizer()
    e_VxD = np.asarray(params["backpack"]["gpt2_model"]["wte"]["embedding"], np.float64)
    out = {}
    for w in words:
        ids = tok.encode(" " + w)
        s_KxUxD = np.asarray(model.apply(params, np.asarray([ids]), CONFIG,
                                         return_senses=True).senses[0], np.float64)
        out[w] = {"first": (s_KxUxD[:, 0], e_VxD[ids[0]]),
                  "mean": (s_KxUxD.mean(1), e_VxD[ids].mean(0))}
    return out


def _cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_cosines_and_rho_match_numpy_and_scipy(params, result):
    datasets, got = result
    vectors = _independent(params, {w for d in datasets for w in d.words1_L + d.words2_L})
    assert got.table.columns == ["SL999", "SV3500", "RG65", "WS353"]
    assert list(got.table.rows) == similarity.method_names(K)
    for c, d in enumerate(datasets):
        for r in ("first", "mean"):
            a = [vectors[w][r] for w in d.words1_L]
            b = [vectors[w][r] for w in d.words2_L]
            all_LxKxK = np.array([[[_cos(x, y) for y in sb] for x in sa]
                                  for (sa, _), (sb, _) in zip(a, b, strict=True)])
            same_LxK = np.array([_cos(sa, sb) for (sa, _), (sb, _) in zip(a, b, strict=True)])
            want = {f"Sim_{k} ({r})": same_LxK[:, k] for k in range(K)}
            want[f"Sim_min ({r})"] = same_LxK.min(1)
            want[f"Sim_max ({r})"] = same_LxK.max(1)
            want[f"Sim_min_all ({r})"] = all_LxKxK.min((1, 2))
            want[f"Sim_max_all ({r})"] = all_LxKxK.max((1, 2))
            want[f"Embedding ({r})"] = np.array([_cos(ea, eb) for (_, ea), (_, eb)
                                                 in zip(a, b, strict=True)])
            assert len(want) == K + 5
            for row, cosines_L in want.items():
                np.testing.assert_allclose(got.cosines[d.name][row], cosines_L, atol=2e-6,
                                           err_msg=row)
                assert got.table.rows[row][c] == pytest.approx(
                    spearmanr(cosines_L, d.scores_L).statistic, abs=1e-9), (d.name, row)


def test_methods_differ(result):
    """No method is a constant or a copy of another: the cosines spread, and the rhos differ."""
    datasets, got = result
    for d in datasets:
        cosines = got.cosines[d.name]
        assert all(c.std() > 0.01 for c in cosines.values())
        for row in ("Sim_0", "Sim_min", "Sim_max_all", "Embedding"):
            assert np.abs(cosines[f"{row} (first)"] - cosines[f"{row} (mean)"]).max() > 1e-3
        assert np.abs(cosines["Sim_0 (first)"] - cosines["Sim_1 (first)"]).max() > 0.05
    rho = np.array(list(got.table.rows.values()))
    assert np.isfinite(rho).all()
    assert len(np.unique(rho.round(9))) > 0.6 * rho.size
    for c in range(len(datasets)):  # within each dataset, most rows give their own rho
        assert len(np.unique(rho[:, c].round(9))) > 0.5 * rho.shape[0]


def test_batches_do_not_change_the_vectors(params):
    tok = get_tokenizer()
    ids = [tok.encode(" " + w) for w in WORDS[:9]]
    small = similarity.word_vectors(params, CONFIG, ids, batch_size=2, progress=False)
    whole = similarity.word_vectors(params, CONFIG, ids, batch_size=64, progress=False)
    for r in ("first", "mean"):
        assert small.senses_WxKxD[r].shape == (9, K, CONFIG.n_embd)
        np.testing.assert_allclose(small.senses_WxKxD[r], whole.senses_WxKxD[r], atol=1e-6)
        np.testing.assert_allclose(small.embedding_WxD[r], whole.embedding_WxD[r], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(small.senses_WxKxD[r], axis=-1), 1.0,
                                   rtol=1e-5)


def test_paper_rows_follow_the_columns(files):
    datasets = similarity.read_datasets([files["ws353"], files["simlex"]])
    table = similarity.paper_table(datasets)
    assert table.columns == ["WS353", "SL999"]
    assert table.rows["paper: Backpack Sim_12"] == [0.749, 0.522]
    assert table.rows["paper: GPT2-1.5B embeddings"] == [0.706, 0.523]
    assert len(table.rows) == 7


# ---------------------------------------------------------------------------------- command

@pytest.fixture(scope="module")
def ckpt(params, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(path, params, CONFIG)
    return path


def test_command_writes_the_table(ckpt, files, result, tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    similarity.main(["--checkpoint", str(ckpt), "--data", *map(str, files.values()),
                     "--json", str(out), "--plot", str(png), "--batch", "5"])
    printed = capsys.readouterr().out
    assert "Sim_3 (mean)" in printed and "paper:" not in printed  # tiny is not backpack-gpt2
    written = json.loads(out.read_text())
    assert written["paper"] is None and written["words"] == len(result[1].word_ids)
    assert [d["pairs"] for d in written["datasets"]] == [PAIRS] * 4
    for row, values in result[1].table.rows.items():
        assert list(written["table"]["rows"][row].values()) == pytest.approx(values, abs=1e-9)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_command_prints_the_paper_for_backpack_gpt2(ckpt, files, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr(cli, "is_backpack_gpt2", lambda config: True)
    out = tmp_path / "sim.json"
    similarity.main(["--checkpoint", str(ckpt), "--data", str(files["rg65"]),
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert "paper: Backpack Sim_12" in printed and "0.754" in printed
    assert json.loads(out.read_text())["paper"]["rows"]["paper: word2vec"] == {"RG65": 0.679}


def test_command_reports_a_bad_line(ckpt, tmp_path, capsys):
    bad = tmp_path / "RG65.csv"
    bad.write_text("cord;smile;0.02\ngem;jewel;x\n")
    with pytest.raises(SystemExit) as e:
        similarity.main(["--checkpoint", str(ckpt), "--data", str(bad)])
    assert e.value.code == 2
    assert f"{bad}:2: the score 'x' is not a number" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line(ckpt, files, tmp_path):
    generic = tmp_path / "pairs.tsv"
    generic.write_text(files["simverb"].read_text())
    out = tmp_path / "sim.json"
    run = subprocess.run([sys.executable, "-m", "backpack_jax.evals.similarity",
                          "--checkpoint", str(ckpt), "--data", str(generic), str(files["rg65"]),
                          "--format", "simverb", "rg65", "--json", str(out)],
                         capture_output=True, text=True, check=True)
    assert "Sim_min_all (first)" in run.stdout
    assert json.loads(out.read_text())["table"]["columns"] == ["SV3500", "RG65"]
