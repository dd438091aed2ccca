"""The tiny training run that the run and fault tests share, and how they start and read runs.

`conftest.trained_run` trains it once per session; a test that changes a workdir copies it first.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

from backpack_jax import checkpoint
from backpack_jax.config import get_config
from train import metrics
from train.lock import LOCK_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
OVERRIDES = {"model.n_embd": 32, "model.n_layer": 1, "seq_len": 32, "batch_size": 4,
             "steps": STEPS, "warmup_steps": 2, "log_every": 1, "eval_every": 15,
             "eval_batches": 2, "checkpoint_every": 3}
ARGS = ["--config=tiny"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
TRAIN_RUN = ("-m", "train.run")


def config(**changes):
    """The shared run's config with `changes` (flattened field names)."""
    cfg = get_config("tiny")
    cfg.update_from_flattened_dict({**OVERRIDES, **changes})
    return cfg


def start(workdir, entry=TRAIN_RUN, args=ARGS, env=None) -> subprocess.Popen:
    """`python -m train.run` (or another `entry`) on `workdir`, on the CPU; the environment keeps
    the session's compilation cache (conftest)."""
    return subprocess.Popen([sys.executable, *entry, *args, f"--workdir={workdir}"], cwd=ROOT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout=300) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr's lines without tqdm's progress bar)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, [line for line in re.split(r"[\r\n]", err)
                                  if line and not line.startswith("train:")]


def run(workdir, **kwargs) -> tuple[int, str, list[str]]:
    return finish(start(workdir, **kwargs))


def steps(workdir) -> list[int]:
    """The checkpointed steps of `workdir`, in order."""
    directory = pathlib.Path(workdir) / checkpoint.STEPS_DIR
    return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit())


def wait_for_step_above(proc, workdir, step, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s > step for s in steps(workdir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint above {step} appeared; process ended: {proc.poll()}")


def losses(workdir, last=STEPS) -> dict[int, tuple[float, float | None]]:
    """{step: (loss, held-out loss or None)}, checking that steps 1..`last` were logged once."""
    records = metrics.read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, last + 1))
    return {r["step"]: (r["loss"], r.get("eval_loss")) for r in records}


def files(workdir) -> dict[str, tuple[int, int]]:
    """Every file under `workdir` with its size and modification time."""
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in pathlib.Path(workdir).rglob("*") if p.is_file()}


def damage(workdir, step) -> None:
    """Truncates the largest data file of a step's parameters, as a node dying mid-flush does."""
    params = pathlib.Path(workdir) / checkpoint.STEPS_DIR / str(step) / checkpoint.PARAMS_DIR
    largest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, 1000)


def varying_as_n(line: str) -> str:
    """`line` with what differs between runs as N: heartbeat ages, and which array of a damaged
    file fails first (its name and byte range)."""
    line = re.sub(r'Error reading "[^"]+"', 'Error reading "N"', line)
    line = re.sub(r"byte range \[\d+, \d+\)", "byte range [N, N)", line)
    return re.sub(r"heartbeat \d+", "heartbeat N", line)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(workdir, host, pid, heartbeat_age_s=0.0) -> None:
    beat = time.time() - heartbeat_age_s
    (pathlib.Path(workdir) / LOCK_FILE).write_text(json.dumps({
        "host": host, "pid": pid, "started": "2025-01-01T00:00:00+00:00",
        "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(beat))}))
