"""Hub ids through huggingface_hub's own resolution, against a cache laid out as it lays one out,
offline, in a subprocess (tests/hub_cache.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, hf, model
from backpack_jax.config import BackpackConfig
from tests.hf_checkpoints import write_hf_checkpoint
from tests.hub_cache import cache_repo, offline_env

CONFIG = BackpackConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        num_senses=2, sense_intermediate_scale=2, bos_token_id=0,
                        eos_token_id=0)
MAIN, V1, SHARDED, BIN = "a" * 40, "b" * 40, "c" * 40, "d" * 40

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from backpack_jax import checkpoint, model

    def total(loaded):
        return float(np.asarray(model.embedding_VxD(loaded[0])).sum())

    def error(call):
        try:
            call()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    print(json.dumps({
        "main": total(checkpoint.load("org/tiny")),
        "at_v1": total(checkpoint.load("org/tiny@v1")),
        "revision_v1": total(checkpoint.load("org/tiny", revision="v1")),
        "by_commit": total(checkpoint.load("org/tiny@" + "b" * 40)),
        "sharded": total(checkpoint.load("org/tiny@sharded")),
        "bin": total(checkpoint.load("org/tiny@bin")),
        "shadowed": total(checkpoint.load("local/tiny")),
        "missing": error(lambda: checkpoint.load("org/missing")),
        "no_rev": error(lambda: checkpoint.load("org/tiny@v9")),
        "not_backpack": error(lambda: checkpoint.load("org/gpt2")),
        "no_weights": error(lambda: checkpoint.load("org/config-only")),
    }))
""")


def _total(params) -> float:
    return float(np.asarray(model.embedding_VxD(params)).sum())


@pytest.fixture(scope="module")
def hub_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    home = tmp / "home"
    sources, expected = {}, {}
    for name, seed, layout in (("main", 0, "safetensors"), ("v1", 1, "safetensors"),
                               ("sharded", 3, "sharded"), ("bin", 4, "bin")):
        params = model.init(CONFIG, jax.random.PRNGKey(seed))
        sources[name] = write_hf_checkpoint(tmp / name, hf.to_state_dict(params, CONFIG), CONFIG,
                                            layout)
        expected[name] = _total(params)
    cache_repo(home, "org/tiny", {MAIN: sources["main"], V1: sources["v1"],
                                  SHARDED: sources["sharded"], BIN: sources["bin"]},
               {"main": MAIN, "v1": V1, "sharded": SHARDED, "bin": BIN})
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    cache_repo(home, "org/gpt2", {MAIN: tmp / "gpt2"}, {"main": MAIN})
    (tmp / "config-only").mkdir()
    (tmp / "config-only" / "config.json").write_text((sources["main"] / "config.json").read_text())
    cache_repo(home, "org/config-only", {MAIN: tmp / "config-only"}, {"main": MAIN})
    # A local directory spelled like a Hub id (relative to the working directory) wins.
    local_params = model.init(CONFIG, jax.random.PRNGKey(2))
    checkpoint.save(tmp / "local" / "tiny", local_params, CONFIG)
    expected["local"] = _total(local_params)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp, env=offline_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), expected


def test_loads_by_id_and_revision(hub_results):
    got, expected = hub_results
    assert got["main"] == pytest.approx(expected["main"], rel=1e-6)
    for key in ("at_v1", "revision_v1", "by_commit"):
        assert got[key] == pytest.approx(expected["v1"], rel=1e-6), key
    assert expected["main"] != pytest.approx(expected["v1"], rel=1e-3)


def test_shards_and_bin_files_are_fetched_by_their_index(hub_results):
    got, expected = hub_results
    assert got["sharded"] == pytest.approx(expected["sharded"], rel=1e-6)
    assert got["bin"] == pytest.approx(expected["bin"], rel=1e-6)


def test_a_local_path_shadows_the_id(hub_results):
    got, expected = hub_results
    assert got["shadowed"] == pytest.approx(expected["local"], rel=1e-6)


def test_failures_are_one_line_that_says_what_to_do(hub_results):
    got, _ = hub_results
    assert got["missing"].startswith("HubError: org/missing is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in got["missing"]
    assert got["no_rev"].startswith("HubError: org/tiny@v9 is not in the Hugging Face cache")
    assert got["not_backpack"] == ("HubError: org/gpt2 is not a Backpack: its config.json "
                                   "(model_type 'gpt2', architectures None) has no num_senses")
    assert got["no_weights"].startswith("HubError: org/config-only has no weights")
    assert all("\n" not in got[k] for k in ("missing", "no_rev", "not_backpack", "no_weights"))


def test_ids_are_parsed_and_revisions_checked():
    from backpack_jax import hub

    assert hub.parse("stanfordnlp/backpack-gpt2") == ("stanfordnlp/backpack-gpt2", None)
    assert hub.parse("org/name@v1.0") == ("org/name", "v1.0")
    for text in ("name", "/abs/path", "./rel/dir", "a/b/c", "org/name@", "../x"):
        assert hub.parse(text) is None, text
    with pytest.raises(ValueError, match="revision"):
        checkpoint.load("org/name@v1", revision="v2")
    with pytest.raises(FileNotFoundError, match="nor is it a Hub id"):
        checkpoint.load("/nonexistent/dir")
