"""Faults of shared clusters, end to end on a tiny run: a second run on a live workdir, locks left
by dead runs, damaged checkpoints, a full disk, data rebuilt under a resumed run. Each checks that
nothing was lost (intact checkpoints kept, damaged ones moved aside, losses equal to an
uninterrupted run's, each step logged once) and that a failed run says so in one line.
"""

import errno
import io
import json
import os
import pathlib
import re
import shutil
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from backpack_jax import atomic, checkpoint
from backpack_jax.config import get_config
from tests import train_helpers as th
from train import data, metrics
from train.checkpoints import TrainCheckpoints, WriteFailed
from train.eval import main as eval_main
from train.lock import LOCK_FILE, TIMEOUT_ENV, WorkdirBusy, WorkdirLock
from train.run import ALLOW_DATA_CHANGE_ENV, FINGERPRINT, main, train
from train.step import TrainState

HOST = socket.gethostname()
# `python -m train.run` whose writes into the checkpoint step argv[1] being saved go to /dev/full,
# where the kernel answers ENOSPC. Orbax writes that step's JSON and metadata files with Python's
# `open`, in its commit threads. (The arrays go through tensorstore's C++ file driver, which no
# Python patch reaches; on a really full disk they fail first, with the same outcome: see the
# first line under "A full disk" in docs/training.md.)
FULL_DISK = """
import builtins, runpy, sys
step, real_open = sys.argv.pop(1), builtins.open
def open_(file, mode="r", *args, **kwargs):
    if "w" in mode and f"/{step}.orbax-checkpoint-tmp/" in str(file):
        file = "/dev/full"
    return real_open(file, mode, *args, **kwargs)
builtins.open = open_
runpy.run_module("train.run", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_stops_at_once_and_writes_nothing(trained_run):
    workdir, holder, (rc, out, err) = trained_run.workdir, trained_run.holder, trained_run.second
    assert rc == 2 and out == "", out
    assert [th.varying_as_n(line) for line in err] == [
        f"error: {workdir} is in use by another run (host {HOST}, pid {holder['pid']}, since "
        f"{holder['started']}, heartbeat N s ago); wait for it to end or use another --workdir"]
    assert trained_run.after == trained_run.before
    assert not (workdir / LOCK_FILE).exists()  # The first run removed its lock at the end.
    th.losses(workdir)  # Only the first run logged: each step once.


@pytest.mark.slow
def test_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(
        trained_run, tmp_path):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "w")
    th.damage(workdir, th.STEPS)
    damaged = th.files(workdir / checkpoint.STEPS_DIR / str(th.STEPS))
    dead = th.dead_pid()
    th.write_lock(workdir, HOST, dead)  # The killed run's lock is still there.
    rc, out, err = th.run(workdir)
    assert rc == 0 and "resuming from step 27:" in out, (out, err)
    aside = list((workdir / checkpoint.STEPS_DIR).glob(f"{th.STEPS}.damaged-*"))
    assert len(aside) == 1 and len(err) == 2, err
    assert [th.varying_as_n(line) for line in err] == [
        f"warning: taking over {workdir / LOCK_FILE} from a run that ended without removing it: "
        f"host {HOST}, pid {dead}, since 2025-01-01T00:00:00+00:00, heartbeat N s ago",
        f"warning: checkpoint step {th.STEPS} does not restore (OUT_OF_RANGE: Error reading "
        f'"N" in OCDBT database at local file '
        f'"{workdir}/checkpoints/{th.STEPS}/params/": Requested byte range [N, N) is not valid for '
        f"value of size 1000); moved it to {aside[0]}"]
    assert th.files(aside[0]).keys() == damaged.keys()  # Moved whole, not deleted.
    assert th.steps(workdir) == [24, 27, 30] and not (workdir / LOCK_FILE).exists()
    assert th.losses(workdir) == th.losses(trained_run.workdir)


@pytest.mark.slow
def test_no_checkpoint_restores_is_one_line_and_moves_nothing(trained_run, tmp_path):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "w")
    for step in th.steps(workdir):
        th.damage(workdir, step)
    before = th.files(workdir)
    rc, out, err = th.run(workdir)
    assert rc == 2 and out == "" and len(err) == 1, (out, err)
    assert err[0].startswith(f"error: no checkpoint in {workdir}/checkpoints restores (steps 30, "
                             "27, 24; step 30: OUT_OF_RANGE: Error reading"), err
    assert err[0].endswith("nothing was moved: repair them, or use another --workdir"), err
    assert th.files(workdir) == before  # Not even the lock is left.


@pytest.mark.slow
def test_load_falls_back_to_the_newest_step_that_loads_and_moves_nothing(
        trained_run, tmp_path, capfd):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "w")
    th.damage(workdir, th.STEPS)
    before = th.files(workdir)
    params, _ = checkpoint.load(workdir)
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: checkpoint step 30 of {workdir} does not load (OUT_OF_RANGE:"), err
    assert err[0].endswith("; using step 27"), err
    jax.tree.map(np.testing.assert_array_equal, params,
                 checkpoint.load(workdir / checkpoint.STEPS_DIR / "27")[0])
    assert th.files(workdir) == before

    for step in (24, 27):
        th.damage(workdir, step)
    with pytest.raises(SystemExit) as e:
        eval_main(["--checkpoint", str(workdir)])
    err = capfd.readouterr().err  # One line: no chatter from the abandoned reads.
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: no checkpoint step of {workdir} loads (steps 30, 27, 24; step 30: OUT_OF_RANGE")


def test_lock_is_exclusive_refreshed_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    assert WorkdirLock(tmp_path).timeout_s == 7
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='0' is not a positive number"):
        WorkdirLock(tmp_path)
    monkeypatch.delenv(TIMEOUT_ENV)
    first = WorkdirLock(tmp_path, timeout_s=1.0)  # Heartbeat every 0.1 s.
    first.acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record.keys() == {"host", "pid", "started", "heartbeat"}
    assert (record["host"], record["pid"]) == (HOST, os.getpid())
    time.sleep(1.5)  # Longer than the timeout: only the heartbeat keeps it live.
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] != record["heartbeat"]
    with pytest.raises(WorkdirBusy) as e:
        WorkdirLock(tmp_path, timeout_s=1.0).acquire()
    assert th.varying_as_n(str(e.value)) == (
        f"{tmp_path} is in use by another run (host {HOST}, pid {os.getpid()}, since "
        f"{record['started']}, heartbeat N s ago); wait for it to end or use another --workdir")
    first.check()
    first.release()
    assert list(tmp_path.iterdir()) == []
    second = WorkdirLock(tmp_path)
    second.acquire()
    second.release()


def test_a_full_disk_at_start_names_the_lock_and_leaves_nothing(tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        self.touch()  # The file was created, then the disk filled up.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OSError, match=f"cannot write the lock {tmp_path / LOCK_FILE}: No space"):
        WorkdirLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []


def test_stale_locks_are_taken_over_and_the_old_owner_stops(tmp_path, capsys):
    th.write_lock(tmp_path, "elsewhere", 1, heartbeat_age_s=20)  # Another host: its heartbeat.
    with pytest.raises(WorkdirBusy, match="in use by another run .host elsewhere, pid 1, since"):
        WorkdirLock(tmp_path, timeout_s=30).acquire()
    lock = WorkdirLock(tmp_path, timeout_s=10)
    lock.acquire()
    assert th.varying_as_n(capsys.readouterr().err) == (
        f"warning: taking over {tmp_path / LOCK_FILE} from a run that stopped its heartbeat "
        f"({TIMEOUT_ENV}=10 s): host elsewhere, pid 1, since 2025-01-01T00:00:00+00:00, "
        "heartbeat N s ago\n")
    # The old owner comes back (it looked stale) and takes the lock over: this run must stop.
    th.write_lock(tmp_path, "elsewhere", 1)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(WorkdirBusy) as e:
        lock.check()
    assert th.varying_as_n(str(e.value)) == (
        f"{tmp_path / LOCK_FILE} was taken over by another run (host elsewhere, pid 1, since "
        "2025-01-01T00:00:00+00:00, heartbeat N s ago); stopping without saving")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "elsewhere"  # Not ours.


@pytest.mark.slow
def test_full_disk_during_a_save_stops_in_one_line_and_the_run_resumes_exactly(
        trained_run, tmp_path):
    workdir = tmp_path / "w"
    rc, out, err = th.run(workdir, entry=("-c", FULL_DISK, "6"))
    # The save of step 6 fails in Orbax's commit thread; the run notices when it saves step 9.
    assert rc == 1 and out.startswith("starting:") and "Traceback" not in out, (out, err)
    assert err == ["error: saving checkpoint step 6 failed: [Errno 28] No space left on device; "
                   "the last saved step 3 is intact: free space and run the same command to "
                   "resume"]
    assert sorted(p.name for p in (workdir / checkpoint.STEPS_DIR).iterdir()) == ["3"]
    assert not (workdir / LOCK_FILE).exists()
    assert [r["step"] for r in metrics.read_metrics(workdir)] == list(range(1, 10))

    rc, out, err = th.run(workdir)
    assert rc == 0 and "resuming from step 3:" in out and err == [], (out, err)
    assert th.steps(workdir) == [24, 27, 30] and not list(workdir.glob("**/*.tmp"))
    assert th.losses(workdir) == th.losses(trained_run.workdir)


def _tiny_state(step):
    return TrainState(step=jnp.int32(step), params={"w": jnp.full(4, float(step))},
                      opt_state={"m": jnp.zeros(4)}, rng=jnp.zeros(2, jnp.uint32))


def test_a_failed_last_save_keeps_the_previous_step_and_leaves_no_partial_one(
        tmp_path, monkeypatch, capfd):
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    ckpts.save(_tiny_state(1), {})
    ckpts.wait_until_finished()
    # The step's JSON item goes to /dev/full. It is written last, so no other writer is still at
    # work when the partial step is removed.
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, mode="r", *args, **kwargs: real_open(
        "/dev/full" if "w" in mode and "/train.orbax-checkpoint-tmp/" in str(file) else file,
        mode, *args, **kwargs))
    with pytest.raises(WriteFailed) as e:
        ckpts.save(_tiny_state(2), {})
        ckpts.wait_until_finished()  # The run's last save: nothing else waits for it.
    ckpts.close()
    assert str(e.value) == (
        "saving checkpoint step 2 failed: [Errno 28] No space left on device; the last saved "
        "step 1 is intact: free space and run the same command to resume")
    assert sorted(p.name for p in (tmp_path / checkpoint.STEPS_DIR).iterdir()) == ["1"]
    assert capfd.readouterr().err == ""  # Orbax's error logs and asyncio's are not printed.


def test_metrics_and_whole_files_stay_whole_when_the_disk_fills(tmp_path, monkeypatch):
    log = metrics.MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.0})

    class FillingUp(io.FileIO):
        def write(self, b):  # Takes the start of the line, then the disk is full.
            if len(b) > 4:
                return super().write(b[:4])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "open", lambda self, mode, buffering: FillingUp(self, mode))
        with pytest.raises(OSError, match="No space left on device"):
            log.write({"step": 2, "loss": 1.0})
    log.write({"step": 2, "loss": 1.5})  # Space was freed: the log goes on, whole lines only.
    assert log.path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'

    path = tmp_path / "train_config.json"
    path.write_text("old")
    with pytest.raises(OSError), atomic.atomic_path(path) as tmp:
        tmp.write_text("par")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == [
        "metrics.jsonl", "train_config.json"]


def _prepare(source, data_dir, documents, seed):
    """`python -m train.data prepare` of `documents` text files of seeded random words."""
    rng = np.random.default_rng(seed)
    words = ["backpack", "sense", "vector", "token", "model", "data", "disk", "step", "loss"]
    source.mkdir()
    for i in range(documents):
        (source / f"{i}.txt").write_text(" ".join(rng.choice(words, size=60)))
    shutil.rmtree(data_dir / "faults", ignore_errors=True)  # A rebuild under the same name.
    data.main(["prepare", "--source", str(source), "--name", "faults", "--data_dir",
               str(data_dir), "--heldout_fraction", "0.25", "--workers", "1"])
    return data.fingerprint("faults", data_dir)


@pytest.mark.slow
def test_resuming_on_rebuilt_data_stops_in_one_line_unless_allowed(tmp_path, monkeypatch, capfd):
    data_dir, workdir = tmp_path / "tfds", tmp_path / "w"
    before = _prepare(tmp_path / "a", data_dir, documents=30, seed=0)
    overrides = {**th.OVERRIDES, "steps": 4, "checkpoint_every": 2, "data": "faults",
                 "data_dir": str(data_dir)}
    config = get_config("tiny")
    config.update_from_flattened_dict(overrides)
    train(config, workdir)
    first = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
    shutil.rmtree(workdir / checkpoint.STEPS_DIR / "4")  # As if killed after saving step 2.
    after = _prepare(tmp_path / "b", data_dir, documents=36, seed=1)
    changes = "; ".join(f"split {s!r} had {before['splits'][s]} examples, now {after['splits'][s]}"
                        for s in ("heldout", "train"))
    files = th.files(workdir)
    capfd.readouterr()

    with pytest.raises(SystemExit) as e:
        main(["--config=tiny", *(f"--config.{k}={v}" for k, v in overrides.items()),
              f"--workdir={workdir}"])
    assert e.value.code == 2
    assert capfd.readouterr() == ("", f"error: the training data changed since step 2: {changes}; "
                                      f"set {ALLOW_DATA_CHANGE_ENV}=1 to resume on it, or use "
                                      "another --workdir\n")
    assert th.files(workdir) == files  # Nothing written.

    monkeypatch.setenv(ALLOW_DATA_CHANGE_ENV, "1")
    train(config, workdir)
    out, err = capfd.readouterr()
    assert "resuming from step 2:" in out
    assert [line for line in re.split(r"[\r\n]", err) if line and not line.startswith("train:")
            ] == [f"warning: the training data changed since step 2 ({changes}); resuming on it "
                  f"({ALLOW_DATA_CHANGE_ENV}=1)"]
    resumed = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
    assert sorted(resumed) == [1, 2, 3, 4] and resumed[2] == first[2] and resumed[3] != first[3]
    saved = json.loads((workdir / checkpoint.STEPS_DIR / "4" / "train" / "metadata").read_text())
    assert saved["data"][FINGERPRINT] == after  # The next resume checks against the new data.


def test_fingerprint_changes_say_what_differs():
    saved = {"name": "owt", "version": "1.0.0", "splits": {"train": 10, "heldout": 2},
             "files": "a"}
    assert data.fingerprint_changes(saved, saved) == []
    assert data.fingerprint_changes(saved, {**saved, "files": "b"}) == [
        "its prepared files differ (the same number of examples per split)"]
    assert data.fingerprint_changes(saved, {"name": "owt2", "version": "1.0.0",
                                            "splits": {"train": 10, "extra": 1}, "files": "b"}) == [
        "its name was 'owt', now 'owt2'", "split 'extra' had no examples, now 1",
        "split 'heldout' had 2 examples, now none"]
