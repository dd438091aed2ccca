"""What the test modules share: JAX's persistent compilation cache, models and compiled functions
built once per session, and the tiny training run of the run and fault tests."""

import dataclasses
import functools
import json
import os
import pathlib
import signal
import time

import jax
import pytest

from backpack_jax import model
from backpack_jax.config import BackpackConfig
from tests import train_helpers as th
from train.lock import LOCK_FILE

# What the session's compilation cache needs (set in the environment so that the subprocesses a
# test starts read and fill the same cache). Every program is cached, however small or fast to
# compile. The cache key holds the program, the devices and XLA_FLAGS, so processes with several
# simulated devices (tests/test_train_sharded.py) keep entries of their own.
CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def pytest_configure(config):
    """JAX's persistent compilation cache for this process and every subprocess, in the user's
    cache directory (`$XDG_CACHE_HOME` or ~/.cache, then backpack_jax/test-xla), so that every
    checkout and session on the machine reuses what an earlier one compiled; the key holds
    JAX's version, so an upgrade starts afresh. A JAX_COMPILATION_CACHE_DIR already set is used
    as it is."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        user_cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME")
                                  or pathlib.Path.home() / ".cache")
        directory = user_cache / "backpack_jax" / "test-xla"
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)
    for name, value in CACHE_SETTINGS.items():
        os.environ.setdefault(name, value)
    # JAX read its settings from the environment when it was imported, above.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


@functools.cache
def _init(config: BackpackConfig, seed: int, scale: float):
    params = _jitted_init(config, jax.random.PRNGKey(seed))
    if scale == 1.0:
        return params
    return jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params)


_jitted_init = jax.jit(model.init, static_argnums=0)


@pytest.fixture(scope="session")
def random_params():
    """`random_params(config, seed, scale=1.0)`: `model.init`'s parameters (one compiled init per
    config), the matrices times `scale` for a real spread (the init's 0.02 makes every logit
    nearly equal); built once per session and shared by the modules asking for the same ones.
    Treat them as read-only."""
    return lambda config, seed, scale=1.0: _init(config, seed, float(scale))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """The shared tiny run (tests/train_helpers.py), trained once; copy `workdir` to change it."""

    workdir: pathlib.Path
    out: str  # Its standard output.
    holder: dict  # Its lock, read while it was stopped.
    second: tuple[int, str, list[str]]  # A second run on its workdir, tried meanwhile.
    before: dict  # The workdir's files before that second run,
    after: dict  # and after it.


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """`python -m train.run` of the shared tiny run, stopped (SIGSTOP) after its first checkpoint
    while a second run on its workdir is tried, then run to the end."""
    workdir = tmp_path_factory.mktemp("trained_run")
    first = th.start(workdir)
    deadline = time.time() + 300
    while not th.steps(workdir):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)
    try:
        holder = json.loads((workdir / LOCK_FILE).read_text())
        before = th.files(workdir)
        second = th.run(workdir)
        after = th.files(workdir)
    finally:
        first.send_signal(signal.SIGCONT)
    rc, out, err = th.finish(first)
    assert rc == 0 and f"done: step {th.STEPS}" in out, (out, err)
    return TrainedRun(workdir, out, holder, second, before, after)
