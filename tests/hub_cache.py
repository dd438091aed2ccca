"""Repositories laid out as huggingface_hub lays out its cache (`models--ORG--NAME/refs/<ref>`
holding a commit, `snapshots/<commit>/<files>`), and the environment that reads it offline.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported, so code under test runs in
a subprocess with `offline_env` (nothing is patched)."""

from __future__ import annotations

import os
import pathlib
import shutil


def cache_repo(home: pathlib.Path, repo_id: str, commits: dict[str, pathlib.Path],
               refs: dict[str, str]) -> None:
    """Puts every file of each source directory into the snapshot of its commit, and points
    each ref (branch or tag) at a commit."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)
    for commit, source in commits.items():
        shutil.copytree(source, repo / "snapshots" / commit)


def offline_env(home: pathlib.Path) -> dict[str, str]:
    """This process's environment reading the cache under `home`, offline, importing this
    checkout."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    env.pop("HF_HUB_CACHE", None)
    return env
