"""One writer per workdir: WORKDIR/lock names the live run (host, pid, start, heartbeat).

Two runs on one workdir (a requeued job while the old one still runs) would interleave
metrics.jsonl and delete each other's checkpoints. The lock is created atomically, as a hard link
to a complete file (the link fails if the lock exists, also on NFS), and a background thread
refreshes its heartbeat. A lock whose process is gone (same host) or whose heartbeat is older
than BACKPACK_LOCK_TIMEOUT seconds (default 300; a run on another host of a shared filesystem)
is taken over with a notice. A run that finds its lock taken over stops before writing more.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = "lock"
TIMEOUT_ENV = "BACKPACK_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class WorkdirBusy(RuntimeError):
    """Another live run holds the workdir (or took it over from this one)."""


def _now(timespec: str = "seconds") -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec=timespec)


def _timeout_s() -> float:
    """BACKPACK_LOCK_TIMEOUT, checked: the heartbeat runs at a tenth of it."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(value)
    except ValueError:
        timeout = 0.0
    if not 0 < timeout < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return timeout


def _age_s(holder: dict[str, Any]) -> float:
    """Seconds since the holder's last heartbeat (infinite if it wrote none we can read)."""
    try:
        return time.time() - datetime.datetime.fromisoformat(holder["heartbeat"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process.
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}, "
            f"heartbeat {_age_s(holder):.0f} s ago")


class WorkdirLock:
    """WORKDIR/lock while this run trains: `acquire`, `check` now and then, `release`."""

    def __init__(self, workdir: str | os.PathLike, timeout_s: float | None = None) -> None:
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.timeout_s = _timeout_s() if timeout_s is None else timeout_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self.lost: str | None = None  # Why the lock is no longer ours, once it is not.
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock, or a stale one over (one line on stderr); raises WorkdirBusy if live."""
        for _ in range(3):  # The holder may release it, or another run take it, in between.
            if self._write(create=True):
                self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock",
                                                   daemon=True)
                self._heartbeat.start()
                return
            holder = self._read()
            if holder is None:
                continue
            stale = self._stale(holder)
            if stale is None:
                raise WorkdirBusy(f"{self.path.parent} is in use by another run "
                                  f"({_describe(holder)}); wait for it to end or use another "
                                  "--workdir")
            print(f"warning: taking over {self.path} from a run that {stale}: "
                  f"{_describe(holder)}", file=sys.stderr, flush=True)
            if self._read() == holder:
                self.path.unlink(missing_ok=True)
        raise WorkdirBusy(f"could not lock {self.path}: other runs keep taking it")

    def check(self) -> None:
        """Raises WorkdirBusy if another run took the lock over (this one looked stale)."""
        if self.lost is not None:
            raise WorkdirBusy(f"{self.lost}; stopping without saving")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        if self._ours(self._read()):
            self.path.unlink(missing_ok=True)

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None if it may still run."""
        if not holder:
            return "left an unreadable lock"
        if holder.get("host") == self.owner["host"] and not _alive(holder.get("pid")):
            return "ended without removing it"
        if _age_s(holder) > self.timeout_s:
            return f"stopped its heartbeat ({TIMEOUT_ENV}={self.timeout_s:g} s)"
        return None

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        return holder is not None and all(holder.get(k) == v for k, v in self.owner.items())

    def _read(self) -> dict[str, Any] | None:
        """The holder's record; {} if unreadable, None if there is no lock."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _write(self, create: bool) -> bool:
        """Writes our record with a fresh heartbeat, whole: as a new lock (False if one exists)
        or over ours."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.owner['host']}.{self.owner['pid']}.tmp")
        try:
            try:
                tmp.write_text(json.dumps({**self.owner, "heartbeat": _now("milliseconds")})
                               + "\n")
            except OSError as e:  # A full disk at start: say which file, leave nothing behind.
                raise OSError(e.errno, f"cannot write the lock {self.path}: {e.strerror}") from e
            if create:
                os.link(tmp, self.path)
            else:
                os.replace(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 10):
            holder = self._read()
            if holder == {}:  # Unreadable just now (a flaky filesystem): look again next beat.
                continue
            if not self._ours(holder):
                self.lost = (f"{self.path} was taken over by another run ({_describe(holder)})"
                             if holder else f"{self.path} was removed by another run")
                return
            try:
                self._write(create=False)
            except OSError:  # A full disk or a flaky filesystem: try again at the next beat.
                pass


def lock_workdir(workdir: pathlib.Path) -> WorkdirLock | None:
    """Process 0 locks the workdir for the whole run (the others get None); every process raises
    WorkdirBusy if it could not."""
    lock, refused = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirBusy as e:
            refused = e
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
            np.int32(refused is not None)) and refused is None:
        refused = WorkdirBusy(f"process 0 could not lock {workdir}")
    if refused is not None:
        raise refused
    return lock
