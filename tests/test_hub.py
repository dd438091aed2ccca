"""Hub ids through huggingface_hub's own resolution, against a cache laid out as it lays one out
(`models--org--name/refs/<rev>` holding a commit, `snapshots/<commit>/<files>`), offline.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so the checks run in one
subprocess with that environment (nothing is patched)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from backpack_jax import checkpoint, hf, model
from backpack_jax.config import BackpackConfig

CONFIG = BackpackConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        num_senses=2, sense_intermediate_scale=2, bos_token_id=0,
                        eos_token_id=0)
MAIN, V1 = "a" * 40, "b" * 40


def _cache_repo(hub: pathlib.Path, repo_id: str, refs: dict[str, str],
                files: dict[str, pathlib.Path]) -> None:
    """One repository in huggingface_hub's cache layout: each ref names a commit, each commit's
    snapshot holds the given files (per commit: `files` maps "<commit>/<name>" to a source)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    for where, source in files.items():
        target = repo / "snapshots" / where
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def _hf_files(tmp: pathlib.Path, seed: int) -> tuple[pathlib.Path, float]:
    params = model.init(CONFIG, jax.random.PRNGKey(seed))
    hf.write_hf(params, CONFIG, tmp)
    return tmp, float(np.asarray(model.embedding_VxD(params)).sum())


SCRIPT = textwrap.dedent("""
    import json, sys
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
        "shadowed": total(checkpoint.load("local/tiny")),
        "missing": error(lambda: checkpoint.load("org/missing")),
        "no_rev": error(lambda: checkpoint.load("org/tiny@v9")),
        "not_backpack": error(lambda: checkpoint.load("org/gpt2")),
        "no_weights": error(lambda: checkpoint.load("org/config-only")),
    }))
""")


@pytest.fixture(scope="module")
def hub_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    hub = tmp / "home" / "hub"
    main_dir, main_sum = _hf_files(tmp / "main", 0)
    v1_dir, v1_sum = _hf_files(tmp / "v1", 1)
    weights = hf.files.SAFETENSORS
    _cache_repo(hub, "org/tiny", {"main": MAIN, "v1": V1}, {
        f"{MAIN}/config.json": main_dir / "config.json", f"{MAIN}/{weights}": main_dir / weights,
        f"{V1}/config.json": v1_dir / "config.json", f"{V1}/{weights}": v1_dir / weights})
    (tmp / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    _cache_repo(hub, "org/gpt2", {"main": MAIN}, {f"{MAIN}/config.json": tmp / "gpt2.json"})
    _cache_repo(hub, "org/config-only", {"main": MAIN},
                {f"{MAIN}/config.json": main_dir / "config.json"})
    # A local directory spelled like a Hub id (relative to the working directory) wins.
    local_params = model.init(CONFIG, jax.random.PRNGKey(2))
    checkpoint.save(tmp / "local" / "tiny", local_params, CONFIG)
    env = {**os.environ, "HF_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = {"main": main_sum, "v1": v1_sum,
                "local": float(np.asarray(model.embedding_VxD(local_params)).sum())}
    return json.loads(done.stdout.strip().splitlines()[-1]), expected


def test_loads_by_id_and_revision(hub_results):
    got, expected = hub_results
    assert got["main"] == pytest.approx(expected["main"], rel=1e-6)
    for key in ("at_v1", "revision_v1", "by_commit"):
        assert got[key] == pytest.approx(expected["v1"], rel=1e-6), key
    assert expected["main"] != pytest.approx(expected["v1"], rel=1e-3)


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
